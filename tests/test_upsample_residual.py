"""The x0 prediction target and residual upsampling (`diffusion.prediction = 'x0'`,
`diffusion.upsample_residual`): closed forms, the training loss, and the sampler end to end on a
tiny upsampler whose zero-initialised output layer predicts x0 = 0 (docs/diffusion.md)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glide_jax.data import tokenizers
from glide_jax.diffusion import gaussian, losses, residual, samplers, schedules
from glide_jax.diffusion.pipeline import SamplerModel, generate
from glide_jax.models import registry
from glide_jax.train import stages
from tests import train_support as ts

TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1", attention_resolutions="8",
            num_heads=1, num_head_channels=32, text_ctx=8, xf_width=32, xf_layers=1, xf_heads=1, n_vocab=64)


# ----------------------------------------------------------------------------- x0 prediction
def test_x0_prediction_gives_back_x0_and_recovers_eps_in_closed_form():
  d = schedules.create_diffusion(1000, "linear", "", dtype=np.float64, prediction="x0")
  rng = np.random.default_rng(0)
  x0 = rng.uniform(-1, 1, (4, 4, 4, 3))
  noise = rng.standard_normal(x0.shape)
  t = jnp.array([1, 300, 700, 999])
  abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[np.asarray(t)][:, None, None, None]
  x_t = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
  out = gaussian.p_mean_variance(d, jnp.concatenate([x0, np.zeros_like(x0)], -1), x_t, t, clip_denoised=False)
  np.testing.assert_allclose(out.pred_xstart, x0, atol=1e-6)
  np.testing.assert_allclose(out.eps, noise, atol=2e-4)  # eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
  # Read as epsilon, the same output would be a different x0 (guards the branch).
  eps_d = schedules.create_diffusion(1000, "linear", "", dtype=np.float64)
  wrong = gaussian.p_mean_variance(eps_d, jnp.concatenate([x0, np.zeros_like(x0)], -1), x_t, t, clip_denoised=False)
  assert float(jnp.abs(wrong.pred_xstart - x0).max()) > 0.1


def _x0_loss_inputs(seed: int):
  """An x0-prediction diffusion, a batch of 3 images, noise, a random 6-channel model output, t."""
  d = schedules.create_diffusion(1000, "linear", "", prediction="x0")
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x0 = jax.random.uniform(k1, (3, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(k2, x0.shape)
  out = jax.random.normal(k3, (3, 4, 4, 6)) * 0.3
  return d, x0, noise, out, jnp.array([0, 400, 999])


def test_x0_prediction_loss_is_the_mse_on_x0():
  d, x0, noise, out, t = _x0_loss_inputs(2)
  terms = losses.training_losses(d, lambda x, tt: out, x0, t, noise)
  np.testing.assert_allclose(terms["mse"], np.mean((np.asarray(x0) - np.asarray(out[..., :3])) ** 2, axis=(1, 2, 3)),
                             rtol=1e-5)
  exact = jnp.concatenate([x0, out[..., 3:]], -1)
  assert float(losses.training_losses(d, lambda x, tt: exact, x0, t, noise)["mse"].max()) == 0.0


def test_ddim_with_an_exact_x0_model_returns_x0():
  """A model that always predicts the same x0 is sampled to exactly it (DDIM, eta 0): every step's
  x0 estimate is that image, and the last step returns it."""
  d = schedules.create_diffusion(1000, "linear", "10", prediction="x0")
  target = jnp.linspace(-0.9, 0.9, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3)
  model_fn = lambda x, t: jnp.concatenate([target, jnp.zeros_like(target)], -1)
  out = samplers.sample(model_fn, d, (2, 4, 4, 3), jax.random.key(0), sampler="ddim")
  np.testing.assert_allclose(out, target, atol=1e-5)


def test_vb_weight_scales_the_vlb_term_of_the_loss():
  d, x0, noise, out, t = _x0_loss_inputs(6)
  full = losses.training_losses(d, lambda x, tt: out, x0, t, noise)
  quarter = losses.training_losses(d, lambda x, tt: out, x0, t, noise, vb_weight=0.25)
  np.testing.assert_allclose(full["loss"], full["mse"] + full["vb"], rtol=1e-6)
  np.testing.assert_allclose(quarter["loss"], full["mse"] + 0.25 * full["vb"], rtol=1e-6)
  np.testing.assert_allclose(quarter["vb"], full["vb"])  # reported unweighted
  # With weight 0 nothing trains the variance channels.
  g = jax.grad(lambda o: jnp.sum(losses.training_losses(d, lambda x, tt: o, x0, t, noise, vb_weight=0.0)["loss"]))(out)
  assert float(jnp.abs(g[..., 3:]).max()) == 0.0 and float(jnp.abs(g[..., :3]).max()) > 0


# ----------------------------------------------------------------------------- residual
@pytest.mark.parametrize("method", ["bicubic", "bilinear"])
def test_upsample_base_is_exact_on_a_linear_ramp(method):
  """Both interpolations reproduce a linear function exactly away from the border: with half-pixel
  centres, output pixel j of a 4x upsampling sits at input coordinate (j + 0.5) / 4 - 0.5."""
  low = np.broadcast_to((0.1 * np.arange(8) - 0.3)[None, None, :, None], (1, 8, 8, 3)).astype(np.float32)
  up = np.asarray(residual.upsample_base(low, 32, method))
  j = np.arange(32)
  expected = 0.1 * ((j + 0.5) / 4 - 0.5) - 0.3
  inner = slice(8, 24)  # two input pixels from each border: the cubic kernel's support
  np.testing.assert_allclose(up[0, 5, inner, 0], expected[inner], atol=1e-6)
  np.testing.assert_allclose(up[0, :, 12, 1], np.full(32, expected[12]), atol=1e-6)  # constant along y


def test_residual_setting_is_checked_and_defaults_to_glide():
  assert residual.residual_of({}) == "" and residual.residual_of({"upsample_residual": "bicubic"}) == "bicubic"
  with pytest.raises(ValueError, match="upsample_residual 'cubic'"):
    residual.residual_of({"upsample_residual": "cubic"})
  assert ts.tiny_config("upsample").diffusion.upsample_residual == ""
  with pytest.raises(ValueError, match="needs an upsampler"):
    stages.make_stage(ts.tiny_config("base", "--config.diffusion.upsample_residual=bicubic"))


def _stage_loss(residual_name: str, prediction: str = "x0", vb_weight: float = 1.0):
  config = ts.tiny_config("upsample", "--config.model.options.dropout=0.0",
                          f"--config.diffusion.prediction={prediction}",
                          f"--config.diffusion.upsample_residual={residual_name}",
                          f"--config.diffusion.vb_weight={vb_weight}")
  stage = stages.make_stage(config)
  params = jax.device_get(nn.meta.unbox(stage.init(jax.random.key(0))))
  rng = np.random.default_rng(1)
  low = rng.uniform(-0.8, 0.8, (2, 4, 4, 3)).astype(np.float32)
  return stage, params, low


def test_residual_training_diffuses_image_minus_the_interpolated_input():
  """With x0 prediction a fresh upsampler outputs x0 = 0 (zero-initialised output layer), so its MSE
  is the mean square of what is diffused: image - bicubic(low_res) with the residual, the image
  without it. The image is built as bicubic(low_res) + 0.25, so the residual MSE is 0.0625."""
  stage, params, low = _stage_loss("bicubic")
  base = np.asarray(jax.image.resize(low, (2, 8, 8, 3), "cubic"))  # a second path to the base
  image = base + 0.25
  batch = {"image": jnp.asarray(image), "low_res": jnp.asarray(low), "tokens": jnp.zeros((2, 8), jnp.int32),
           "mask": jnp.ones((2, 8), bool), "t": jnp.array([3, 40]), "weights": jnp.ones(2),
           "noise": jax.random.normal(jax.random.key(3), image.shape)}
  _, aux = stage.loss(params, batch, jax.random.key(4))
  np.testing.assert_allclose(aux["mse"], [0.0625, 0.0625], rtol=1e-5)
  np.testing.assert_allclose(aux["losses"], aux["mse"] + aux["vb"], rtol=1e-6)  # GLIDE's hybrid loss
  # diffusion.vb_weight reaches the stage's loss: 0 leaves the MSE alone.
  light, params_l, _ = _stage_loss("bicubic", vb_weight=0.0)
  total, aux_l = light.loss(params_l, batch, jax.random.key(4))
  assert float(jnp.min(aux_l["vb"])) > 0
  np.testing.assert_allclose(aux_l["losses"], aux_l["mse"], rtol=1e-6)
  np.testing.assert_allclose(total, np.mean(aux_l["mse"]), rtol=1e-6)
  plain, params0, _ = _stage_loss("")
  _, aux0 = plain.loss(params0, batch, jax.random.key(4))
  np.testing.assert_allclose(aux0["mse"], np.mean(image ** 2, axis=(1, 2, 3)), rtol=1e-5)


def _sampler_model(settings: dict, output_bias: float = 0.0) -> SamplerModel:
  model = registry.create_model("upsample", TINY)
  params = jax.device_get(nn.meta.unbox(
      model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, **model.dummy_inputs(1, 8))["params"]))
  if output_bias:  # the model then predicts x0 = output_bias everywhere
    params["out_2"]["bias"] = np.concatenate([np.full(3, output_bias, np.float32), np.zeros(3, np.float32)])
  tok = tokenizers.load_tokenizer({"type": "words", "text_ctx": 8})
  s = dict(steps=100, noise_schedule="linear", timestep_respacing="5", sampler="ddim", prediction="x0")
  s.update(settings)
  return SamplerModel(kind="upsample", model=model, params=params, meta={}, tokenizer=tok, image_size=8,
                      diffusion_settings=s)


def test_residual_sampling_starts_at_the_interpolation_and_clamps_the_image():
  rng = np.random.default_rng(5)
  low = np.round((rng.uniform(-1, 1, (2, 2, 2, 3)) + 1) * 127.5) / 127.5 - 1  # already on the 8-bit grid
  low[0, 0, 0] = [1.0, -1.0, 1.0]  # extremes: bicubic overshoots [-1, 1] next to them
  cubic = np.asarray(jax.image.resize(low.astype(np.float32), (2, 8, 8, 3), "cubic"))
  assert cubic.max() > 1.0 or cubic.min() < -1.0
  prompts = ["a red circle", "a blue square"]
  # x0 = 0: the residual sample is 0, the image the bicubic interpolation (clamped into [-1, 1]).
  out = generate(_sampler_model({"upsample_residual": "bicubic"}), prompts, jax.random.key(1), low_res=low)
  np.testing.assert_allclose(out, np.clip(cubic, -1, 1), atol=1e-5)
  # GLIDE's semantics: the same model samples the image x0 = 0.
  out = generate(_sampler_model({}), prompts, jax.random.key(1), low_res=low)
  np.testing.assert_allclose(out, 0.0, atol=1e-5)
  # The clamp acts on the image, not on the residual: a residual of +3 gives a white image.
  out = generate(_sampler_model({"upsample_residual": "bicubic"}, output_bias=3.0), prompts, jax.random.key(1),
                 low_res=low)
  np.testing.assert_allclose(out, 1.0, atol=1e-5)
  # Bilinear is its own base (and its own compiled sampler).
  lin = np.asarray(jax.image.resize(low.astype(np.float32), (2, 8, 8, 3), "linear"))
  out = generate(_sampler_model({"upsample_residual": "bilinear"}), prompts, jax.random.key(1), low_res=low)
  np.testing.assert_allclose(out, np.clip(lin, -1, 1), atol=1e-5)
  with pytest.raises(ValueError, match="takes no threshold"):
    generate(_sampler_model({"upsample_residual": "bicubic"}), prompts, jax.random.key(1), low_res=low,
             threshold=("dynamic", 0.9))
