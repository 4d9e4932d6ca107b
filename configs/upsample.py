r"""The 64 -> 256 px text-conditional upsampler (GLIDE's second stage).

  glide-jax train --config configs/upsample.py:variant=released --workdir gs://bucket/upsample

Variants:
  released  GLIDE (filtered) upsampler: 398M params, [G] model_creation.py
  full      the paper's 1.5B upsampler, [P] §4.1 (384 channels, 1024-wide text encoder)
  small     a narrow upsampler for one host
  tiny      8 -> 16 px, for tests
"""
from __future__ import annotations

from configs import common
from glide_jax import config_lib

SHAPES_PROMPTS = ("a small red circle on the left", "a large blue square at the top")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, variant="released", runlocal=False)
  config_lib.check_choice("variant", arg.variant, common.VARIANTS)
  c = common.skeleton("upsample")
  c.model.kind = "upsample"
  c.model.options = common.model_options("upsample", arg.variant)
  c.data.tokenizer.text_ctx = c.model.options.text_ctx
  c.data.low_res_size = c.model.options.image_size // 4

  # ADM 64->256 upsampler ([ADM] Table 13): lr 1e-4, batch 256, dropout 0.0 (in the options).
  c.batch_size = 256
  c.optimizer.lr = 1e-4
  c.ema.rates = (0.9999,)         # [ADM] App. I
  c.data.caption_dropout = 0.0    # the upsampler is not trained for CFG (docs/pitfalls.md, 2)
  c.diffusion.noise_schedule = "linear"  # [G] upsampler
  c.model.dtype = "bfloat16"
  c.sampling.sampler = "ddim"
  c.sampling.steps = "fast27"     # [G] notebook: the upsampler samples with 'fast27'
  c.sampling.guidance_scale = 1.0

  if arg.variant == "released":
    c.total_steps = 400_000       # [P] App. B.1: upsampler trained for 400K iterations
  elif arg.variant == "full":
    c.total_steps = 1_600_000     # [P] §4.1: 1.6M iterations at batch 512
    c.batch_size = 512
    c.mesh.update(data=1, fsdp=-1)
    c.model.remat_policy = "full"
    # One compiled block for the text transformer (and CLIP towers): a shorter, smaller TPU
    # compile (docs/scale.md). Checkpoints are stacked; models/layout.py converts both ways.
    c.model.options.scan_layers = True
  elif arg.variant == "small":
    c.total_steps = 200_000
    c.batch_size = 64
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
  """Learning rate around ADM's 1e-4, at two batch sizes ([ADM] 256, [P] 512)."""
  del arg
  for batch in (256, 512):
    for lr in (5e-5, 1e-4, 2e-4):
      add(**{"batch_size": batch, "optimizer.lr": lr})
