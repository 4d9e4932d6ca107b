"""Guidance and task helpers: classifier-free guidance, CLIP guidance, inpainting, upsampling inputs.

All return plain functions of arrays for the samplers (`model_fn(x_t, t_model)`,
`cond_fn(x_t, t_model) -> grad`, `denoised_fn(x0) -> x0`); build them inside your `jit` so the
parameters they close over are traced arguments.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# (x [2B, H, W, C], t [2B], cond [2B, ...] pytree) -> [2B, H, W, 2C]
ApplyFn = Callable[[jax.Array, jax.Array, Any], jax.Array]


def cfg_model_fn(apply_fn: ApplyFn, cond: Any, uncond: Any, scale: float | jax.Array
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Classifier-free guidance as GLIDE's notebook does it, on one doubled batch.

  `cond`, `uncond`: pytrees with leading axis B (e.g. text_cond dicts, or (tokens, mask)).
  The returned model_fn(x [B, ...], t [B]) runs `apply_fn` ONCE on [x; x] with [cond; uncond]
  (both halves see the same x_t), mixes the epsilon channels only,
  eps = eps_u + scale (eps_c - eps_u), and keeps the conditional half's variance channels.
  """
  both = jax.tree_util.tree_map(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)

  def model_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    b = x.shape[0]
    out = apply_fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t, t], axis=0), both)
    return cfg_combine(out[:b], out[b:], scale, x.shape[-1])

  return model_fn


def cfg_combine(out_c: jax.Array, out_u: jax.Array, scale: float | jax.Array, channels: int) -> jax.Array:
  """The guided output from the conditional and unconditional ones ([B, ..., 2C] each): the first
  `channels` mixed as out_u + scale (out_c - out_u), the conditional variance channels kept.
  `cfg_model_fn` samples with it; the guidance distillation's target is it (diffusion/distillation.py)."""
  eps_c, eps_u = out_c[..., :channels], out_u[..., :channels]
  eps = eps_u + jnp.asarray(scale, out_c.dtype) * (eps_c - eps_u)
  return jnp.concatenate([eps, out_c[..., channels:]], axis=-1)


def score_cond_fn(score_fn: Callable[[jax.Array, jax.Array], jax.Array], grad_scale: float | jax.Array
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """cond_fn(x_t, t) = grad_scale * d/dx_t sum_b score_fn(x_t, t)[b] (score_fn: [B, ...], [B] -> [B])."""
  def cond_fn(x: jax.Array, t: jax.Array) -> jax.Array:
    grad = jax.grad(lambda xx: jnp.sum(score_fn(xx, t)))(x)
    return grad * jnp.asarray(grad_scale, grad.dtype)
  return cond_fn


def clip_cond_fn(clip_model: Any, clip_params: Any, z_text: jax.Array, grad_scale: float | jax.Array,
                 logit_scale: float | None = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """GLIDE's CLIP guidance: grad_scale * d/dx_t sum_b exp(logit_scale) <norm(z_text), norm(z_image(x_t, t))>.

  z_text: [B, D] from `clip_model.apply(vars, tokens, text_len, method='encode_text')`, computed once.
  The gradient is taken with respect to the NOISY x_t at the ORIGINAL timestep (the samplers pass
  timestep_map[t]); `condition_mean` then shifts the ancestral mean by variance * grad.
  """
  variables = {"params": clip_params.get("params", clip_params)}
  scale = float(getattr(clip_model, "logit_scale", np.log(100.0))) if logit_scale is None else logit_scale
  z_text = jax.lax.stop_gradient(z_text)
  z_text_n = z_text / (jnp.linalg.norm(z_text, axis=-1, keepdims=True) + 1e-12)

  def score(x: jax.Array, t: jax.Array) -> jax.Array:
    z_image = clip_model.apply(variables, x.astype(jnp.float32), t, method="encode_image")
    z_image = z_image / (jnp.linalg.norm(z_image, axis=-1, keepdims=True) + 1e-12)
    return jnp.exp(scale) * jnp.sum(z_text_n * z_image, axis=-1)

  return score_cond_fn(score, grad_scale)


def inpaint_denoised_fn(image: jax.Array, mask: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """Writes the known region into the predicted x0 (before clipping), as GLIDE's inpaint notebook.

  image: [B, H, W, C] in [-1, 1]; mask: [B, H, W, 1] (or [B, H, W, C]), 1 = known pixel.
  """
  def denoised_fn(x_start: jax.Array) -> jax.Array:
    m = mask.astype(x_start.dtype)
    return x_start * (1 - m) + image.astype(x_start.dtype) * m
  return denoised_fn


def check_inpaint_mask(mask: np.ndarray, threshold: float = 0.95) -> float:
  """Validates a 1 = known mask and warns when it keeps almost everything (an inverted mask?).

  Returns the known fraction.
  """
  mask = np.asarray(mask)
  if mask.ndim != 4 or mask.shape[-1] != 1:
    raise ValueError(f"inpaint mask must be [B, H, W, 1] with 1 = known, got shape {mask.shape}")
  if mask.min() < 0 or mask.max() > 1:
    raise ValueError(f"inpaint mask values must lie in [0, 1], got [{mask.min()}, {mask.max()}]")
  known = float(mask.mean())
  if known >= threshold:
    warnings.warn(f"the inpainting mask keeps {known:.1%} of the pixels (1 = known): almost nothing "
                  "will be generated; is the mask inverted?", stacklevel=2)
  return known


def round_to_uint8(x: jax.Array) -> jax.Array:
  """Rounds [-1, 1] images to the 8-bit grid, as GLIDE does to the 64 px sample before upsampling."""
  return jnp.round((jnp.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1


# GLIDE's `upsample_temp`: the upsampler's x_T is scaled by this; per-step noise is not.
UPSAMPLE_TEMPERATURE = 0.997
