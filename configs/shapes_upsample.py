r"""Second demo stage, part 1: a small 32 -> 64 px text-conditional residual upsampler on `glide_shapes`.

  glide-jax data prepare --name glide_shapes/size256   # prepare the dataset (no download)
  glide-jax train --config configs/shapes_upsample.py --workdir runs/shapes_upsample
  glide-jax train --config configs/shapes_upsample.py:runlocal --workdir /tmp/up_smoke

It upsamples the 32 px demo model (configs/shapes.py) by 2x. The data is `glide_shapes/size256`
(rendered at full resolution): the pipeline scales each image to 64 px (antialiased bicubic) and
area-downsamples it to the 32 px low-res input, as the earlier 128 px version did.

What makes it beat bicubic in a short CPU run (docs/experiments.md, "Upsampler"):
- `diffusion.upsample_residual = 'bicubic'`: the diffusion runs on image - bicubic(low_res), so the
  flat regions, which bicubic already gets almost exact, are left alone;
- `diffusion.prediction = 'x0'`: the zero-initialised output layer starts the model at "residual 0",
  i.e. at bicubic itself, and training only has the edges to learn;
- `diffusion.vb_weight = 0`: the VLB term (for the learned variance, which DDIM does not read) was
  5-20 times the x0 MSE and dominated the trunk's gradient;
- 2x (32 -> 64 px) instead of GLIDE's 4x: a 64 px U-Net (32/64/128 channels at 64/32/16 px, one res
  block per level, attention at 16 px; 181 GFLOP per step at batch 16) is half the cost of the
  earlier 128 px one, and 4x from 32 px left too little to learn in 20 CPU-minutes.
Sampled with DDIM on 10 steps (the samples of a residual x0 model hardly depend on the sampler:
fast27, 10 steps and temperature 0 gave the same errors).
"""
from __future__ import annotations

from configs import common, shapes
from glide_jax import config_lib

MODEL = dict(
    image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,4",
    attention_resolutions="16", num_heads=1, num_head_channels=32, num_heads_upsample=-1,
    dropout=0.0,  # an endless procedural dataset does not overfit
    use_scale_shift_norm=True, resblock_updown=True,
    text_ctx=24, xf_width=128, xf_layers=2, xf_heads=4, xf_final_ln=True, xf_padding=True,
    n_vocab=256)
LOW_RES = 32  # the base demo's image size
# runlocal: the same 32 -> 64 px input and output, a much smaller network (two levels, one text
# layer) so tests and QUICK=1 take seconds.
RUNLOCAL_MODEL = dict(MODEL, channel_mult="1,2", xf_width=64, xf_layers=1, xf_heads=2)


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, runlocal=False, steps=0)
  c = common.skeleton("upsample")
  c.model.kind = "upsample"
  c.model.options = dict(MODEL)
  c.model.dtype = "float32"       # CPU: bf16 convolutions are slower than f32 here

  c.total_steps = arg.steps or 200  # measured (docs/experiments.md); ~11 minutes on the quiet 2-core machine
  c.batch_size = 16
  c.diffusion.noise_schedule = "linear"  # as GLIDE's upsampler
  c.diffusion.upsample_residual = "bicubic"
  c.diffusion.prediction = "x0"
  c.diffusion.vb_weight = 0.0

  c.data.name = "glide_shapes/size256"   # scaled to 64 px by the pipeline
  c.data.low_res_size = LOW_RES
  c.data.caption_dropout = 0.0    # the upsampler is sampled without guidance
  c.checkpoint.every = 500
  c.log.every = 25
  c.log.sample_every = 0          # in-training samples need low-res inputs; the launch script samples
  c.log.sample_prompts = shapes.PROMPTS
  c.sampling.update(sampler="ddim", steps="10", guidance_scale=1.0)
  shapes.short_cpu_run(c, lr=1e-3, warmup_steps=20, text_ctx=MODEL["text_ctx"], runlocal=arg.runlocal)
  if arg.runlocal:
    c.model.options = dict(RUNLOCAL_MODEL)
  return c
