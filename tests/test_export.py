"""`glide-jax export`: workdir -> bundle (EMA by default, bf16, tokenizer), loadable by the sampler,
and the jax.export-serialized sampler equals the in-process one."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts

from glide_jax import bundle, cli
from glide_jax.commands import export as export_cmd
from glide_jax.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  # From perturbed parameters: GLIDE's zero output layer would make every sample ignore the
  # parameters, tokens and guidance scale, and an all-zero export look right.
  ts.session_cache(tmp_path_factory)
  workdir = tmp_path_factory.mktemp("wd")
  init = ts.perturbed_bundle(ts.tiny_config("base"), tmp_path_factory.mktemp("init") / "bundle")
  config = ts.tiny_config("base", "--config.total_steps=2", "--config.sampling.steps=3", *ts.mesh_overrides(1, 8),
                          f"--config.init_from={init}")
  result = train.train(config, str(workdir), data_iterator=ts.SyntheticIterator(config),
                       tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  return workdir, config, result


def test_export_writes_ema_params_and_the_sampler_loads_them(trained, tmp_path):
  workdir, config, result = trained
  out = tmp_path / "bundle"
  assert cli.main(["export", "--workdir", str(workdir), "--out", str(out)]) == 0
  params, meta = bundle.load_bundle(out)
  ema = jax.device_get(result["state"].ema[repr(float(config.ema.rates[0]))])
  raw = jax.device_get(result["state"].params)
  for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(ema), jax.tree.leaves(raw)):
    got = params
    for k in p:
      got = got[k.key]
    np.testing.assert_array_equal(got, a)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema), jax.tree.leaves(raw)))
  assert meta["model"]["kind"] == "text2im" and meta["model"]["options"]["image_size"] == 8
  assert meta["tokenizer"]["type"] == "words" and meta["source"]["params"] == "ema"
  from glide_jax.sampling import load_sampler_model
  sm = load_sampler_model(out)
  assert sm.image_size == 8 and sm.tokenizer.text_ctx == 8

  assert cli.main(["export", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2


def test_bf16_export_holds_the_rounded_params_and_samples_like_float32(trained, tmp_path):
  import ml_dtypes

  from glide_jax import sampling

  workdir, _, result = trained
  for name, extra in (("b16", ["--bf16"]), ("b32", [])):
    assert cli.main(["export", "--workdir", str(workdir), "--out", str(tmp_path / name), "--params", "raw",
                     *extra]) == 0
  p16, m16 = bundle.load_bundle(tmp_path / "b16")
  assert m16["dtype"] == "bfloat16"
  flat16 = bundle.flatten_params(p16)
  raw = bundle.flatten_params(jax.device_get(result["state"].params))
  assert flat16.keys() == raw.keys()
  for k, v in raw.items():  # every leaf: the trained value rounded to bf16, nothing else
    assert str(flat16[k].dtype) == "bfloat16", k
    np.testing.assert_array_equal(flat16[k].astype(np.float32),
                                  np.asarray(v).astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=k)
  # Loaded and sampled: the bf16 bundle samples what the float32 one does, to bf16's precision.
  prompts, key = ["a red circle", "a big blue square"], jax.random.PRNGKey(0)
  x16, x32 = (sampling.generate(sampling.load_sampler_model(tmp_path / n), prompts, key, guidance_scale=3.0,
                                progress=lambda done: None) for n in ("b16", "b32"))
  assert np.all(np.isfinite(x16))
  assert np.abs(x16 - x32).max() < 0.05, np.abs(x16 - x32).max()
  assert np.abs(x32[0] - x32[1]).max() > 0.1  # the prompts (and parameters) matter at all


def test_serialized_sampler_samples_what_generate_does(trained, tmp_path):
  # The serialized sampler against sampling.generate, for two token rows and two guidance scales:
  # both trace pipeline.sampling_program, so this checks what the export adds (which input feeds
  # which argument, the raw key, the bundle's settings): each input must act exactly as in generate.
  from glide_jax import sampling

  workdir, config, _ = trained
  path = export_cmd.export(str(workdir), str(tmp_path / "s"), serialize=True, serialize_batch=2)
  spec = json.loads((path / "sampler.json").read_text())
  assert spec["batch"] == 2
  params, _ = bundle.load_bundle(path)
  exported = jax.export.deserialize(bytearray((path / "sampler.jax_exported").read_bytes()))
  tok = ts.tokenizer(config)
  ut, um = tok.empty(2)
  key = jax.random.key(7)
  first = (np.tile(np.arange(1, 9, dtype=np.int32), (2, 1)), np.ones((2, 8), bool))
  mask = np.arange(8)[None] < np.array([[3], [6]])
  second = (np.where(mask, np.arange(20, 28, dtype=np.int32)[None], 0).astype(np.int32), mask)

  def served(tokens, g):
    return np.asarray(exported.call(params, *tokens, ut, um, jax.random.key_data(key), jnp.float32(g)))

  def direct(tokens, g):
    sm = sampling.load_sampler_model(path, tokenizer=_FixedTokens(*tokens, tok))
    return sampling.generate(sm, ["a", "b"], key, guidance_scale=g, progress=lambda done: None)

  s13, s23, s11 = served(first, 3.0), served(second, 3.0), served(first, 1.0)
  assert s13.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(s13, direct(first, 3.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s23, direct(second, 3.0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(s11, direct(first, 1.0), rtol=1e-5, atol=1e-5)
  assert np.abs(s13 - s23).max() > 1e-2 and np.abs(s13 - s11).max() > 1e-2


class _FixedTokens:
  """A tokenizer for `sampling.generate` that returns given token rows (so both samplers see the same ids)."""

  def __init__(self, tokens, mask, tokenizer):
    self.tokens, self.mask, self.tokenizer = tokens, mask, tokenizer
    self.text_ctx = tokenizer.text_ctx

  def encode_batch(self, prompts):
    assert len(prompts) == len(self.tokens)
    return self.tokens, self.mask

  def empty(self, b):
    return self.tokenizer.empty(b)


@pytest.mark.parametrize("stage", ["upsample", "upsample-residual", "inpaint", "upsample-inpaint"])
def test_serialized_upsample_and_inpaint_samplers_equal_generate(stage, tmp_path, tmp_path_factory):
  from glide_jax import sampling

  ts.session_cache(tmp_path_factory)
  extra, arg = [], ""
  if stage == "upsample-residual":  # diffusion.upsample_residual: both add bicubic(low_res) back
    stage, extra = "upsample", ["--config.diffusion.upsample_residual=bicubic", "--config.diffusion.prediction=x0"]
  if stage == "upsample-inpaint":  # configs/inpaint.py:upsample, kind upsample_inpaint
    stage, arg = "inpaint", "upsample"
  config = ts.tiny_config(stage, "--config.total_steps=1", "--config.sampling.steps=3", *ts.mesh_overrides(1, 8),
                          *extra, arg=arg)
  stage = export_cmd.signature_name(config)
  train.train(config, str(tmp_path / "wd"), data_iterator=ts.SyntheticIterator(config),
              tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  path = export_cmd.export(str(tmp_path / "wd"), str(tmp_path / "b"), serialize=True, serialize_batch=2)
  spec = json.loads((path / "sampler.json").read_text())
  params, meta = bundle.load_bundle(path)
  exported = jax.export.deserialize(bytearray((path / "sampler.jax_exported").read_bytes()))
  # After one step the zero-initialised output layer still predicts eps = 0, whatever the inputs;
  # perturbed params (params are an input of both samplers) make every input count.
  r = np.random.RandomState(0)
  params = jax.tree.map(lambda p: (p + 0.05 * r.standard_normal(p.shape)).astype(np.float32), params)

  tok = ts.tokenizer(config)
  tokens = np.tile(np.arange(1, 9, dtype=np.int32), (2, 1))
  mask = np.arange(8)[None] < np.array([[5], [8]])
  tokens = np.where(mask, tokens, 0).astype(np.int32)
  sm = sampling.load_sampler_model(path, tokenizer=_FixedTokens(tokens, mask, tok))
  sm.params = jax.tree.map(jnp.asarray, params)
  key = jax.random.key(11)
  if stage == "upsample":
    assert meta["model"]["kind"] == "upsample" and spec["low_res_size"] == 4
    low_res = r.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)  # off the 8-bit grid: both round it
    direct = sampling.generate(sm, ["a", "b"], key, low_res=low_res, temperature=0.997)
    served = exported.call(params, tokens, mask, low_res, jax.random.key_data(key), jnp.float32(0.997))
    other = exported.call(params, tokens, mask, -low_res, jax.random.key_data(key), jnp.float32(0.997))
  elif stage == "upsample_inpaint":
    assert meta["model"]["kind"] == "upsample_inpaint" and spec["low_res_size"] == 4
    low_res = r.uniform(-1, 1, (2, 4, 4, 3)).astype(np.float32)
    image = r.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    known = np.zeros((2, 8, 8, 1), np.float32)
    known[:, :4] = 1.0  # keep the top half
    direct = sampling.generate(sm, ["a", "b"], key, low_res=low_res, inpaint_image=image, inpaint_mask=known,
                               temperature=0.997)
    served = exported.call(params, tokens, mask, low_res, image, known, jax.random.key_data(key), jnp.float32(0.997))
    other = exported.call(params, tokens, mask, low_res, -image, known, jax.random.key_data(key),
                          jnp.float32(0.997))
  else:
    assert meta["model"]["kind"] == "inpaint"
    image = r.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    known = np.zeros((2, 8, 8, 1), np.float32)
    known[:, :, :4] = 1.0  # keep the left half
    ut, um = tok.empty(2)
    direct = sampling.generate(sm, ["a", "b"], key, guidance_scale=3.0, inpaint_image=image, inpaint_mask=known)
    served = exported.call(params, tokens, mask, ut, um, image, known, jax.random.key_data(key), jnp.float32(3.0))
    other = exported.call(params, tokens, mask, ut, um, -image, known, jax.random.key_data(key), jnp.float32(3.0))
  assert spec["inputs"][0] == "params" and len(spec["inputs"]) == 1 + len(export_cmd.SIGNATURES[stage])
  assert served.shape == direct.shape == (2, 8, 8, 3)
  np.testing.assert_allclose(np.asarray(served), direct, rtol=1e-5, atol=1e-5)
  # the conditioning image is an input that matters, not a constant folded in at export
  assert np.max(np.abs(np.asarray(other) - direct)) > 1e-2
