"""Optimizer: AdamW with linear warmup, then constant or cosine decay, optional global-norm clipping.

guided-diffusion uses plain AdamW (torch defaults, no warmup, no clipping); the config can ask for
both. Weight decay is decoupled (AdamW) and applies to every parameter, as torch's AdamW does.
`name='sgd'` is plain gradient descent (update = -lr * gradient, plus weight decay if set): unlike
Adam it changes when every gradient is scaled, so tests of gradient averaging use it.
"""
from __future__ import annotations

from typing import Any

import optax


def _get(cfg: Any, key: str, default: Any) -> Any:
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def learning_rate_schedule(opt_cfg: Any) -> optax.Schedule:
  """lr(step): 0 -> lr linearly over `warmup_steps`, then constant or cosine to `lr * final_lr_frac`."""
  lr = float(_get(opt_cfg, "lr", 1e-4))
  warmup = int(_get(opt_cfg, "warmup_steps", 0) or 0)
  decay = str(_get(opt_cfg, "decay", "constant") or "constant")
  decay_steps = int(_get(opt_cfg, "decay_steps", 0) or 0)
  final = float(_get(opt_cfg, "final_lr_frac", 0.0) or 0.0)
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
  schedule = learning_rate_schedule(opt_cfg)
  name = str(_get(opt_cfg, "name", "adamw") or "adamw")
  weight_decay = float(_get(opt_cfg, "weight_decay", 0.0) or 0.0)
  if name == "adamw":
    core = optax.adamw(schedule, b1=float(_get(opt_cfg, "b1", 0.9)), b2=float(_get(opt_cfg, "b2", 0.999)),
                       eps=float(_get(opt_cfg, "eps", 1e-8)), weight_decay=weight_decay)
  elif name == "sgd":
    core = optax.sgd(schedule)
    if weight_decay:
      core = optax.chain(optax.add_decayed_weights(weight_decay), core)
  else:
    raise ValueError(f"unknown optimizer.name {name!r}; choose from {', '.join(OPTIMIZERS)}")
  clip = float(_get(opt_cfg, "grad_clip_norm", 0.0) or 0.0)
  tx = optax.chain(optax.clip_by_global_norm(clip), core) if clip > 0 else core
  return tx, schedule
