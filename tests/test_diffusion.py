"""Diffusion arithmetic: parity with the reference dump, closed forms, loss gradients."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.diffusion import gaussian, losses, parity, schedules


@pytest.fixture(scope="module")
def dump(reference_dir):
  return dict(np.load(reference_dir / "diffusion.npz"))


def test_parity_every_array_float64(dump):
  errors = parity.check_diffusion_dump(dump, "float64")
  expected = {k for k in dump if k != "config" and "/input/" not in k}
  assert set(errors) == expected  # every output array is compared
  for group in ("squaredcos_cap_v2/100", "linear/fast27", "squaredcos_cap_v2/full"):
    for name in ("betas", "q_sample", "posterior_mean", "posterior_log_variance", "model_timesteps", "p_mean",
                 "p_variance", "p_log_variance", "p_pred_xstart", "p_sample", "ddim_eta0.0", "ddim_eta0.5",
                 "condition_mean"):
      assert f"{group}/output/{name}" in errors
  for sched in ("cosine", "linear"):
    for name in ("loss", "mse", "vb"):
      assert f"loss/{sched}/output/{name}" in errors
  bad = {k: v for k, v in errors.items() if not v <= 1e-6}
  assert not bad, bad


def test_parity_every_array_float32(dump):
  errors = parity.check_diffusion_dump(dump, "float32")
  bad = {k: v for k, v in errors.items() if not v <= 1e-5}
  assert not bad, bad


def test_parity_detects_a_wrong_array(dump):
  broken = dict(dump)
  key = "linear/fast27/output/p_mean"
  broken[key] = dump[key] * (1 + 1e-4)
  assert parity.check_diffusion_dump(broken)[key] > 1e-5
  with pytest.raises(KeyError, match="not_a_thing"):
    parity.check_diffusion_dump({**dump, "linear/fast27/output/not_a_thing": dump[key]})


def test_respacing_sets_match_glide(dump):
  # docs/reference.md, section 4: the published sets.
  fast27 = sorted(schedules.space_timesteps(1000, "fast27"))
  assert fast27[:3] == [0, 22, 44] and fast27[-6:] == [500, 599, 600, 799, 800, 997] and len(fast27) == 27
  hundred = sorted(schedules.space_timesteps(1000, "100"))  # stride 999/99, rounded half to even
  assert hundred[:3] == [0, 10, 20] and hundred[-1] == 999 and len(hundred) == 100
  assert max(schedules.space_timesteps(1000, "27")) == 999
  assert sorted(schedules.space_timesteps(1000, "ddim50")) == list(range(0, 1000, 20))
  assert schedules.space_timesteps(1000, "") == set(range(1000))
  for spec in ("100", "fast27", "27", "50", "10,10,10"):
    np.testing.assert_array_equal(sorted(schedules.space_timesteps(1000, spec)), dump[f"respace/{spec}"])
  with pytest.raises(ValueError, match="bad timestep respacing"):
    schedules.space_timesteps(1000, "ten")
  with pytest.raises(ValueError, match="cannot make exactly"):
    schedules.space_timesteps(1000, "ddim999")


def test_respaced_betas_keep_alpha_bar_and_original_timesteps():
  full = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", dtype=np.float64)
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "fast27", dtype=np.float64)
  np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map], rtol=1e-12)
  assert d.timestep_map[-1] == 997 and d.num_timesteps == 27
  np.testing.assert_array_equal(gaussian.model_timesteps(d, jnp.array([0, 26])), [0, 997])
  # buffers are float32 unless asked otherwise
  assert schedules.create_diffusion(1000, "linear", "100").betas.dtype == np.float32


def _squaredcos(u: float) -> float:
  """[G]'s squaredcos_cap_v2 alpha-bar before normalisation, written out here: f(t / T)."""
  return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def test_schedule_closed_forms():
  cos = schedules.get_named_beta_schedule("squaredcos_cap_v2", 1000)
  abar = np.cumprod(1 - cos)
  f = _squaredcos
  np.testing.assert_allclose(abar[:500], [f((i + 1) / 1000) / f(0) for i in range(500)], rtol=1e-10)
  assert cos[-1] == 0.999 and abs(cos[0] - 4.128e-5) < 1e-8
  lin = schedules.get_named_beta_schedule("linear", 1000)
  assert lin[0] == 1e-4 and abs(lin[-1] - 0.02) < 1e-15
  with pytest.raises(ValueError, match="unknown noise schedule"):
    schedules.get_named_beta_schedule("sigmoid", 10)


def test_q_sample_and_posterior_are_the_gaussian_posterior():
  """q(x_{t-1} | x_t, x0) from the product of the two Gaussians, computed independently."""
  d = schedules.create_diffusion(1000, "linear", "50", dtype=np.float64)
  rng = np.random.default_rng(0)
  x0, xt = rng.normal(size=(3, 2, 2, 3)), rng.normal(size=(3, 2, 2, 3))
  t = np.array([1, 17, 49])
  with jax.enable_x64(True):
    mean, var, _ = gaussian.q_posterior_mean_variance(d, jnp.asarray(x0), jnp.asarray(xt), jnp.asarray(t))
  abar = np.cumprod(1 - d.betas)
  abar_prev = np.append(1, abar[:-1])[t][:, None, None, None]
  alpha = (1 - d.betas)[t][:, None, None, None]
  # prior on x_{t-1}: N(sqrt(abar_prev) x0, 1 - abar_prev); likelihood x_t | x_{t-1}: N(sqrt(alpha) x, 1 - alpha)
  prec = 1 / (1 - abar_prev) + alpha / (1 - alpha)
  ref_mean = (np.sqrt(abar_prev) * x0 / (1 - abar_prev) + np.sqrt(alpha) * xt / (1 - alpha)) / prec
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-9)
  np.testing.assert_allclose(np.broadcast_to(var, x0.shape), np.broadcast_to(1 / prec, x0.shape), rtol=1e-9)


def test_eps_xstart_roundtrip_and_learned_range_endpoints():
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "100")
  key = jax.random.PRNGKey(1)
  x, eps = jax.random.normal(key, (2, 4, 4, 3, 2)).transpose(4, 0, 1, 2, 3)
  t = jnp.array([3, 90])
  x0 = gaussian.predict_xstart_from_eps(d, x, t, eps)
  np.testing.assert_allclose(gaussian.predict_eps_from_xstart(d, x, t, x0), eps, rtol=1e-4, atol=1e-4)
  var_hi, _ = gaussian.learned_range_variance(d, jnp.ones_like(x), t)
  var_lo, _ = gaussian.learned_range_variance(d, -jnp.ones_like(x), t)
  np.testing.assert_allclose(var_hi[:, 0, 0, 0], d.betas[[3, 90]], rtol=1e-5)
  np.testing.assert_allclose(var_lo[:, 0, 0, 0], d.posterior_variance[[3, 90]], rtol=1e-5)


def test_discretized_likelihood_sums_to_one_over_bins():
  """The 256 bins of the discretised Gaussian partition the line: probabilities sum to 1."""
  x = jnp.asarray(np.arange(256) / 127.5 - 1)
  for mean, log_scale in ((0.1, -2.0), (-0.7, -4.0), (0.95, -1.0)):
    logp = losses.discretized_gaussian_log_likelihood(x, jnp.full_like(x, mean), jnp.full_like(x, log_scale))
    assert abs(float(jnp.sum(jnp.exp(logp))) - 1) < 2e-3


def test_hybrid_loss_gradients_and_terms():
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "")
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jnp.clip(jax.random.normal(k1, (4, 4, 4, 3)) * 0.5, -1, 1)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([0, 1, 500, 999])
  out0 = jax.random.normal(k3, (4, 4, 4, 6)) * 0.3

  def term(name, out):
    return jnp.sum(losses.training_losses(d, lambda x, tt: out, x0, t, noise)[name])

  g_vb = jax.jit(jax.grad(lambda o: term("vb", o)))(out0)
  g_mse = jax.jit(jax.grad(lambda o: term("mse", o)))(out0)
  assert float(jnp.abs(g_vb[..., :3]).max()) == 0.0  # stop-gradient on the mean
  assert float(jnp.abs(g_vb[..., 3:]).max()) > 0
  assert float(jnp.abs(g_mse[..., 3:]).max()) == 0.0
  terms = losses.training_losses(d, lambda x, tt: out0, x0, t, noise)
  np.testing.assert_allclose(terms["mse"], np.mean((np.asarray(noise) - np.asarray(out0[..., :3])) ** 2, axis=(1, 2, 3)),
                             rtol=1e-5)
  np.testing.assert_allclose(terms["loss"], terms["mse"] + terms["vb"], rtol=1e-6)
  # vb at t > 0 is a KL: it vanishes when the model's mean and variance are the true posterior's.
  x_t = gaussian.q_sample(d, x0, t, noise)
  v_exact = -jnp.ones_like(x0)  # posterior log-variance (clipped) at v = -1
  perfect = jnp.concatenate([noise, v_exact], -1)
  vb = losses.training_losses(d, lambda x, tt: perfect, x0, t, noise)["vb"]
  assert float(jnp.abs(vb[2])) < 1e-4 and float(x_t.std()) > 0


def test_model_sees_original_timesteps_in_the_loss():
  d = schedules.create_diffusion(1000, "linear", "fast27")
  seen = []

  def model_fn(x, tt):
    seen.append(np.asarray(tt))
    return jnp.zeros(x.shape[:-1] + (6,))
  x = jnp.zeros((2, 2, 2, 3))
  losses.training_losses(d, model_fn, x, jnp.array([0, 26]), x)
  np.testing.assert_array_equal(seen[0], [0, 997])


# ----------------------------------------------------------------------------- v-prediction
def test_v_prediction_recovers_x0_and_eps_in_closed_form():
  """A model that outputs the exact velocity gives back the true x0 and epsilon at every t,
  including the noisiest steps, where 1/sqrt(abar) is ~2e4 for the cosine schedule."""
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", dtype=np.float64, prediction="v")
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (5, 4, 4, 3))
  noise = rng.standard_normal((5, 4, 4, 3))
  t = jnp.array([0, 250, 600, 900, 999])
  abar = np.asarray(d.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  v = np.sqrt(abar) * noise - np.sqrt(1 - abar) * x0  # Salimans & Ho 2022, eq. (11)
  np.testing.assert_allclose(gaussian.v_target(d, x0, t, noise), v, atol=1e-6)
  out = gaussian.p_mean_variance(d, jnp.concatenate([v, np.zeros_like(v)], -1), x_t, t, clip_denoised=False)
  np.testing.assert_allclose(out.eps, noise, atol=1e-5)
  # float32 (x64 is off): x0 comes straight from v, so even t = 999 keeps ~1e-6 accuracy.
  np.testing.assert_allclose(out.pred_xstart, x0, atol=1e-5)
  # The same model as epsilon-prediction would read v as noise: a different x0 (guards the branch).
  eps_d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", dtype=np.float64)
  wrong = gaussian.p_mean_variance(eps_d, jnp.concatenate([v, np.zeros_like(v)], -1), x_t, t, clip_denoised=False)
  assert float(jnp.abs(wrong.pred_xstart - x0).max()) > 0.1


def test_v_prediction_loss_target_and_respacing_keep_the_prediction():
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", prediction="v")
  k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
  x0 = jax.random.uniform(k1, (3, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  t = jnp.array([3, 500, 990])
  out = jax.random.normal(k3, (3, 4, 4, 6)) * 0.3
  ab = np.asarray(d.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  v = np.sqrt(ab) * np.asarray(noise) - np.sqrt(1 - ab) * np.asarray(x0)
  terms = losses.training_losses(d, lambda x, tt: out, x0, t, noise)
  np.testing.assert_allclose(terms["mse"], np.mean((v - np.asarray(out[..., :3])) ** 2, axis=(1, 2, 3)), rtol=1e-5)
  exact = jnp.concatenate([jnp.asarray(v, jnp.float32), out[..., 3:]], -1)
  assert float(losses.training_losses(d, lambda x, tt: exact, x0, t, noise)["mse"].max()) < 1e-10
  # vb still trains only the variance channels.
  g = jax.grad(lambda o: jnp.sum(losses.training_losses(d, lambda x, tt: o, x0, t, noise)["vb"]))(out)
  assert float(jnp.abs(g[..., :3]).max()) == 0.0 and float(jnp.abs(g[..., 3:]).max()) > 0
  r = schedules.create_diffusion(1000, "squaredcos_cap_v2", "50", prediction="v")
  assert r.prediction == "v" and r.num_timesteps == 50
  with pytest.raises(ValueError, match="unknown model prediction 'score'"):
    schedules.create_diffusion(1000, "linear", "", prediction="score")


def _cosine_alpha_bar(T: int) -> np.ndarray:
  """[G]'s squaredcos_cap_v2 cumulative alphas in float64 (betas capped at 0.999)."""
  f = _squaredcos
  betas = np.array([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)])
  return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction,snr_offset", [("v", 1.0), ("epsilon", 0.0)])
def test_min_snr_caps_the_weight_on_x0_errors_at_gamma(prediction, snr_offset):
  """With Min-SNR-gamma the weighted MSE is min(w, gamma) times the x0 error, w = SNR + 1 for v and
  SNR for epsilon: checked against x0 recovered from the prediction in float64 by hand."""
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "", prediction=prediction)
  k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
  x0 = jax.random.uniform(k1, (4, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  out = jax.random.normal(k3, (4, 4, 4, 6)) * 0.5
  t = jnp.array([150, 420, 700, 990])
  gamma = 5.0
  capped = losses.training_losses(d, lambda x, tt: out, x0, t, noise, min_snr_gamma=gamma)
  plain = losses.training_losses(d, lambda x, tt: out, x0, t, noise)
  np.testing.assert_allclose(plain["loss"], plain["mse"] + plain["vb"], rtol=1e-6)
  np.testing.assert_allclose(capped["mse"], plain["mse"], rtol=1e-6)  # reported unweighted

  abar = _cosine_alpha_bar(1000)[np.asarray(t)][:, None, None, None]
  x0_, eps, pred = (np.asarray(a, np.float64) for a in (x0, noise, out[..., :3]))
  x_t = np.sqrt(abar) * x0_ + np.sqrt(1 - abar) * eps
  if prediction == "v":
    x0_hat = np.sqrt(abar) * x_t - np.sqrt(1 - abar) * pred
  else:
    x0_hat = (x_t - np.sqrt(1 - abar) * pred) / np.sqrt(abar)
  x0_err = np.mean((x0_ - x0_hat) ** 2, axis=(1, 2, 3))
  w = (abar / (1 - abar)).ravel() + snr_offset
  np.testing.assert_allclose(plain["mse"], w * x0_err, rtol=2e-4)  # the target's own weight
  np.testing.assert_allclose(capped["loss"] - capped["vb"], np.minimum(w, gamma) * x0_err, rtol=2e-4)
  assert w[0] > gamma > w[-1]  # the cap bites on the clean end only


def test_min_snr_gamma_from_the_config_reaches_the_train_loss():
  import train_support as ts

  from glide_jax.train import stages
  per_example = {}
  for gamma in (0.0, 2.0):
    stage = stages.make_stage(ts.tiny_config("base", "--config.diffusion.prediction=v",
                                             f"--config.diffusion.min_snr_gamma={gamma}"))
    params = jax.tree_util.tree_map(lambda x: getattr(x, "value", x), stage.init(jax.random.key(0)),
                                    is_leaf=lambda x: hasattr(x, "value"))
    k1, k2 = jax.random.split(jax.random.key(1))
    t = jnp.array([0, 10, 25, 49])
    batch = {"image": jax.random.uniform(k1, (4, 8, 8, 3), minval=-1, maxval=1), "noise": jax.random.normal(k2, (4, 8, 8, 3)),
             "tokens": jnp.ones((4, 8), jnp.int32), "mask": jnp.ones((4, 8), bool), "t": t, "weights": jnp.ones(4)}
    _, aux = stage.loss(params, batch, jax.random.key(2))
    per_example[gamma] = (np.asarray(aux["losses"]), np.asarray(aux["mse"]), np.asarray(aux["vb"]))
  (l0, mse, vb), (l2, mse2, _) = per_example[0.0], per_example[2.0]
  np.testing.assert_allclose(mse2, mse, rtol=1e-5)
  weight = np.asarray(losses.min_snr_weight(stage.diffusion, t, 2.0))
  assert weight[0] < 1.0 and weight[-1] == 1.0
  np.testing.assert_allclose(l2, weight * mse + vb, rtol=1e-5)
  np.testing.assert_allclose(l0, mse + vb, rtol=1e-5)


def _eval_with_division_one_ulp_off(closed, *args):
  """Evaluates a closed jaxpr with every `div` result moved one ulp up: what a device whose float32
  division is not correctly rounded (GPUs') may return. Recurses into nested jitted calls."""
  def run(jaxpr, consts, vals):
    env = {}
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
    for var, val in zip(jaxpr.constvars, consts):
      env[var] = val
    for var, val in zip(jaxpr.invars, vals):
      env[var] = val
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      sub = eqn.params.get("jaxpr")
      if sub is not None and hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
        outs = run(sub.jaxpr, sub.consts, ins)
      else:
        outs = eqn.primitive.bind(*ins, **eqn.params)
        if eqn.primitive is jax.lax.div_p and jnp.issubdtype(outs.dtype, jnp.floating):
          outs = jnp.nextafter(outs, jnp.full_like(outs, jnp.inf))
        outs = outs if eqn.primitive.multiple_results else [outs]
      for var, val in zip(eqn.outvars, outs):
        env[var] = val
    return [read(v) for v in jaxpr.outvars]
  return run(closed.jaxpr, closed.consts, list(args))


def test_ddim_sigma_does_not_depend_on_the_devices_division(dump):
  # The full cosine schedule at t = 1, where 1 - abar / abar_prev cancels (beta ~ 4.6e-5): one ulp
  # off in that division moved the eta 0.5 step by 4.06e-5 (relative to the dump), the error
  # the H200 showed; with sigma from the host-built table the step no longer divides there.
  prefix = "squaredcos_cap_v2/full"
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2")
  nhwc = lambda name: jnp.asarray(np.moveaxis(dump[f"{prefix}/input/{name}"], 1, -1), jnp.float32)
  t = jnp.asarray(dump[f"{prefix}/input/t"], jnp.int32)
  out = gaussian.p_mean_variance(d, nhwc("model_out"), nhwc("x_t"), t, clip_denoised=True)
  step = lambda x, noise: gaussian.ddim_step(d, out, x, t, noise, 0.5)
  exact = step(nhwc("x_t"), nhwc("step_noise"))
  closed = jax.make_jaxpr(step)(nhwc("x_t"), nhwc("step_noise"))
  (nudged,) = _eval_with_division_one_ulp_off(closed, nhwc("x_t"), nhwc("step_noise"))
  ref = dump[f"{prefix}/output/ddim_eta0.5"]
  assert parity.relative_error(np.moveaxis(np.asarray(exact), -1, 1), ref) <= 1e-6
  assert parity.relative_error(np.moveaxis(np.asarray(nudged), -1, 1), ref) <= 1e-6


def test_ddim_sigma_table_is_the_reference_formula():
  # [G] ddim_sample: eta * sqrt((1 - abar_prev) / (1 - abar)) * sqrt(1 - abar / abar_prev), formed
  # from the float32 buffers in float32; independently here in float64 from the betas.
  d = schedules.create_diffusion(1000, "squaredcos_cap_v2", "100")
  abar = np.cumprod(1 - np.asarray(d.betas, np.float64))
  abar_prev = np.append(1.0, abar[:-1])
  closed = np.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))
  assert d.ddim_sigma_unit.dtype == np.float32
  # float32's own cancellation at the smallest t: 2.3e-4 relative at index 1, 1e-6 elsewhere.
  np.testing.assert_allclose(d.ddim_sigma_unit, closed, rtol=1e-3, atol=0)
  np.testing.assert_allclose(d.ddim_sigma_unit[2:], closed[2:], rtol=1e-5)
  assert d.ddim_sigma_unit[0] == 0.0
