r"""Inpainting fine-tune of the base model (or of the upsampler with `upsample`).

  glide-jax train --config configs/inpaint.py:variant=released \
      --config.init_from=gs://bucket/base --workdir gs://bucket/inpaint
  glide-jax train --config configs/inpaint.py:variant=released,upsample ...

[P] §4.3: the model gets 4 extra input channels (RGB of the known region + the mask), zero
initialised when a text2im checkpoint is loaded; random regions are erased. The upsampler always
sees the full low-res image but only the known part of the high-res one.
"""
from __future__ import annotations

from configs import common
from glide_jax import config_lib

SHAPES_PROMPTS = ("a small red circle on the left", "a large blue square at the top")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, variant="released", runlocal=False, upsample=False)
  config_lib.check_choice("variant", arg.variant, common.VARIANTS)
  size_stage = "upsample" if arg.upsample else "base"
  c = common.skeleton("inpaint")
  c.model.kind = "upsample_inpaint" if arg.upsample else "inpaint"
  c.model.options = common.model_options(size_stage, arg.variant)
  c.data.tokenizer.text_ctx = c.model.options.text_ctx
  c.data.masks.kind = "random"
  c.model.dtype = "bfloat16"

  # [P] §4.2-4.3: fine-tuning uses the pre-training settings, i.e. ADM's for each stage.
  if arg.upsample:
    c.batch_size = 256            # [ADM] Table 13
    c.optimizer.lr = 1e-4
    c.data.caption_dropout = 0.0
    c.data.low_res_size = c.model.options.image_size // 4
    c.diffusion.noise_schedule = "linear"
    c.sampling.sampler = "ddim"
    c.sampling.steps = "fast27"
    c.sampling.guidance_scale = 1.0
  else:
    c.batch_size = 2048           # [ADM] Table 11
    c.optimizer.lr = 3e-4
    c.data.caption_dropout = 0.2  # [P] §4.2
    c.diffusion.noise_schedule = "squaredcos_cap_v2"
  c.total_steps = 500_000         # [P] App. B.1: 500K fine-tuning iterations

  if arg.variant == "full":
    c.mesh.update(data=1, fsdp=-1)
    c.model.remat_policy = "full"
    # One compiled block for the text transformer (and CLIP towers): a shorter, smaller TPU
    # compile (docs/scale.md). Checkpoints are stacked; models/layout.py converts both ways.
    c.model.options.scan_layers = True
    if arg.upsample:
      c.batch_size = 512          # [P] §4.1
  elif arg.variant == "small":
    c.total_steps = 50_000
    c.batch_size = 64 if arg.upsample else 256
  elif arg.variant == "tiny":
    c.total_steps = 100
    c.batch_size = 8
    c.model.dtype = "float32"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.ema.rates = (0.99,)
    c.ema.warmup = True
    c.data.name = "glide_shapes/size32"  # the pipeline resizes to the 16 px model
    c.data.tokenizer.type = "words"
    c.checkpoint.every = 50
    c.log.sample_every = 0
    c.log.sample_prompts = SHAPES_PROMPTS
    c.log.tensorboard = False
    c.sampling.steps = "10"

  if arg.runlocal:
    common.apply_runlocal(c)
  return c


def sweep(add, arg=None):
  """How much of the image is erased during fine-tuning."""
  del arg
  for low, high in ((0.1, 0.5), (0.3, 0.9)):
    add(**{"data.masks.min_known": low, "data.masks.max_known": high})
