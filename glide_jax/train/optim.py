"""Optimizer: AdamW with linear warmup, then constant or cosine decay, optional global-norm clipping.

guided-diffusion uses plain AdamW (torch defaults, no warmup, no clipping); the config can ask for
both. Weight decay is decoupled (AdamW) and applies to every parameter, as torch's AdamW does.
`name='sgd'` is plain gradient descent (update = -lr * gradient, plus weight decay if set): unlike
Adam it changes when every gradient is scaled, so tests of gradient averaging use it.
"""
from __future__ import annotations

from typing import Any

import optax

from glide_jax import settings

# The `optimizer` section's keys and defaults (configs/common.py declares the same; a test checks).
DEFAULTS = {"name": "adamw", "lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
            "grad_clip_norm": 0.0, "warmup_steps": 0, "decay": "constant", "decay_steps": 0,
            "final_lr_frac": 0.0}


def _section(opt_cfg: Any):
  return settings.section(opt_cfg, DEFAULTS, "optimizer")


def learning_rate_schedule(opt_cfg: Any) -> optax.Schedule:
  """lr(step): 0 -> lr linearly over `warmup_steps`, then constant or cosine to `lr * final_lr_frac`."""
  o = _section(opt_cfg)
  lr, warmup, decay = float(o.lr), int(o.warmup_steps), str(o.decay)
  decay_steps, final = int(o.decay_steps), float(o.final_lr_frac)
  if decay == "constant":
    after = optax.constant_schedule(lr)
  elif decay == "cosine":
    if decay_steps <= 0:
      raise ValueError("optimizer.decay='cosine' needs optimizer.decay_steps > 0")
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=final)
  elif decay == "linear":
    if decay_steps <= 0:
      raise ValueError("optimizer.decay='linear' needs optimizer.decay_steps > 0")
    after = optax.linear_schedule(lr, lr * final, decay_steps)
  else:
    raise ValueError(f"optimizer.decay must be 'constant', 'cosine' or 'linear', got {decay!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


OPTIMIZERS = ("adamw", "sgd")


def make_optimizer(opt_cfg: Any) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). Optimizer state is float32 like the parameters."""
  o = _section(opt_cfg)
  schedule = learning_rate_schedule(opt_cfg)
  name, weight_decay = str(o.name), float(o.weight_decay)
  if name == "adamw":
    core = optax.adamw(schedule, b1=float(o.b1), b2=float(o.b2), eps=float(o.eps), weight_decay=weight_decay)
  elif name == "sgd":
    core = optax.sgd(schedule)
    if weight_decay:
      core = optax.chain(optax.add_decayed_weights(weight_decay), core)
  else:
    raise ValueError(f"unknown optimizer.name {name!r}; choose from {', '.join(OPTIMIZERS)}")
  clip = float(o.grad_clip_norm)
  tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
  return tx, schedule
