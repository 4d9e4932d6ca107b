"""Samplers: ancestral (GLIDE's p_sample_loop), DDIM, PLMS and DPM-Solver++(2M).

Each is one `lax.scan` over the diffusion's T' (respaced) steps, from index T'-1 down to 0, inside
one `jit`. All four use the same respaced buffers: alpha_bar_i = `alphas_cumprod[i]` at the step's
index and alpha_bar_prev_i = `alphas_cumprod_prev[i]` (the previous KEPT step, 1 after the last),
and all call the model at the original timestep `timestep_map[i]`.

- ancestral: x <- mean (+ Sigma grad with cond_fn) + 1[i != 0] sigma z; sigma from the learned range.
- ddim: [G] ddim_sample; eps re-derived from the processed (clipped) x0; `eta` adds noise.
- plms: pseudo linear multistep (Liu et al. 2022) on eps: Adams-Bashforth of order 1, 2, 3, 4 on
  the first, second, third, later steps (a first-order DDIM warm-up instead of PNDM's extra
  Runge-Kutta model calls, so every step is one model call); the combined eps gives x0, which is
  processed again (denoised_fn, clamp) before the DDIM (eta = 0) update to alpha_bar_prev.
- dpm++: DPM-Solver++(2M) (Lu et al. 2022) in data prediction with lambda = log(sqrt(abar) /
  sqrt(1 - abar)); first step first order; the last step (to alpha_bar_prev = 1, sigma = 0) is
  first order, i.e. returns the processed x0.

With `cond_fn`, ancestral uses condition_mean ([G]); the three deterministic samplers use
condition_score (the DDIM rule of [GD]) before their update.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from glide_jax.diffusion import gaussian
from glide_jax.diffusion.schedules import Diffusion

SAMPLERS = ("ancestral", "ddim", "plms", "dpm++")
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]

# Adams-Bashforth coefficients on [e_t, e_{t-1}, e_{t-2}, e_{t-3}] by the number of stored eps.
_PLMS_COEFS = ((1.0, 0.0, 0.0, 0.0),
               (3 / 2, -1 / 2, 0.0, 0.0),
               (23 / 12, -16 / 12, 5 / 12, 0.0),
               (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def _dpmpp_coefficients(diffusion: Diffusion, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per-index [T'] coefficients (a, b, c) of x_prev = a x + b x0 + c x0_prev for DPM-Solver++(2M)."""
  abar = jnp.asarray(diffusion.alphas_cumprod).astype(jnp.float32)
  abar_n = jnp.asarray(diffusion.alphas_cumprod_prev).astype(jnp.float32)
  n = abar.shape[0]
  idx = jnp.arange(n)
  last = idx == 0                       # the final step, to sigma = 0
  abar_n_safe = jnp.where(last, 0.5, abar_n)
  lam = 0.5 * (jnp.log(abar) - jnp.log1p(-abar))
  lam_n = 0.5 * (jnp.log(abar_n_safe) - jnp.log1p(-abar_n_safe))
  h = lam_n - lam
  h_prev = jnp.concatenate([h[1:], h[-1:]])  # h of the step taken just before (index i + 1)
  # First order on the first step (no history) and on the step into index 0: with time-uniform
  # respacing that step has a much larger h than the one before (r = h_prev / h ~ 0.2), and the
  # second-order extrapolation 1 + 1/(2r) then inflates the sample variance (lower_order_final).
  first = (idx == n - 1) | (idx == 1)
  r = h_prev / h
  sig_ratio = jnp.sqrt((1 - abar_n_safe) / (1 - abar))
  base = -jnp.sqrt(abar_n_safe) * jnp.expm1(-h)  # multiplies D
  b2 = base * (1 + 1 / (2 * r))
  c2 = -base / (2 * r)
  a = jnp.where(last, 0.0, sig_ratio)
  b = jnp.where(last, 1.0, jnp.where(first, base, b2))
  c = jnp.where(last | first, 0.0, c2)
  return a.astype(dtype), b.astype(dtype), c.astype(dtype)


def sample_loop(model_fn: ModelFn, diffusion: Diffusion, shape: tuple[int, ...], key: jax.Array, *,
                sampler: str = "ancestral", clip_denoised: bool = True,
                denoised_fn: Callable | None = None, cond_fn: Callable | None = None,
                temperature: float | jax.Array = 1.0, threshold: Any = None, eta: float | jax.Array = 0.0,
                return_intermediates: bool = False, x_init: jax.Array | None = None,
                progress: Callable[[jax.Array], None] | None = None, dtype: Any = jnp.float32):
  """Traceable sampler body (call it under your own `jit`, or use `sample`).

  model_fn(x_t [B, H, W, C], t_model [B] int) -> [B, H, W, 2C]; shape = (B, H, W, C).
  x_T = temperature * N(0, I) unless `x_init` is given. Returns samples [B, H, W, C], or
  (samples, {'x': [T', B, ...], 'pred_xstart': [T', B, ...]}) with return_intermediates, in
  sampling order. `progress(steps_done)` is called from the compiled loop via jax.debug.callback.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose from {', '.join(SAMPLERS)}")
  shape = tuple(shape)
  n = diffusion.num_timesteps
  init_key, loop_key = jax.random.split(key)
  if x_init is None:
    x = jnp.asarray(temperature, dtype) * jax.random.normal(init_key, shape, dtype)
  else:
    if x_init.shape != shape:
      raise ValueError(f"x_init has shape {x_init.shape}, expected {shape}")
    x = x_init.astype(dtype)
  step_keys = jax.random.split(loop_key, n)
  timestep_map = jnp.asarray(diffusion.timestep_map)
  process = functools.partial(gaussian.process_xstart, clip_denoised=clip_denoised,
                              denoised_fn=denoised_fn, threshold=threshold)

  def predict(x, i):
    t = jnp.full((shape[0],), i, jnp.int32)
    out = gaussian.p_mean_variance(diffusion, model_fn(x, timestep_map[t]), x, t,
                                   clip_denoised=clip_denoised, denoised_fn=denoised_fn, threshold=threshold)
    return t, out

  def emit(x_new, out, i):
    if progress is not None:
      jax.debug.callback(progress, n - i)
    return (x_new, out.pred_xstart) if return_intermediates else None

  if sampler == "ancestral":
    def body(x, inp):
      i, k = inp
      t, out = predict(x, i)
      mean = gaussian.condition_mean(diffusion, cond_fn, out, x, t) if cond_fn is not None else out.mean
      x_new = gaussian.p_sample_step(out, x, t, jax.random.normal(k, shape, dtype), mean=mean)
      return x_new, emit(x_new, out, i)
    carry = x
  elif sampler == "ddim":
    def body(x, inp):
      i, k = inp
      t, out = predict(x, i)
      if cond_fn is not None:
        out = gaussian.condition_score(diffusion, cond_fn, out, x, t)
      x_new = gaussian.ddim_step(diffusion, out, x, t, jax.random.normal(k, shape, dtype), eta)
      return x_new, emit(x_new, out, i)
    carry = x
  elif sampler == "plms":
    coefs = jnp.asarray(_PLMS_COEFS, dtype)

    def body(carry, inp):
      x, hist, count = carry
      i, _ = inp
      t, out = predict(x, i)
      if cond_fn is not None:
        out = gaussian.condition_score(diffusion, cond_fn, out, x, t)
      e_t = gaussian.predict_eps_from_xstart(diffusion, x, t, out.pred_xstart)
      c = coefs[jnp.minimum(count, 3)]
      eps = c[0] * e_t + c[1] * hist[0] + c[2] * hist[1] + c[3] * hist[2]
      x0 = process(gaussian.predict_xstart_from_eps(diffusion, x, t, eps))
      eps = gaussian.predict_eps_from_xstart(diffusion, x, t, x0)
      abar_prev = gaussian.extract(diffusion.alphas_cumprod_prev, t, x)
      x_new = x0 * jnp.sqrt(abar_prev) + jnp.sqrt(1 - abar_prev) * eps
      hist = jnp.concatenate([e_t[None], hist[:2]])
      return (x_new, hist, count + 1), emit(x_new, out._replace(pred_xstart=x0), i)
    carry = (x, jnp.zeros((3,) + shape, dtype), jnp.zeros((), jnp.int32))
  else:  # dpm++
    ca, cb, cc = _dpmpp_coefficients(diffusion, dtype)

    def body(carry, inp):
      x, x0_prev = carry
      i, _ = inp
      t, out = predict(x, i)
      if cond_fn is not None:
        out = gaussian.condition_score(diffusion, cond_fn, out, x, t)
      x0 = out.pred_xstart
      x_new = ca[i] * x + cb[i] * x0 + cc[i] * x0_prev
      return (x_new, x0), emit(x_new, out, i)
    carry = (x, jnp.zeros(shape, dtype))

  carry, inter = jax.lax.scan(body, carry, (jnp.arange(n - 1, -1, -1), step_keys))
  samples = carry if sampler in ("ancestral", "ddim") else carry[0]
  if return_intermediates:
    return samples, {"x": inter[0], "pred_xstart": inter[1]}
  return samples


_sample_jit = jax.jit(sample_loop, static_argnames=(
    "shape", "sampler", "clip_denoised", "threshold", "return_intermediates", "progress", "dtype"))


def _as_partial(fn):
  if fn is None or isinstance(fn, Partial):
    return fn
  return Partial(fn)


def sample(model_fn: ModelFn, diffusion: Diffusion, shape: tuple[int, ...], key: jax.Array, *,
           sampler: str = "ancestral", clip_denoised: bool = True, denoised_fn: Callable | None = None,
           cond_fn: Callable | None = None, temperature: float = 1.0, threshold: Any = None,
           eta: float = 0.0, return_intermediates: bool = False, x_init: jax.Array | None = None,
           progress: Callable | None = None, dtype: Any = jnp.float32):
  """Jitted `sample_loop` (one compiled scan). Functions may be `jax.tree_util.Partial`s, whose bound
  arrays (e.g. parameters) are then traced arguments rather than constants folded into the program;
  plain functions are compiled once per function object."""
  if isinstance(threshold, list):
    threshold = tuple(threshold)
  return _sample_jit(_as_partial(model_fn), diffusion, tuple(shape), key, sampler=sampler,
                     clip_denoised=clip_denoised, denoised_fn=_as_partial(denoised_fn),
                     cond_fn=_as_partial(cond_fn), temperature=temperature, threshold=threshold, eta=eta,
                     return_intermediates=return_intermediates, x_init=x_init, progress=progress,
                     dtype=dtype)
