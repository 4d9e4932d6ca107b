"""The hybrid training loss of improved-diffusion: MSE on epsilon + the VLB for the learned variance.

[G] ships no training code; this follows [GD]/[ID] `training_losses` with `learn_sigma=True`,
`rescale_learned_sigmas=True` (LossType.RESCALED_MSE), epsilon prediction, learned range. With
`diffusion.prediction == 'v'` the MSE is on the velocity target instead (Salimans & Ho 2022), which
weights x0 errors by SNR + 1 rather than SNR; with 'x0' it is on x0 itself (weight 1 at every t,
[GD]'s ModelMeanType.START_X). `min_snr_gamma` caps the weight each target puts on x0 errors (Min-SNR,
Hang et al. 2023).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from glide_jax.diffusion import gaussian
from glide_jax.diffusion.schedules import Diffusion

# (x_t [B, H, W, C], original timesteps [B]) -> [B, H, W, 2C]
ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def mean_flat(x: jax.Array) -> jax.Array:
  """Mean over every axis but the batch axis: [B, ...] -> [B]."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2) -> jax.Array:
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
  """The tanh approximation of the standard normal CDF used by [GD] (not the exact erf)."""
  return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
  """Log-likelihood of uint8 data scaled to [-1, 1] under a Gaussian discretised into 2/255 bins.

  x, means, log_scales: same shape; returns log-probabilities in nats, same shape.
  """
  centered = x - means
  inv_stdv = jnp.exp(-log_scales)
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  # Edge bins extend to -inf / +inf.
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def vb_terms_bpd(diffusion: Diffusion, model_output: jax.Array, x_start: jax.Array, x_t: jax.Array,
                 t: jax.Array) -> jax.Array:
  """One VLB term per example, in bits per dimension: KL(q || p) for t > 0, decoder NLL at t = 0. [B]"""
  true_mean, _, true_log_var = gaussian.q_posterior_mean_variance(diffusion, x_start, x_t, t)
  out = gaussian.p_mean_variance(diffusion, model_output, x_t, t, clip_denoised=False)
  kl = mean_flat(normal_kl(true_mean, true_log_var, out.mean, out.log_variance)) / math.log(2.0)
  nll = -discretized_gaussian_log_likelihood(x_start, out.mean, 0.5 * out.log_variance)
  nll = mean_flat(nll) / math.log(2.0)
  return jnp.where(t == 0, nll, kl)


def x0_weight(diffusion: Diffusion, t: jax.Array) -> jax.Array:
  """How much the prediction's MSE weights x0 errors at t, [B]: the MSE on epsilon is SNR times the
  MSE on x0, on v it is SNR + 1 times, on x0 once (SNR = abar / (1 - abar))."""
  abar = jnp.asarray(diffusion.alphas_cumprod, jnp.float32)[t]
  snr = abar / (1.0 - abar)
  return {"epsilon": snr, "v": snr + 1.0, "x0": jnp.ones_like(snr)}[diffusion.prediction]


def min_snr_weight(diffusion: Diffusion, t: jax.Array, gamma: float) -> jax.Array:
  """The Min-SNR-gamma factor on the prediction's MSE, [B]: min(w, gamma) / w for its x0 weight w.

  Hang et al. (2023) cap the x0 weight at gamma so that the nearly clean steps, where the MSE is
  easy and its gradients conflict with the noisy steps', stop dominating; for epsilon this is
  their min(SNR, gamma) / SNR. For v, capping SNR + 1 (rather than SNR, as some trainers do) leaves
  the noisiest steps at full weight, where the layout is decided. gamma > 0 (`training_losses`
  leaves the MSE alone for 0).
  """
  return jnp.minimum(1.0, gamma / x0_weight(diffusion, t))


def training_losses(diffusion: Diffusion, model_fn: ModelFn, x_start: jax.Array, t: jax.Array,
                    noise: jax.Array, vb_weight: float = 1.0, min_snr_gamma: float = 0.0) -> dict[str, jax.Array]:
  """The hybrid loss per example: {'loss', 'mse', 'vb'}, each [B].

  x_start, noise: [B, H, W, C]; t: [B] indices into the diffusion's steps (the model sees
  `timestep_map[t]`); model_fn(x_t, t_model) -> [B, H, W, 2C].
  The VLB sees stop_gradient on the prediction channels, so it trains only the variance; it is
  scaled by T/1000 (RESCALED_MSE), i.e. lambda = 0.001 on L_vlb as in improved-diffusion. 'mse' is
  against the noise (epsilon prediction), the velocity (v) or x_start (x0). `vb_weight` (config
  `diffusion.vb_weight`; 1 = [GD]'s hybrid loss) multiplies `vb` in 'loss' ('vb' is reported
  unweighted): the VLB reaches the shared trunk through the variance channels, and where `mse` is
  small (x0 targets of a residual upsampler) it dominates the trunk's gradient. `min_snr_gamma`
  (config `diffusion.min_snr_gamma`; 0 = off) multiplies the MSE in 'loss' by `min_snr_weight`
  ('mse' is reported unweighted).
  """
  x_t = gaussian.q_sample(diffusion, x_start, t, noise)
  model_output = model_fn(x_t, gaussian.model_timesteps(diffusion, t))
  c = x_start.shape[-1]
  if model_output.shape != x_start.shape[:-1] + (2 * c,):
    raise ValueError(f"model_fn returned shape {model_output.shape}; expected {x_start.shape[:-1] + (2 * c,)}")
  pred, v = model_output[..., :c], model_output[..., c:]
  frozen = jnp.concatenate([jax.lax.stop_gradient(pred), v], axis=-1)
  vb = vb_terms_bpd(diffusion, frozen, x_start, x_t, t) * (diffusion.num_timesteps / 1000.0)
  if diffusion.prediction == "epsilon":
    target = noise
  elif diffusion.prediction == "v":
    target = gaussian.v_target(diffusion, x_start, t, noise)
  elif diffusion.prediction == "x0":
    target = x_start
  else:
    raise ValueError(f"unknown model prediction {diffusion.prediction!r}")
  mse = mean_flat((target - pred) ** 2)
  weighted = mse * min_snr_weight(diffusion, t, min_snr_gamma) if min_snr_gamma > 0 else mse
  return {"loss": weighted + vb_weight * vb, "mse": mse, "vb": vb}
