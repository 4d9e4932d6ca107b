r"""Second demo stage, part 1: a small 32 -> 128 px text-conditional upsampler on `glide_shapes`.

  glide-jax data prepare --name glide_shapes/size256   # prepare the dataset (no download)
  glide-jax train --config configs/shapes_upsample.py --workdir runs/shapes_upsample
  glide-jax train --config configs/shapes_upsample.py:runlocal --workdir /tmp/up_smoke

It upsamples the 32 px demo model (configs/shapes.py) by 4x, the same ratio as GLIDE's 64 -> 256.
The data is `glide_shapes/size256` (rendered at full resolution): the pipeline scales each image to
128 px (antialiased bicubic) and area-downsamples it to the 32 px low-res input. There is no size128
builder config because the registered config list is pinned by tests/test_shapes.py.

Sized for a short CPU run on 2 cores (launch/demo_upsample.sh, bounded by TRAIN_MINUTES): a 128 px
U-Net of 32/32/64/128 channels at 128/64/32/16 px, one res block per level, attention only at
16 px, and a 2-layer, 128-wide text transformer (the low-res image carries most of the content);
343 GFLOP per step at batch 16, about 6 s per step in the trainer on that machine, so 20 minutes hold
about 180 steps: the learning-rate schedule (short warm-up, cosine decay) ends there. Measured in
the README: the samples keep every caption attribute but stay grainy (bicubic is more exact).
"""
from __future__ import annotations

from configs import common
from configs import shapes
from glide_jax import config_lib

MODEL = dict(
    image_size=128, num_channels=32, num_res_blocks=1, channel_mult="1,1,2,4",
    attention_resolutions="16", num_heads=1, num_head_channels=32, num_heads_upsample=-1,
    dropout=0.0,  # an endless procedural dataset does not overfit
    use_scale_shift_norm=True, resblock_updown=True,
    text_ctx=24, xf_width=128, xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True,
    n_vocab=256)
LOW_RES = 32  # the base demo's image size
# runlocal: the same 32 -> 128 px input and output, a much smaller network (two levels, the middle
# block - which always has attention - at 32 px, one text layer) so tests and QUICK=1 take seconds.
RUNLOCAL_MODEL = dict(MODEL, channel_mult="1,1,2", xf_width=64, xf_layers=1, xf_heads=2)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, runlocal=False, steps=0)
  c = common.skeleton("upsample")
  c.model.kind = "upsample"
  c.model.options = dict(MODEL)
  c.model.dtype = "float32"       # CPU: bf16 convolutions are slower than f32 here

  c.total_steps = arg.steps or 180  # what 20 minutes reach (docstring)
  c.batch_size = 16
  c.diffusion.noise_schedule = "linear"  # as GLIDE's upsampler
  # v, not GLIDE's epsilon: after 180 epsilon steps the x0 estimate at t = 900 had an MSE of 1.13
  # (bilinear upsampling of the input: 0.003), because the linear schedule multiplies epsilon's
  # error by up to 1 / sqrt(abar) ~ 70 there, and DDIM samples were pure noise over the shapes.
  c.diffusion.prediction = "v"

  c.data.name = "glide_shapes/size256"   # scaled to 128 px by the pipeline
  c.data.low_res_size = LOW_RES
  c.data.caption_dropout = 0.0    # the upsampler is sampled without guidance
  c.checkpoint.every = 500
  c.log.every = 25
  c.log.sample_every = 0          # in-training samples need low-res inputs; the launch script samples
  c.log.sample_prompts = shapes.PROMPTS
  # GLIDE samples its upsampler with DDIM on the 'fast27' respacing, temperature 0.997.
  c.sampling.update(sampler="ddim", steps="fast27", guidance_scale=1.0)
  shapes.short_cpu_run(c, lr=1e-3, warmup_steps=30, text_ctx=MODEL["text_ctx"], runlocal=arg.runlocal)
  if arg.runlocal:
    c.model.options = dict(RUNLOCAL_MODEL)
  return c
