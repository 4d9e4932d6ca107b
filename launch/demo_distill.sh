#!/usr/bin/env bash
# Distillation demo: the base demo's model (launch/demo.sh's bundle, $BASE, default
# runs/shapes/bundle) distilled with configs/shapes_distill.py into a student that takes the guidance
# scale as an input (phase 1, Meng et al. 2023), then halved 16 -> 8 -> 4 DDIM steps (phase 2,
# Salimans & Ho 2022). Exports the 8-step student (the checkpoint closing round 16 -> 8) and the
# 4-step one (the last), samples both, and scores them like the base demo: `glide-jax eval sweep` on
# validation captions at guidance 1 and 3, DDIM with the student's own step count.
#
#   bash launch/demo.sh && bash launch/demo_distill.sh      # needs the base demo's bundle
#   QUICK=1 bash launch/demo_distill.sh  # a few steps of everything (needs QUICK=1 launch/demo.sh's bundle)
#   SKIP_SETUP=1 ...                     # use the glide-jax on PATH instead of ./.venv
#
# Training stops after TRAIN_MINUTES (default 40, compilation included); the trainer saves a
# checkpoint on SIGTERM. Rerunning resumes the same workdir. N_EVAL validation captions are scored,
# in batches of 50 as README's 2,000-caption sweep of the teacher, so that `glide-jax eval compare`
# pairs them with it prompt by prompt and the same noise (docs/sampling.md, "Distilled students").
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_MINUTES="${TRAIN_MINUTES:-40}"  # before demo_lib.sh, which defaults it to 20
source launch/demo_lib.sh
WORKDIR="${WORKDIR:-runs/shapes_distill}"
N_EVAL="${N_EVAL:-2000}"
demo_setup
if demo_config configs/shapes_distill.py; then
  BASE="${BASE:-runs/shapes_quick/bundle}"
  N_EVAL=8
fi
BASE="${BASE:-runs/shapes/bundle}"
require_base "$BASE"

echo "== 1/4 prepare glide_shapes/size32 in $DATA_DIR"
$gj data prepare --name glide_shapes/size32 --data-dir "$DATA_DIR" "${prepare[@]}"

echo "== 2/4 distil $BASE with $config in $WORKDIR"
train_bounded --config "$config" --workdir "$WORKDIR" --config.data.data_dir="$DATA_DIR" \
  --config.init_from="$BASE"

echo "== 3/4 export the students"
# The checkpoint that closes round 16 -> 8 is the 8-step student; the latest, the 4-step one.
read -r G R < <($py - "$WORKDIR" <<'PY'
import json, sys
c = json.load(open(f"{sys.argv[1]}/config.json"))["distill"]
print(c["guidance_steps"], c["steps_per_round"])
PY
)
students=()
if [[ -d "$WORKDIR/checkpoints/$((G + R))" ]]; then
  $gj export --workdir "$WORKDIR" --step "$((G + R))" --out "$WORKDIR/bundle8"
  students+=(8)
fi
$gj export --workdir "$WORKDIR" --out "$WORKDIR/bundle"
steps=$($py -c "import json,sys; d=json.load(open(sys.argv[1]))['distill']['distilled_steps']; print(d[-1] if d else '')" "$WORKDIR/bundle/meta.json")
if [[ "$steps" == 4 ]]; then ln -sfn bundle "$WORKDIR/bundle4"; students+=(4); else
  echo "training stopped before round 8 -> 4 began; the last export is ${steps:-the phase-1} student"; fi

echo "== 4/4 sample and score the students: eval sweep on $N_EVAL validation captions, guidance 1 and 3"
for n in "${students[@]}"; do
  $gj sample --bundle "$WORKDIR/bundle$n" --steps "$n" --guidance-scale 3 --no-progress \
    --prompt "a small red circle on the left" --prompt "a large blue square at the top" \
    --prompt "a green triangle, small, in the center" --prompt "on the right: a large purple circle" \
    --out "$WORKDIR/samples$n"
  TFDS_DATA_DIR="$DATA_DIR" $gj eval sweep --bundle "$WORKDIR/bundle$n" --shapes-validation "$N_EVAL" \
    --scales 1,3 --sampler ddim --steps "$n" --batch-size "$(( N_EVAL < 50 ? N_EVAL : 50 ))" --out "$WORKDIR/sweep$n"
done

echo
echo "Distillation demo finished: training took ${train_s}s (wall clock, including compilation)."
echo "Students: ${students[*]/#/$WORKDIR/bundle}; samples in $WORKDIR/samples*; scores in $WORKDIR/sweep*"
