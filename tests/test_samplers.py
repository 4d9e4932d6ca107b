"""Samplers on a closed-form case: x0 ~ N(mu, s^2) per channel, where the exact model is known.

For Gaussian data, E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) mu) / (abar s^2 + 1 - abar) and the
true reverse step x_prev | x_t is Gaussian with the posterior mean of E[x0 | x_t] and variance
beta~' + c1'^2 Var[x0 | x_t]; the model's variance channel is set to hit that variance exactly.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.diffusion import gaussian, samplers, schedules

MU = np.array([0.3, -0.2, 0.0])
S = np.array([0.5, 0.35, 0.6])
N = 4096
SHAPE = (N, 1, 1, 3)


def exact_model(diffusion):
  full = schedules.create_diffusion(diffusion.original_num_steps, diffusion.noise_schedule, "", dtype=np.float64)
  abar_full = jnp.asarray(full.alphas_cumprod, jnp.float32)
  index_of = np.zeros(diffusion.original_num_steps, np.int32)
  index_of[np.asarray(diffusion.timestep_map)] = np.arange(diffusion.num_timesteps)
  index_of = jnp.asarray(index_of)
  mu, s2 = jnp.asarray(MU, jnp.float32), jnp.asarray(S ** 2, jnp.float32)

  def model_fn(x, t):
    ab = abar_full[t][:, None, None, None]
    denom = ab * s2 + 1 - ab
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / denom
    var_x0 = s2 * (1 - ab) / denom
    i = index_of[t]
    c1 = gaussian.extract(diffusion.posterior_mean_coef1, i, x)
    lo = gaussian.extract(diffusion.posterior_log_variance_clipped, i, x)
    hi = gaussian.extract(diffusion.log_betas, i, x)
    log_var = jnp.log(gaussian.extract(diffusion.posterior_variance, i, x) + c1 ** 2 * var_x0)
    v = 2 * (log_var - lo) / (hi - lo) - 1
    return jnp.concatenate([eps, jnp.broadcast_to(v, x.shape)], -1)
  return model_fn


def run(sampler, schedule, respacing, key=0, **kw):
  d = schedules.create_diffusion(1000, schedule, respacing)
  x = samplers.sample(exact_model(d), d, SHAPE, jax.random.PRNGKey(key), sampler=sampler,
                      clip_denoised=False, **kw)
  return np.asarray(x).reshape(-1, 3)


def assert_gaussian(x, mean_tol=5.0, std_tol=0.05):
  # mean: within mean_tol standard errors; std: within std_tol relative (statistical 1/sqrt(2N) ~ 0.011)
  np.testing.assert_array_less(np.abs(x.mean(0) - MU), mean_tol * S / np.sqrt(N))
  np.testing.assert_array_less(np.abs(x.std(0) / S - 1), std_tol)


@pytest.mark.parametrize("sampler,schedule,respacing", [
    ("ancestral", "squaredcos_cap_v2", "250"),
    ("ancestral", "linear", "25"),
    ("ddim", "squaredcos_cap_v2", "100"),
    ("plms", "squaredcos_cap_v2", "50"),
    ("plms", "linear", "20"),
    ("dpm++", "squaredcos_cap_v2", "20"),
])
def test_sampler_reaches_the_data_distribution(sampler, schedule, respacing):
  assert_gaussian(run(sampler, schedule, respacing))


def test_dpmpp_20_steps_matches_ancestral_250_steps():
  a = run("ancestral", "squaredcos_cap_v2", "250", key=1)
  b = run("dpm++", "squaredcos_cap_v2", "20", key=2)
  np.testing.assert_array_less(np.abs(a.mean(0) - b.mean(0)), 5 * S * np.sqrt(2 / N))
  np.testing.assert_array_less(np.abs(a.std(0) / b.std(0) - 1), 0.06)


def test_ddim_eta_one_equals_ancestral_with_posterior_variance():
  """DDIM with eta = 1 is DDPM with sigma^2 = beta~ (Song et al. 2021): same keys, same samples."""
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "30")
  m = exact_model(d)
  tilde = lambda x, t: m(x, t).at[..., 3:].set(-1.0)
  kw = {"clip_denoised": False, "return_intermediates": True}
  a, ia = samplers.sample(tilde, d, (256, 1, 1, 3), jax.random.PRNGKey(3), sampler="ancestral", **kw)
  b, ib = samplers.sample(tilde, d, (256, 1, 1, 3), jax.random.PRNGKey(3), sampler="ddim", eta=1.0, **kw)
  # float32 rounding differs at the first steps (1/sqrt(abar) ~ 1e3 at t = 999)
  np.testing.assert_allclose(ia["x"], ib["x"], atol=1e-3)
  np.testing.assert_allclose(a, b, atol=1e-3)
  c = samplers.sample(tilde, d, (256, 1, 1, 3), jax.random.PRNGKey(3), sampler="ddim", eta=0.0, clip_denoised=False)
  assert np.abs(np.asarray(c) - np.asarray(b)).max() > 0.1


def test_temperature_scales_initial_noise_only():
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "10")
  seen = []
  model = lambda x, t: jnp.zeros(x.shape[:-1] + (6,))
  _, inter = samplers.sample(model, d, (512, 2, 2, 3), jax.random.PRNGKey(0), temperature=0.5,
                             return_intermediates=True, sampler="ddim", clip_denoised=False)
  x_t = np.asarray(inter["x"])
  assert x_t.shape == (10, 512, 2, 2, 3)
  # with eps = 0 and no clipping active, the first DDIM step maps x_T to sqrt(abar_prev/abar) x_T
  abar, abar_prev = d.alphas_cumprod[-1], d.alphas_cumprod_prev[-1]
  std_xT = x_t[0].std() / np.sqrt(abar_prev / abar)
  assert abs(std_xT - 0.5) < 0.03
  del seen


def test_same_key_same_samples_and_model_called_at_original_timesteps():
  d = schedules.create_diffusion(1000, "linear", "fast27")
  m = exact_model(d)
  calls = []

  def model(x, t):
    jax.debug.callback(lambda tt: calls.append(int(tt[0])), t)
    return m(x, t)
  for name in samplers.SAMPLERS:
    calls.clear()
    a = samplers.sample(model, d, (8, 2, 2, 3), jax.random.PRNGKey(5), sampler=name)
    jax.block_until_ready(a)
    assert calls == sorted(schedules.space_timesteps(1000, "fast27"), reverse=True), name
    b = samplers.sample(model, d, (8, 2, 2, 3), jax.random.PRNGKey(5), sampler=name)
    c = samplers.sample(model, d, (8, 2, 2, 3), jax.random.PRNGKey(6), sampler=name)
    assert isinstance(a, jax.Array)  # no intermediates unless asked
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_inpainting_keeps_known_pixels(sampler):
  from glide_jax.diffusion.guidance import inpaint_denoised_fn

  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "15")
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  image = jax.random.uniform(k1, (2, 8, 8, 3), minval=-1, maxval=1)
  mask = jnp.zeros((2, 8, 8, 1)).at[:, :4].set(1.0)
  w = jax.random.normal(k2, (3, 6)) * 0.5

  def model(x, t):  # an arbitrary, non-trivial model
    return jnp.tanh(x @ w + (t[:, None, None, None] / 1000.0))
  x = samplers.sample(model, d, image.shape, k3, sampler=sampler, denoised_fn=inpaint_denoised_fn(image, mask))
  known = np.asarray(mask[..., 0]) > 0
  np.testing.assert_allclose(np.asarray(x)[known], np.asarray(image)[known], atol=2e-5)
  assert np.abs(np.asarray(x)[~known] - np.asarray(image)[~known]).max() > 0.1


def test_dynamic_threshold_matches_numpy():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 3)) * jnp.array([0.3, 2.0, 5.0])[:, None, None, None]
  out = gaussian.process_xstart(x0, threshold=("dynamic", 0.9))
  ref = []
  for row in np.asarray(x0):
    s = max(np.quantile(np.abs(row), 0.9), 1.0)
    ref.append(np.clip(row, -s, s) / s)
  np.testing.assert_allclose(out, np.stack(ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gaussian.process_xstart(x0, threshold="static"), np.clip(x0, -1, 1))
  np.testing.assert_array_equal(gaussian.process_xstart(x0, clip_denoised=False), x0)
  with pytest.raises(ValueError, match="threshold"):
    gaussian.process_xstart(x0, threshold="soft")


def test_dynamic_thresholding_keeps_high_guidance_sampling_bounded():
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "20")
  m = exact_model(d)
  loud = lambda x, t: m(x, t) * jnp.array([20.0] * 3 + [1.0] * 3)
  for name in ("plms", "dpm++"):  # the high-order ones (docs/pitfalls.md, 19)
    x = samplers.sample(loud, d, (64, 2, 2, 3), jax.random.PRNGKey(0), sampler=name, threshold=("dynamic", 0.99))
    assert np.isfinite(np.asarray(x)).all() and float(jnp.abs(x).max()) <= 1.0 + 1e-3, name


def test_unknown_sampler_is_refused():
  d = schedules.create_diffusion(1000, "linear", "10")
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample_loop(lambda x, t: x, d, (1, 1, 1, 3), jax.random.PRNGKey(0), sampler="euler")
