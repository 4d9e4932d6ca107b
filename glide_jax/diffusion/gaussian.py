"""Gaussian diffusion arithmetic: pure functions of a `Diffusion` and arrays (docs/reference.md, section 4).

Shapes: images `x`, `x_start`, `noise`: [B, H, W, C] (any trailing shape works); `t`: [B] int
indices into the (respaced) diffusion's T' steps; `model_output`: [..., 2C] = [prediction | v], the
prediction epsilon (GLIDE), velocity (`diffusion.prediction == 'v'`) or x0 ('x0'), v the learned-range
variance interpolant in [-1, 1]. Buffers are gathered at `t` and cast to `x`'s dtype,
so float32 buffers promote exactly into a float64 computation (as the reference's `.float()` does).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from glide_jax.diffusion.schedules import Diffusion

# (x_start [B, ...]) -> x_start; applied to the predicted x0 before clipping (inpainting uses it).
DenoisedFn = Callable[[jax.Array], jax.Array]
# (x_t [B, ...], original timesteps [B]) -> gradient of a log-density with respect to x_t.
CondFn = Callable[[jax.Array, jax.Array], jax.Array]
# 'static' | ('dynamic', percentile in (0, 1)) | None (then `clip_denoised` decides).
Threshold = Any


def extract(buffer: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
  """buffer[t] as [B, 1, ..., 1] in x's dtype."""
  vals = jnp.asarray(buffer)[t].astype(x.dtype)
  return vals.reshape(vals.shape + (1,) * (x.ndim - vals.ndim))


def model_timesteps(diffusion: Diffusion, t: jax.Array) -> jax.Array:
  """The original timesteps the model is called with (respacing never rescales them)."""
  return jnp.asarray(diffusion.timestep_map)[t]


def q_sample(diffusion: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
  return (extract(diffusion.sqrt_alphas_cumprod, t, x_start) * x_start
          + extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)


def q_posterior_mean_variance(diffusion: Diffusion, x_start: jax.Array, x_t: jax.Array,
                              t: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0); the last two are [B, 1, ..., 1]."""
  mean = (extract(diffusion.posterior_mean_coef1, t, x_t) * x_start
          + extract(diffusion.posterior_mean_coef2, t, x_t) * x_t)
  return (mean, extract(diffusion.posterior_variance, t, x_t),
          extract(diffusion.posterior_log_variance_clipped, t, x_t))


def predict_xstart_from_eps(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
  return (extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t
          - extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)


def predict_eps_from_xstart(diffusion: Diffusion, x_t: jax.Array, t: jax.Array, x_start: jax.Array) -> jax.Array:
  return ((extract(diffusion.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start)
          / extract(diffusion.sqrt_recipm1_alphas_cumprod, t, x_t))


def v_target(diffusion: Diffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """The velocity v = sqrt(abar) eps - sqrt(1 - abar) x0 that a v-prediction model learns."""
  return (extract(diffusion.sqrt_alphas_cumprod, t, x_start) * noise
          - extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)


def eps_and_xstart(diffusion: Diffusion, x_t: jax.Array, t: jax.Array,
                   pred: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(epsilon, raw x0) from the model's first C channels.

  v-prediction forms x0 = sqrt(abar) x_t - sqrt(1 - abar) v directly rather than through epsilon,
  whose 1/sqrt(abar) would amplify float32 rounding ~2e4-fold at the noisiest cosine step. Both maps
  are affine in `pred` with the same x_t for both halves of a CFG pair, so guiding the raw
  prediction (as guidance.py does) equals guiding epsilon."""
  if diffusion.prediction == "epsilon":
    return pred, predict_xstart_from_eps(diffusion, x_t, t, pred)
  if diffusion.prediction == "v":
    a = extract(diffusion.sqrt_alphas_cumprod, t, x_t)
    s = extract(diffusion.sqrt_one_minus_alphas_cumprod, t, x_t)
    return s * x_t + a * pred, a * x_t - s * pred
  if diffusion.prediction == "x0":
    return predict_eps_from_xstart(diffusion, x_t, t, pred), pred
  raise ValueError(f"unknown model prediction {diffusion.prediction!r}")


def learned_range_variance(diffusion: Diffusion, v: jax.Array, t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(variance, log variance) interpolated in log space between the RESPACED beta'_t (v = 1) and
  the respaced clipped posterior variance (v = -1) - [G] uses the respaced buffers here."""
  min_log = extract(diffusion.posterior_log_variance_clipped, t, v)
  max_log = extract(diffusion.log_betas, t, v)
  frac = (v + 1) / 2
  log_var = frac * max_log + (1 - frac) * min_log
  return jnp.exp(log_var), log_var


def dynamic_threshold(x_start: jax.Array, percentile: float) -> jax.Array:
  """Imagen's dynamic thresholding: s = max(1, quantile(|x0|, p)) per example; x0 <- clip(x0, -s, s) / s."""
  flat = jnp.abs(x_start.reshape(x_start.shape[0], -1))
  s = jnp.maximum(jnp.quantile(flat, percentile, axis=1), 1.0)
  s = s.reshape((-1,) + (1,) * (x_start.ndim - 1)).astype(x_start.dtype)
  return jnp.clip(x_start, -s, s) / s


def process_xstart(x_start: jax.Array, *, clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None,
                   threshold: Threshold = None) -> jax.Array:
  """denoised_fn first, then the clamp ([G] order; inpainting writes the known pixels before clipping)."""
  if denoised_fn is not None:
    x_start = denoised_fn(x_start)
  if threshold is None:
    threshold = "static" if clip_denoised else "none"
  if threshold == "static":
    return jnp.clip(x_start, -1, 1)
  if threshold == "none":
    return x_start
  if isinstance(threshold, (tuple, list)) and len(threshold) == 2 and threshold[0] == "dynamic":
    return dynamic_threshold(x_start, float(threshold[1]))
  raise ValueError(f"threshold must be None, 'static', 'none' or ('dynamic', p), got {threshold!r}")


class MeanVariance(NamedTuple):
  mean: jax.Array          # [B, ...] mean of p(x_{t-1} | x_t)
  variance: jax.Array      # [B, ...]
  log_variance: jax.Array  # [B, ...]
  pred_xstart: jax.Array   # [B, ...] processed (denoised_fn, clamp) x0 prediction
  eps: jax.Array           # [B, ...] the model's epsilon (converted from v for v-prediction)


def p_mean_variance(diffusion: Diffusion, model_output: jax.Array, x: jax.Array, t: jax.Array, *,
                    clip_denoised: bool = True, denoised_fn: DenoisedFn | None = None,
                    threshold: Threshold = None) -> MeanVariance:
  """p(x_{t-1} | x_t) from the model output [B, ..., 2C] (epsilon or v, plus the learned range)."""
  c = x.shape[-1]
  if model_output.shape[:-1] != x.shape[:-1] or model_output.shape[-1] != 2 * c:
    raise ValueError(f"model output has shape {model_output.shape}; expected {x.shape[:-1] + (2 * c,)}")
  eps, pred_xstart = eps_and_xstart(diffusion, x, t, model_output[..., :c])
  variance, log_variance = learned_range_variance(diffusion, model_output[..., c:], t)
  pred_xstart = process_xstart(pred_xstart, clip_denoised=clip_denoised, denoised_fn=denoised_fn,
                               threshold=threshold)
  mean, _, _ = q_posterior_mean_variance(diffusion, pred_xstart, x, t)
  return MeanVariance(mean, variance, log_variance, pred_xstart, eps)


def condition_mean(diffusion: Diffusion, cond_fn: CondFn, out: MeanVariance, x: jax.Array,
                   t: jax.Array) -> jax.Array:
  """Ancestral guidance ([G] condition_mean): mu + Sigma * grad, grad taken at x_t and the ORIGINAL t."""
  grad = cond_fn(x, model_timesteps(diffusion, t)).astype(x.dtype)
  return out.mean + out.variance * grad


def condition_score(diffusion: Diffusion, cond_fn: CondFn, out: MeanVariance, x: jax.Array,
                    t: jax.Array) -> MeanVariance:
  """DDIM guidance ([GD] condition_score): eps <- eps - sqrt(1 - abar) grad, then x0 and mean rebuilt."""
  grad = cond_fn(x, model_timesteps(diffusion, t)).astype(x.dtype)
  eps = predict_eps_from_xstart(diffusion, x, t, out.pred_xstart)
  eps = eps - jnp.sqrt(1 - extract(diffusion.alphas_cumprod, t, x)) * grad
  pred_xstart = predict_xstart_from_eps(diffusion, x, t, eps)
  mean, _, _ = q_posterior_mean_variance(diffusion, pred_xstart, x, t)
  return out._replace(mean=mean, pred_xstart=pred_xstart, eps=eps)


def _nonzero(t: jax.Array, x: jax.Array) -> jax.Array:
  return (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))


def p_sample_step(out: MeanVariance, x: jax.Array, t: jax.Array, noise: jax.Array,
                  mean: jax.Array | None = None) -> jax.Array:
  """Ancestral step: x_{t-1} = mean + 1[t != 0] exp(log_var / 2) z (`mean` overrides, e.g. guided)."""
  mean = out.mean if mean is None else mean
  return mean + _nonzero(t, x) * jnp.exp(0.5 * out.log_variance) * noise


def ddim_step(diffusion: Diffusion, out: MeanVariance, x: jax.Array, t: jax.Array, noise: jax.Array,
              eta: float | jax.Array = 0.0) -> jax.Array:
  """DDIM step; epsilon is re-derived from the (clipped) x0 prediction, as [G] does."""
  eps = predict_eps_from_xstart(diffusion, x, t, out.pred_xstart)
  # sigma from the host-built table (`Diffusion.ddim_sigma_unit`, formed as the reference forms it
  # from the float32 buffers): computing 1 - abar / abar_prev here would leave it to the device's
  # division, and it cancels at small t.
  abar_prev = jnp.asarray(diffusion.alphas_cumprod_prev)[t]
  sigma = jnp.asarray(eta, abar_prev.dtype) * jnp.asarray(diffusion.ddim_sigma_unit)[t]
  coef_eps = jnp.sqrt(1 - abar_prev - sigma ** 2)
  shape = (-1,) + (1,) * (x.ndim - 1)
  cast = lambda a: a.astype(x.dtype).reshape(shape)
  mean_pred = out.pred_xstart * cast(jnp.sqrt(abar_prev)) + cast(coef_eps) * eps
  return mean_pred + _nonzero(t, x) * cast(sigma) * noise
