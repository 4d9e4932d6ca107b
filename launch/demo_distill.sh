#!/usr/bin/env bash
# Distillation demo: the base demo's model (launch/demo.sh's bundle, $BASE, default
# runs/shapes/bundle) distilled with configs/shapes_distill.py into a student that takes the guidance
# scale as an input (phase 1, Meng et al. 2023), then halved 8 -> 4 DDIM steps (phase 2, Salimans &
# Ho 2022). Exports the phase-1 student (the checkpoint closing phase 1, bundle8: DDIM at 8 steps)
# and the round's 4-step student (the last, bundle4), samples them, and scores them like the base
# demo: `glide-jax eval sweep` on validation captions at guidance 1 and 3, DDIM on the trailing grid
# at the student's own step count, and the phase-1 student at 4 steps too (sweep4_from8: what the
# round adds over guidance distillation alone).
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
# One bundle per student: the phase-1 student (the checkpoint closing phase 1; DDIM at the rounds'
# starting count) and the student closing each round (the last one: the latest checkpoint).
# First line: the final step count; then `STEP N` lines, the checkpoint step ("latest" for the last)
# and the student's DDIM count. A student whose phase or round did not finish (training stopped
# early) is named on stderr instead. The schedule is the trainer's own (DistillSchedule).
mapfile -t plan < <($py - "$WORKDIR" <<'PY'
import json, os, sys
from glide_jax.diffusion.distillation import DistillSchedule
work = sys.argv[1]
c = json.load(open(f"{work}/config.json"))
d = c["distill"]
s = DistillSchedule(int(d["guidance_steps"]), int(d["start_steps"]), int(d["final_steps"]),
                    int(d["steps_per_round"]), int(c["diffusion"]["steps"]))
saved = [int(x) for x in os.listdir(f"{work}/checkpoints") if x.isdigit()]
latest = max(saved, default=0)
ends = ([(s.guidance_steps, s.start_steps)] if s.guidance_steps else []) + [
    (s.guidance_steps + (k + 1) * s.steps_per_round, count) for k, count in enumerate(s.student_counts())]
print(s.final_steps)
for i, (end, count) in enumerate(ends):
  if i == len(ends) - 1 and latest >= end:
    print("latest", count)
  elif end in saved:
    print(end, count)
  else:
    print(f"no checkpoint at step {end} (latest {latest}; training stopped early? rerun to resume): "
          f"no {count}-step student", file=sys.stderr)
PY
)
final=${plan[0]}
students=()  # NAME:STEPS: bundleNAME sampled with DDIM at STEPS on the trailing grid
for line in "${plan[@]:1}"; do
  read -r step n <<<"$line"
  if [[ "$step" == latest ]]; then
    $gj export --workdir "$WORKDIR" --out "$WORKDIR/bundle"
    ln -sfn bundle "$WORKDIR/bundle$n"
  else
    $gj export --workdir "$WORKDIR" --step "$step" --out "$WORKDIR/bundle$n"
  fi
  students+=("$n:$n")
done
# The phase-1 student at the final count too: what the rounds add over guidance distillation alone.
if [[ ${#students[@]} -gt 1 ]]; then students+=("${students[0]%%:*}:$final"); fi

echo "== 4/4 sample and score the students: eval sweep on $N_EVAL validation captions, guidance 1 and 3"
for s in "${students[@]}"; do
  name=${s%%:*}; n=${s##*:}
  tag=$n; [[ "$name" == "$n" ]] || tag="${n}_from$name"  # e.g. sweep4_from8: bundle8 at 4 steps
  $gj sample --bundle "$WORKDIR/bundle$name" --sampler ddim --steps "trailing$n" --guidance-scale 3 --no-progress \
    --prompt "a small red circle on the left" --prompt "a large blue square at the top" \
    --prompt "a green triangle, small, in the center" --prompt "on the right: a large purple circle" \
    --out "$WORKDIR/samples$tag"
  TFDS_DATA_DIR="$DATA_DIR" $gj eval sweep --bundle "$WORKDIR/bundle$name" --shapes-validation "$N_EVAL" \
    --scales 1,3 --sampler ddim --steps "trailing$n" --batch-size "$(( N_EVAL < 50 ? N_EVAL : 50 ))" \
    --out "$WORKDIR/sweep$tag"
done

echo
echo "Distillation demo finished: training took ${train_s}s (wall clock, including compilation)."
echo "Students (bundle:steps): ${students[*]} in $WORKDIR/bundle*; samples in $WORKDIR/samples*; scores in $WORKDIR/sweep*"
