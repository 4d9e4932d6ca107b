r"""The noised CLIP used for CLIP guidance ([P] §4.4): an image tower f(x_t, t) on noised 64 px
images and a text tower g(caption), trained with CLIP's contrastive loss.

  glide-jax train --config configs/clip.py:variant=released --workdir gs://bucket/clip

Variants:
  released  the GLIDE (filtered) noised CLIP, ViT-B-like: image tower 86,443,776 params, text
            tower 71,679,488 ([G] clip/config.yaml)
  full      the paper's ViT-L ([P] §6) at ViT-L/14's widths ([CLIP] Table 19)
  small     a ViT-S-sized pair
  tiny      16 px, 2 blocks of width 32 (the sizes of the reference dump), for tests
"""
from __future__ import annotations

from configs import common
from glide_jax import config_lib

# Option names are [G] clip/config.yaml's (glide_jax/models/clip.py reads them).
RELEASED = dict(
    logit_scale=100.0, n_timesteps=1000, image_size=64, patch_size=4, n_vocab=65536,
    max_text_len=77, n_embd=512,
    n_head_text=8, n_head_state_text=64, n_xf_blocks_text=12,
    n_head_image=12, n_head_state_image=64, n_xf_blocks_image=12)
SIZES = {
    "released": RELEASED,
    "full": dict(RELEASED, n_embd=768, n_head_image=16, n_xf_blocks_image=24,
                 n_head_text=12, n_xf_blocks_text=12),
    "small": dict(RELEASED, n_embd=384, n_head_image=6, n_xf_blocks_image=12,
                  n_head_text=6, n_xf_blocks_text=8),
    "tiny": dict(RELEASED, n_embd=32, image_size=16, max_text_len=16, n_vocab=300,
                 n_head_text=2, n_head_state_text=16, n_xf_blocks_text=2,
                 n_head_image=2, n_head_state_image=16, n_xf_blocks_image=2),
}


def get_config(arg: str | None = None):
  arg = config_lib.parse_arg(arg, variant="released", runlocal=False)
  config_lib.check_choice("variant", arg.variant, common.VARIANTS)
  c = common.skeleton("clip")
  c.model.kind = "noised_clip"
  # Ours, settable from the command line: scan_layers, attention_impl (docs/models.md).
  c.model.options = dict(SIZES[arg.variant], scan_layers=False, attention_impl=None)
  c.model.dtype = "bfloat16"
  c.diffusion.noise_schedule = "squaredcos_cap_v2"  # [P] §4.4: the base model's schedule
  c.diffusion.schedule_sampler = "uniform"          # not stated in [P]; uniform assumed
  c.data.tokenizer.type = "clip"
  c.data.tokenizer.text_ctx = c.model.options.max_text_len
  c.data.caption_dropout = 0.0

  # [P] App. B.1: batch 32K, 390K iterations. [P] §6: ViT-L with weight decay 0.0125.
  # The rest follows CLIP's recipe ([CLIP] Table 19/20): AdamW b2 0.98, eps 1e-6, 2K warmup steps,
  # cosine decay, lr 5e-4 (ViT-B) / 4e-4 (ViT-L).
  c.batch_size = 32_768
  c.total_steps = 390_000
  c.optimizer.update(lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, weight_decay=0.0125, warmup_steps=2000,
                     decay="cosine", decay_steps=c.total_steps - 2000)
  c.ema.rates = ()                # CLIP keeps no EMA
  c.sampling.guidance_scale = 0.0  # unused by this stage

  if arg.variant == "full":
    c.optimizer.lr = 4e-4
    c.mesh.update(data=1, fsdp=-1)
    c.model.remat_policy = "full"
    # One compiled block for the text transformer (and CLIP towers): a shorter, smaller TPU
    # compile (docs/scale.md). Checkpoints are stacked; models/layout.py converts both ways.
    c.model.options.scan_layers = True
  elif arg.variant == "small":
    c.batch_size = 4096
    c.total_steps = 100_000
    c.optimizer.decay_steps = c.total_steps - c.optimizer.warmup_steps
  elif arg.variant == "tiny":
    c.batch_size = 8
    c.total_steps = 100
    c.model.dtype = "float32"
    c.optimizer.update(lr=1e-3, warmup_steps=10, decay_steps=90)
    c.data.name = "glide_shapes/size32"  # the pipeline resizes to the 16 px model
    c.data.tokenizer.type = "words"
    c.checkpoint.every = 50
    c.log.sample_every = 0
    c.log.tensorboard = False

  if arg.runlocal:
    common.apply_runlocal(c)
    c.optimizer.update(warmup_steps=1, decay_steps=c.total_steps)
  return c


def sweep(add, arg=None):
  """Weight decay around the paper's 0.0125, two learning rates."""
  del arg
  for wd in (0.0125, 0.1):
    for lr in (4e-4, 5e-4):
      add(**{"optimizer.weight_decay": wd, "optimizer.lr": lr})
