r"""The 64 px text-conditional base model (GLIDE's first stage).

  glide-jax train --config configs/base.py:variant=released --workdir gs://bucket/base
  glide-jax train --config configs/base.py:variant=tiny,runlocal --workdir /tmp/base

Variants:
  released  GLIDE (filtered): 385M params, [G] model_creation.py
  full      the paper's 3.5B model, [P] §4.1 (2.3B ADM-64 at width 512 + 1.2B text transformer)
  small     ~100M params for one host with accelerators
  tiny      16 px, a few hundred thousand params, for tests
"""
from __future__ import annotations

from configs import common
from glide_jax import config_lib

SHAPES_PROMPTS = ("a small red circle on the left", "a large blue square at the top",
                  "a green triangle, small, in the center", "on the right: a large purple circle")


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, variant="released", runlocal=False)
  config_lib.check_choice("variant", arg.variant, common.VARIANTS)
  c = common.skeleton("base")
  c.model.kind = "text2im"
  c.model.options = common.model_options("base", arg.variant)
  c.data.tokenizer.text_ctx = c.model.options.text_ctx

  # ADM ImageNet-64 hyper-parameters ([ADM] Table 11), which GLIDE's base inherits by
  # architecture; the GLIDE paper gives none ([P] §6).
  c.batch_size = 2048
  c.optimizer.lr = 3e-4
  c.ema.rates = (0.9999,)
  c.data.caption_dropout = 0.2    # [P] §4.2 classifier-free guidance fine-tune
  c.diffusion.noise_schedule = "squaredcos_cap_v2"  # [G] base model
  c.model.dtype = "bfloat16"      # ADM trains in fp16 with fp32 masters; bf16 needs no loss scale

  if arg.variant == "released":
    c.total_steps = 1_100_000     # [P] App. B.1: 1.1M pre-training iterations (then 500K CFG)
  elif arg.variant == "full":
    c.total_steps = 2_500_000     # [P] §4.1: 2.5M iterations at batch 2048
    # 3.5B params + AdamW state do not fit replicated; shard them over fsdp (see docs/scale.md).
    c.mesh.update(data=1, fsdp=-1)
    c.model.remat_policy = "full"
    # One compiled block for the text transformer (and CLIP towers): a shorter, smaller TPU
    # compile (docs/scale.md). Checkpoints are stacked; models/layout.py converts both ways.
    c.model.options.scan_layers = True
  elif arg.variant == "small":
    c.total_steps = 300_000
    c.batch_size = 256
  elif arg.variant == "tiny":
    c.total_steps = 100
    c.batch_size = 8
    c.model.dtype = "float32"
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.ema.rates = (0.99,)
    c.ema.warmup = True
    c.data.name = "glide_shapes/size32"  # the pipeline resizes to the 16 px model
    c.data.tokenizer.type = "words"  # the closed shapes vocabulary
    c.checkpoint.every = 50
    c.log.every = 10
    c.log.sample_every = 0
    c.log.sample_prompts = SHAPES_PROMPTS
    c.log.tensorboard = False
    c.sampling.steps = "10"

  if arg.runlocal:
    common.apply_runlocal(c)
  return c


def sweep(add, arg=None):
  """Learning rate x caption dropout around the ADM defaults."""
  del arg  # the same grid for every variant
  for lr in (1e-4, 3e-4):
    for p in (0.1, 0.2):
      add(**{"optimizer.lr": lr, "data.caption_dropout": p})
