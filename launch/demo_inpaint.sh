#!/usr/bin/env bash
# Second demo stage, part 2: inpainting. Fine-tunes the base demo model (launch/demo.sh's bundle,
# $BASE, default runs/shapes/bundle) into a 32 px inpainting model with configs/shapes_inpaint.py
# (4 new zero-initialised input channels, random masks from the data pipeline), exports its EMA
# weights, then erases random regions of N_IMAGES validation images and fills them in from their
# captions: $WORKDIR/samples/grid.png (rows: masked input with the hole in black, inpainted, original)
# and the samples one per file in $WORKDIR/samples/inpainted/.
#
#   bash launch/demo.sh && bash launch/demo_inpaint.sh     # needs the base demo's bundle
#   QUICK=1 bash launch/demo_inpaint.sh   # a few steps of everything (needs QUICK=1 launch/demo.sh's bundle)
#   SKIP_SETUP=1 ...                      # use the glide-jax on PATH instead of ./.venv
#
# Training stops after TRAIN_MINUTES (default 20, compilation included): the trainer saves a
# checkpoint on SIGTERM and exits cleanly. Rerunning resumes the same workdir.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/demo_lib.sh
WORKDIR="${WORKDIR:-runs/shapes_inpaint}"
N_IMAGES="${N_IMAGES:-32}"
GUIDANCE="${GUIDANCE:-3}"
STEPS="${STEPS:-}"          # empty = the bundle's (ancestral, 100)
demo_setup
if demo_config configs/shapes_inpaint.py; then
  BASE="${BASE:-runs/shapes_quick/bundle}"
  N_IMAGES=4; STEPS=4
fi
BASE="${BASE:-runs/shapes/bundle}"
require_base "$BASE"

echo "== 1/4 prepare glide_shapes/size32 in $DATA_DIR"
$gj data prepare --name glide_shapes/size32 --data-dir "$DATA_DIR" "${prepare[@]}"

echo "== 2/4 fine-tune $config from $BASE in $WORKDIR"
train_bounded --config "$config" --workdir "$WORKDIR" --config.data.data_dir="$DATA_DIR" \
  --config.init_from="$BASE"

echo "== 3/4 export the EMA weights to $WORKDIR/bundle"
export_ema "$WORKDIR"

echo "== 4/4 inpaint $N_IMAGES masked validation images from their captions (guidance $GUIDANCE)"
CONFIG="$config" DATA_DIR="$DATA_DIR" BUNDLE="$WORKDIR/bundle" OUT="$WORKDIR/samples" N="$N_IMAGES" \
STEPS="$STEPS" GUIDANCE="$GUIDANCE" $py - <<'PY'
from glide_jax import cpu_flags; cpu_flags.apply()  # the XLA CPU flags, as the glide-jax command
import json, os, pathlib
import jax
import numpy as np
from glide_jax import config_lib, images
from glide_jax.data import pipeline as data_pipeline
from glide_jax import sampling
from glide_jax.eval import attributes

e = os.environ
config = config_lib.load_config(e["CONFIG"], [f"--config.data.data_dir={e['DATA_DIR']}"])
sm = sampling.load_sampler_model(e["BUNDLE"])
n, out = int(e["N"]), pathlib.Path(e["OUT"])
# The first n validation images with the pipeline's random masks (1 = known), seeded per example.
batch = next(data_pipeline.make_eval_iterator(config.data, "inpaint", n, sm.image_size))
captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
image, known = batch["image"], batch["inpaint_mask"]
filled = sampling.generate(sm, captions, jax.random.PRNGKey(0), inpaint_image=image, inpaint_mask=known,
                           guidance_scale=float(e["GUIDANCE"]), respacing=e["STEPS"] or None)
images.write_samples(out / "inpainted", filled)
masked = image * known - (1 - known)  # the hole shown black
images.write_grid(out / "grid.png", np.concatenate([masked, filled, image]), ncols=n)
(out / "captions.json").write_text(json.dumps(
    {f"{i:06d}.png": {"caption": c, "known_fraction": round(float(known[i].mean()), 3)}
     for i, c in enumerate(captions)}, indent=1))
# The sampler writes the known pixels into every x0 prediction, so they must come back unchanged.
diff = np.abs(images.to_uint8(filled).astype(int) - images.to_uint8(image).astype(int))
kept = np.broadcast_to(known > 0.5, diff.shape)
print(f"wrote {n} inpainted validation images to {out}/inpainted and {out}/grid.png; "
      f"known pixels: max change {diff[kept].max()} / 255; hole: {1 - known.mean():.0%} of the pixels")
# Where the hole hid at least half of the shape, only the caption can bring the shape back.
orig = images.to_uint8(image).astype(int)
border = np.concatenate([orig[:, 0], orig[:, -1], orig[:, :, 0], orig[:, :, -1]], 1)
shape_px = np.abs(orig - np.median(border, 1)[:, None, None]).max(-1) > 40
hidden = (shape_px & (known[..., 0] < 0.5)).sum((1, 2)) / np.maximum(shape_px.sum((1, 2)), 1)
acc = attributes.caption_accuracy(images.to_uint8(filled), attributes.parse_captions(captions),
                                  return_per_sample=True)
erased = hidden >= 0.5
line = ", ".join(f"{a} {acc[a]:.0%}" for a in attributes.ATTRIBUTES)
sub = f"{acc['per_sample'][erased].mean():.0%}" if erased.any() else "-"
print(f"caption accuracy of the inpainted images: {line}; all four {acc['all']:.0%}; "
      f"on the {erased.sum()} whose hole hid >= half the shape: all four {sub}")
PY

echo
echo "Inpainting demo finished: fine-tuning took ${train_s}s (wall clock, including compilation)."
echo "Outputs: $WORKDIR/samples (grid.png, inpainted/, captions.json); TensorBoard: $WORKDIR/tensorboard"
