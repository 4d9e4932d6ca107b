#!/usr/bin/env bash
# Second demo stage, part 1: the 32 -> 64 px shapes upsampler (a bicubic-residual x0 model,
# configs/shapes_upsample.py). Prepares glide_shapes at 256 px (procedural, no download; the
# pipeline scales it to 64 px and makes the 32 px low-res input), trains, exports its EMA weights, then
#   a) upsamples the 32 px low-res versions of N_IMAGES validation images, captioned, and measures
#      the mean absolute error within 3 px of an edge and over the whole image, for the upsampler
#      and for bicubic interpolation of the same input (glide_jax/eval/upsample.py):
#      printed and written to $WORKDIR/samples/upsample_errors.json; the first GRID_IMAGES in
#      $WORKDIR/samples/validation_grid.png (rows: low-res input nearest-upscaled, upsampled,
#      bicubic, original);
#   b) if the base demo's bundle exists ($BASE, default runs/shapes/bundle, from launch/demo.sh),
#      runs the 32 -> 64 cascade on the first GRID_IMAGES captions with `glide-jax sample --upsample`:
#      $WORKDIR/samples/cascade/ (64 px samples, the 32 px ones in base/, grid.png).
#
#   bash launch/demo_upsample.sh             # TRAIN_MINUTES (default 20) of training, then sampling
#   QUICK=1 bash launch/demo_upsample.sh     # a few steps of everything, to check the plumbing
#   SKIP_SETUP=1 ...                         # use the glide-jax on PATH instead of ./.venv
#
# Training stops after TRAIN_MINUTES (compilation included): the trainer saves a checkpoint on
# SIGTERM and exits cleanly. Rerunning resumes the same workdir.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/demo_lib.sh
WORKDIR="${WORKDIR:-runs/shapes_upsample}"
N_IMAGES="${N_IMAGES:-128}"   # validation images measured (sampled 16 at a time)
GRID_IMAGES="${GRID_IMAGES:-8}"  # of which the grid shows the first
STEPS="${STEPS:-}"         # upsampler steps; empty = the bundle's (DDIM, 10)
BASE_STEPS="${BASE_STEPS:-}"  # base model steps in the cascade; empty = the base bundle's
demo_setup
if demo_config configs/shapes_upsample.py; then
  BASE="${BASE:-runs/shapes_quick/bundle}"
  N_IMAGES=16; GRID_IMAGES=4; STEPS=4; BASE_STEPS=4
fi
BASE="${BASE:-runs/shapes/bundle}"

echo "== 1/4 prepare glide_shapes/size256 in $DATA_DIR"
$gj data prepare --name glide_shapes/size256 --data-dir "$DATA_DIR" "${prepare[@]}"

echo "== 2/4 train $config in $WORKDIR"
train_bounded --config "$config" --workdir "$WORKDIR" --config.data.data_dir="$DATA_DIR"

echo "== 3/4 export the EMA weights to $WORKDIR/bundle"
export_ema "$WORKDIR"

echo "== 4/4 upsample $N_IMAGES validation low-res images; errors near the edges and overall against bicubic"
mkdir -p "$WORKDIR/samples"
CONFIG="$config" DATA_DIR="$DATA_DIR" BUNDLE="$WORKDIR/bundle" OUT="$WORKDIR/samples" N="$N_IMAGES" \
STEPS="$STEPS" GRID="$GRID_IMAGES" $py - <<'PY'
from glide_jax import cpu_flags; cpu_flags.apply()  # the XLA CPU flags, as the glide-jax command
import json, os, pathlib
import jax
import numpy as np
from glide_jax import config_lib, images
from glide_jax.data import pipeline as data_pipeline
from glide_jax import sampling
from glide_jax.eval import attributes, upsample

e = os.environ
config = config_lib.load_config(e["CONFIG"], [f"--config.data.data_dir={e['DATA_DIR']}"])
up = sampling.load_sampler_model(e["BUNDLE"])
n, out, g = int(e["N"]), pathlib.Path(e["OUT"]), int(e["GRID"])
# The first n validation examples, centre-cropped, with the same 8-bit area-downsampled low-res
# input the upsampler was trained on.
batch = next(data_pipeline.make_eval_iterator(config.data, "upsample", n, up.image_size))
captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
big = np.concatenate([sampling.generate(up, captions[i:i + 16], jax.random.PRNGKey(i), low_res=batch["low_res"][i:i + 16],
                                        respacing=e["STEPS"] or None) for i in range(0, n, 16)])
images.write_samples(out / "validation", big)
(out / "prompts.txt").write_text("\n".join(captions[:g]) + "\n")
# The baseline a learned upsampler must beat: bicubic interpolation of the same 8-bit input; the
# errors near the shapes' edges (within 3 px in the original) and over the whole image
# (glide_jax/eval/upsample.py).
report = upsample.upsample_errors(big, batch["low_res"], batch["image"])
report.update(steps=e["STEPS"] or up.diffusion_settings.get("timestep_respacing"),
              sampler=up.diffusion_settings.get("sampler"))
(out / "upsample_errors.json").write_text(json.dumps(report, indent=1) + "\n")
cubic = upsample.bicubic(batch["low_res"], up.image_size)
factor = up.image_size // batch["low_res"].shape[1]
low_up = np.repeat(np.repeat(batch["low_res"], factor, 1), factor, 2)  # nearest, to show the pixels
images.write_grid(out / "validation_grid.png",
                  np.concatenate([low_up[:g], big[:g], cubic[:g], batch["image"][:g]]), ncols=g)
print(f"wrote {n} upsampled validation images to {out}/validation and the first {g} to "
      f"{out}/validation_grid.png (rows: {batch['low_res'].shape[1]} px input, upsampled, bicubic, original)")
print(f"mean abs error against the {up.image_size} px originals, {n} validation images ({out}/upsample_errors.json):\n"
      f"  within {report['edge_radius']} px of an edge ({report['edge_fraction']:.1%} of the pixels): "
      f"upsampler {report['edge_mae']:.2f} / 255, bicubic {report['bicubic_edge_mae']:.2f} / 255 "
      f"(ratio {report['edge_vs_bicubic']:.2f})\n"
      f"  whole image: upsampler {report['mae']:.2f} / 255, bicubic {report['bicubic_mae']:.2f} / 255 "
      f"(ratio {report['mae_vs_bicubic']:.2f})")
attrs = attributes.parse_captions(captions)
acc = attributes.caption_accuracy(images.to_uint8(big), attrs)
acc_truth = attributes.caption_accuracy(images.to_uint8(batch["image"]), attrs)
print("caption accuracy of the upsampled images (attribute reader): "
      + ", ".join(f"{a} {acc[a]:.0%}" for a in attributes.ATTRIBUTES)
      + f"; of the originals: all four {acc_truth['all']:.0%}")
PY

if [[ -f "$BASE/meta.json" ]]; then
  echo "== 4/4 cascade: the base demo ($BASE) samples the captions at 32 px, the upsampler takes them to 64 px"
  args=()
  [[ -n "$STEPS" ]] && args+=(--upsample-steps "$STEPS")
  [[ -n "$BASE_STEPS" ]] && args+=(--steps "$BASE_STEPS")
  $gj sample --bundle "$BASE" --upsample "$WORKDIR/bundle" --prompt-file "$WORKDIR/samples/prompts.txt" \
    --batch-size "$GRID_IMAGES" --no-progress --out "$WORKDIR/samples/cascade" "${args[@]}"
else
  echo "(no base bundle at $BASE: run launch/demo.sh first for the 32 -> 64 cascade; skipped)"
fi

echo
echo "Upsampler demo finished: training took ${train_s}s (wall clock, including compilation)."
echo "Outputs: $WORKDIR/samples (validation_grid.png, validation/, cascade/); TensorBoard: $WORKDIR/tensorboard"
