"""Residual upsampling: diffuse the difference between the image and an interpolation of its input.

With `diffusion.upsample_residual` = 'bicubic' or 'bilinear' (config; a bundle's
`meta['diffusion']`), an upsampler's diffusion runs on r = image - up(low_res) instead of the image,
up = `upsample_base` (jax.image.resize 'cubic' or 'linear' of the 8-bit low-res input to the
model's size). The model is called exactly as before (x_t, now of r, with low_res as conditioning);
training diffuses r (train/stages.py), sampling returns up(low_res) + r and clamps up(low_res) + x0
to [-1, 1] at every step (`residual_denoised_fn`), so the clamp acts on the image, as GLIDE's.
'' (the default) is GLIDE's: the image itself is diffused.

Why: the interpolation is already almost exact in flat regions, so the diffusion has only the detail
left to model; with `diffusion.prediction = 'x0'` the zero-initialised output layer starts the model
at r = 0, i.e. at the interpolation itself (docs/diffusion.md, docs/experiments.md).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

RESIDUALS = ("", "bicubic", "bilinear")
_METHODS = {"bicubic": "cubic", "bilinear": "linear"}


def residual_of(settings: Any) -> str:
  """`settings['upsample_residual']` of a config's `diffusion` section or a bundle's
  `meta['diffusion']`, checked; absent (older workdirs and bundles, imported GLIDE weights) = ''."""
  name = str(settings.get("upsample_residual", "") or "")
  if name not in RESIDUALS:
    raise ValueError(f"unknown diffusion.upsample_residual {name!r}; choose from "
                     f"{', '.join(repr(r) for r in RESIDUALS)}")
  return name


def upsample_base(low_res: jax.Array, size: int, method: str) -> jax.Array:
  """up(low_res): [B, h, w, C] -> [B, size, size, C] float32, by 'bicubic' (Keys a = -0.5) or
  'bilinear' (half-pixel centres) interpolation, not clipped."""
  if method not in _METHODS:
    raise ValueError(f"upsample_base: method must be one of {', '.join(_METHODS)}, got {method!r}")
  low = jnp.asarray(low_res, jnp.float32)
  return jax.image.resize(low, (low.shape[0], size, size, low.shape[-1]), _METHODS[method])


def residual_denoised_fn(base: jax.Array, denoised_fn: Callable | None = None,
                         clip: bool = True) -> Callable[[jax.Array], jax.Array]:
  """A sampler's `denoised_fn` for a residual x0: forms the image base + x0, applies `denoised_fn`
  to it (e.g. inpainting's write of the known pixels, in image space), clamps it to [-1, 1] if
  `clip`, and returns it minus base. Run the sampler with clip_denoised=False then."""
  def fn(x_start: jax.Array) -> jax.Array:
    image = x_start + base.astype(x_start.dtype)
    if denoised_fn is not None:
      image = denoised_fn(image)
    if clip:
      image = jnp.clip(image, -1, 1)
    return image - base.astype(x_start.dtype)
  return fn


def sampler_wrapping(method: str, low_res: jax.Array | None, size: int, denoised_fn: Callable | None,
                     clip_denoised: bool = True) -> tuple[Callable | None, bool, Callable[[jax.Array], jax.Array]]:
  """(denoised_fn, clip_denoised, finish) for a sampler of an upsampler with `upsample_residual`
  `method`: '' returns the arguments unchanged and the identity; otherwise the residual's
  denoised_fn (clamping the image, not the residual) and finish(r) = up(low_res) + r."""
  if not method:
    return denoised_fn, clip_denoised, lambda x: x
  base = upsample_base(low_res, size, method)
  return (residual_denoised_fn(base, denoised_fn, clip=clip_denoised), False,
          lambda r: r + base.astype(r.dtype))
