"""Guidance: classifier-free guidance, CLIP/score guidance (closed form and the reference CLIP dump),
inpainting mask checks, the 8-bit low-res rounding."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.diffusion import gaussian, guidance, samplers, schedules

MU, S = 0.2, 0.5        # data x0 ~ N(MU, S^2) per pixel
Y, R = 0.9, 0.3         # an observation y ~ N(x0, R^2): the guided target is x0 | y


def _toy_apply(calls):
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 6))

  def apply_fn(x, t, cond):
    calls.append((x.shape, t.shape))
    tokens, scale = cond
    return jnp.tanh(x @ w) * scale[:, None, None, None] + tokens.mean(-1)[:, None, None, None] + t[:, None, None, None] / 1e3
  return apply_fn


def test_cfg_scale_one_is_conditional_and_mixes_epsilon_only():
  calls = []
  apply_fn = _toy_apply(calls)
  b = 3
  x = jax.random.normal(jax.random.PRNGKey(1), (b, 4, 4, 3))
  t = jnp.array([5, 500, 999])
  cond = (jnp.arange(b * 4.0).reshape(b, 4), jnp.array([1.0, 2.0, 3.0]))
  uncond = (jnp.zeros((b, 4)), jnp.array([0.5, 0.5, 0.5]))
  plain = np.asarray(apply_fn(x, t, cond))
  un = np.asarray(apply_fn(x, t, uncond))
  calls.clear()
  one = guidance.cfg_model_fn(apply_fn, cond, uncond, 1.0)(x, t)
  assert calls == [((2 * b, 4, 4, 3), (2 * b,))]  # one model call on the doubled batch
  np.testing.assert_allclose(one, plain, rtol=1e-6, atol=1e-6)
  three = np.asarray(guidance.cfg_model_fn(apply_fn, cond, uncond, 3.0)(x, t))
  np.testing.assert_allclose(three[..., :3], un[..., :3] + 3.0 * (plain[..., :3] - un[..., :3]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(three[..., 3:], plain[..., 3:])  # variance from the conditional half
  zero = np.asarray(guidance.cfg_model_fn(apply_fn, cond, uncond, 0.0)(x, t))
  np.testing.assert_allclose(zero[..., :3], un[..., :3], rtol=1e-6, atol=1e-6)  # scale 0: unconditional eps


def test_cfg_sampling_at_scale_one_equals_conditional_sampling():
  calls = []
  apply_fn = _toy_apply(calls)
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "10")
  cond = (jnp.ones((2, 4)), jnp.array([1.0, 0.5]))
  uncond = (jnp.zeros((2, 4)), jnp.array([0.1, 0.1]))
  guided = samplers.sample(guidance.cfg_model_fn(apply_fn, cond, uncond, 1.0), d, (2, 4, 4, 3), jax.random.PRNGKey(0))
  plain = samplers.sample(lambda x, t: apply_fn(x, t, cond), d, (2, 4, 4, 3), jax.random.PRNGKey(0))
  np.testing.assert_allclose(guided, plain, atol=1e-5)


def _conditional_pieces():
  full = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", dtype=np.float64)
  abar_full = jnp.asarray(full.alphas_cumprod, jnp.float32)
  m_y = (MU * R ** 2 + Y * S ** 2) / (S ** 2 + R ** 2)
  v_y = S ** 2 * R ** 2 / (S ** 2 + R ** 2)

  def model(x, t):  # the exact unconditional eps for N(MU, S^2) data, posterior variance channel
    ab = abar_full[t][:, None, None, None]
    eps = jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * MU) / (ab * S ** 2 + 1 - ab)
    return jnp.concatenate([eps, -jnp.ones_like(x)], -1)

  def log_p_y_given_xt(x, t):  # log p(y | x_t) up to a constant, per example
    ab = abar_full[t][:, None, None, None]
    cond = -0.5 * (x - jnp.sqrt(ab) * m_y) ** 2 / (ab * v_y + 1 - ab)
    marg = -0.5 * (x - jnp.sqrt(ab) * MU) ** 2 / (ab * S ** 2 + 1 - ab)
    return jnp.sum(cond - marg, axis=(1, 2, 3))
  return model, log_p_y_given_xt, m_y, v_y


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_score_guidance_reaches_the_exact_conditional(sampler):
  """With the exact gradient of log p(y | x_t), condition_score turns the unconditional eps into the
  conditional one, so a deterministic sampler lands on x0 | y ~ N(m_y, v_y)."""
  model, score, m_y, v_y = _conditional_pieces()
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "100" if sampler == "ddim" else "25")
  x = samplers.sample(model, d, (2048, 1, 1, 3), jax.random.PRNGKey(0), sampler=sampler, clip_denoised=False,
                      cond_fn=guidance.score_cond_fn(score, 1.0))
  x = np.asarray(x).ravel()
  n = x.size
  assert abs(x.mean() - m_y) < 5 * np.sqrt(v_y / n)
  assert abs(x.std() / np.sqrt(v_y) - 1) < 0.05
  unguided = np.asarray(samplers.sample(model, d, (512, 1, 1, 3), jax.random.PRNGKey(0), sampler=sampler,
                                        clip_denoised=False)).ravel()
  assert abs(unguided.mean() - MU) < 0.05  # the guidance is what moved it


def test_condition_mean_and_score_closed_form():
  d = schedules.create_diffusion(1000, "linear", "50")
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(k1, (2, 2, 2, 3))
  out = gaussian.p_mean_variance(d, jax.random.normal(k2, (2, 2, 2, 6)), x, jnp.array([4, 40]), clip_denoised=False)
  c, tau, scale = 0.3, 2.0, 1.5
  cond_fn = guidance.score_cond_fn(lambda xx, tt: jnp.sum(-0.5 * (xx - c) ** 2 / tau, axis=(1, 2, 3)), scale)
  grad = -(np.asarray(x) - c) / tau * scale
  t = jnp.array([4, 40])
  np.testing.assert_allclose(gaussian.condition_mean(d, cond_fn, out, x, t),
                             np.asarray(out.mean) + np.asarray(out.variance) * grad, rtol=1e-5, atol=1e-6)
  guided = gaussian.condition_score(d, cond_fn, out, x, t)
  abar = d.alphas_cumprod[[4, 40]][:, None, None, None]
  eps = (np.asarray(x) / np.sqrt(abar) - np.asarray(out.pred_xstart)) / np.sqrt(1 / abar - 1)
  eps = eps - np.sqrt(1 - abar) * grad
  np.testing.assert_allclose(guided.eps, eps, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(guided.pred_xstart, (np.asarray(x) - np.sqrt(1 - abar) * eps) / np.sqrt(abar),
                             rtol=1e-4, atol=1e-4)


def test_clip_cond_fn_matches_reference_guidance_grad(reference_dir):
  from glide_jax.interop import clip_keys
  from glide_jax.models import clip

  data = dict(np.load(reference_dir / "noised_clip.npz"))
  options = clip_keys.load_dump_config(data)["options"]
  params = clip_keys.import_clip_state_dict({k[6:]: data[k] for k in data if k.startswith("param/")}, options)
  model = clip.create_clip_model(options)
  tokens = jnp.asarray(data["input/text"], jnp.int32)
  text_len = jnp.asarray(data["input/text_len"], jnp.int32)
  image = jnp.asarray(np.transpose(data["input/image"], (0, 2, 3, 1)))
  t = jnp.asarray(data["input/timesteps"], jnp.int32)
  z_text = model.apply({"params": params}, tokens, text_len, method="encode_text")
  grad = jax.jit(guidance.clip_cond_fn(model, params, z_text, 2.0))(image, t)
  ref = np.transpose(data["output/guidance_grad"], (0, 2, 3, 1)) * 2.0
  assert np.abs(np.asarray(grad) - ref).max() / np.abs(ref).max() < 1e-4


def test_inpaint_mask_checks_and_rounding():
  with pytest.warns(UserWarning, match="inverted"):
    assert guidance.check_inpaint_mask(np.ones((1, 4, 4, 1))) == 1.0
  assert guidance.check_inpaint_mask(np.zeros((1, 4, 4, 1))) == 0.0
  with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
    guidance.check_inpaint_mask(np.ones((4, 4)))
  x = jnp.array([-1.0, -0.999, 0.0, 0.5, 0.99999, 1.2])
  r = np.asarray(guidance.round_to_uint8(x))
  np.testing.assert_allclose((r + 1) * 127.5, np.round((np.clip(np.asarray(x), -1, 1) + 1) * 127.5), atol=1e-4)
  assert guidance.UPSAMPLE_TEMPERATURE == 0.997
