#!/usr/bin/env bash
# The main job on one machine: set up ./.venv, prepare glide_shapes at 32 px (procedural, no
# download), train the small text2im demo model with 20% caption dropout, export its EMA weights,
# then sample held-out validation captions at guidance scales 1 and 3 and score them with the
# shapes attribute reader. Everything lands in $WORKDIR (default runs/shapes).
#
#   bash launch/demo.sh                 # the demo (1700 steps; 18 minutes on 2 cores, README)
#   TRAIN_STEPS=700 LR=5e-4 bash launch/demo.sh
#                                      # a shorter schedule at another peak rate (both optional)
#   QUICK=1 bash launch/demo.sh         # a few steps of everything, to check the plumbing
#   SKIP_SETUP=1 ...                    # use the glide-jax on PATH instead of ./.venv
#
# Training ends at the config's last step (TRAIN_STEPS, default configs/shapes.py's 1700) or after
# TRAIN_MINUTES (default 45, compilation included), whichever comes first: on the SIGTERM the
# trainer saves a checkpoint and exits cleanly. Rerunning resumes the same workdir.
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN_MINUTES="${TRAIN_MINUTES:-45}"  # a bound on a slow machine; 1700 steps take ~17 min here
source launch/demo_lib.sh
WORKDIR="${WORKDIR:-runs/shapes}"
N_PROMPTS="${N_PROMPTS:-60}"
# DPM-Solver++ at 15 steps keeps the 100-step ancestral sampler's caption accuracy on this model
# (docs/performance.md) in a seventh of its time.
SAMPLER="${SAMPLER:-dpm++}"
STEPS="${STEPS:-15}"
demo_setup
if demo_config configs/shapes.py; then
  STEPS=4; N_PROMPTS=8
elif [[ -n "${TRAIN_STEPS:-}" ]]; then
  config="configs/shapes.py:steps=$TRAIN_STEPS"  # the schedule decays to zero at that step
fi

echo "== 1/4 prepare glide_shapes/size32 in $DATA_DIR"
$gj data prepare --name glide_shapes/size32 --data-dir "$DATA_DIR" "${prepare[@]}"

echo "== 2/4 train $config in $WORKDIR"
# LR overrides the config's peak learning rate (1e-3).
train_bounded --config "$config" --workdir "$WORKDIR" --config.data.data_dir="$DATA_DIR" \
  ${LR:+"--config.optimizer.lr=$LR"}

echo "== 3/4 export the EMA weights to $WORKDIR/bundle"
export_ema "$WORKDIR"

echo "== 4/4 sample $N_PROMPTS held-out captions at guidance 1 and 3, and read them back"
TFDS_DATA_DIR="$DATA_DIR" $gj eval sweep --bundle "$WORKDIR/bundle" --shapes-validation "$N_PROMPTS" \
  --scales 1,3 --sampler "$SAMPLER" --steps "$STEPS" --out "$WORKDIR/eval"

echo
echo "Demo finished: training took ${train_s}s (wall clock, including compilation)."
echo "Samples, grids, sweep.csv and sweep.png are in $WORKDIR/eval; TensorBoard: $WORKDIR/tensorboard"
