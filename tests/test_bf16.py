"""bfloat16 end to end at tiny sizes: every config variant that computes in bf16 trains two steps of
its own program (remat, scanned layers, fsdp mesh, optimizer, EMA as configured) with float32
parameters, and a bf16 bundle sampled in bf16 stays close to the float32 bundle sampled in float32.

At tiny sizes released and small build the same program (the persistent compile cache of
train_support.session_cache compiles it once): 11 distinct steps for 15 variants."""
from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts

from glide_jax import config_lib

STAGES = ("base", "upsample", "inpaint", "inpaint:upsample", "clip")
VARIANTS = ("released", "full", "small", "tiny")


def _spec(stage: str, variant: str) -> str:
  name, _, flag = stage.partition(":")
  return f"configs/{name}.py:variant={variant}" + (f",{flag}" if flag else "")


ALL_SPECS = [_spec(s, v) for s in STAGES for v in VARIANTS]
BF16_SPECS = [s for s in ALL_SPECS if config_lib.load_config(s).model.dtype == "bfloat16"]

# Tiny sizes for every option that sets a width, depth or length; the rest of the variant stays.
UNET_SIZES = ts.UNET_TINY + ["--config.model.options.num_channels=32", "--config.model.options.num_res_blocks=1",
                             "--config.model.options.num_head_channels=16", "--config.model.options.xf_width=32",
                             "--config.model.options.xf_layers=1", "--config.model.options.xf_heads=2",
                             "--config.model.options.n_vocab=64"]
CLIP_SIZES = ts.CLIP_TINY + ["--config.model.options.patch_size=4", "--config.model.options.n_embd=32",
                             "--config.model.options.n_head_text=2", "--config.model.options.n_head_state_text=16",
                             "--config.model.options.n_head_image=2", "--config.model.options.n_head_state_image=16",
                             "--config.model.options.n_vocab=64"]


def tiny_bf16_config(spec: str):
  """`spec` with its model at tiny sizes and a batch of 8 (the 8 CPU devices); dtype, remat policy,
  scan_layers, mesh, optimizer and EMA as the variant sets them."""
  sizes = CLIP_SIZES if spec.startswith("configs/clip.py") else UNET_SIZES
  low_res = ["--config.data.low_res_size=4"] if "upsample" in spec else []
  return config_lib.load_config(spec, sizes + low_res + ["--config.batch_size=8", "--config.diffusion.steps=50"])


def _host_batch(program, seed: int = 0) -> dict[str, np.ndarray]:
  r = np.random.RandomState(seed)
  out = {}
  for k, a in program.abstract_batch.items():
    if k == "tokens":
      out[k] = r.randint(1, 60, a.shape).astype(np.int32)
    elif k == "mask":
      out[k] = np.arange(a.shape[1])[None] < r.randint(1, a.shape[1] + 1, (a.shape[0], 1))
    elif k == "inpaint_mask":
      out[k] = (r.uniform(size=a.shape) > 0.5).astype(np.float32)
    else:  # image, low_res
      out[k] = r.uniform(-1, 1, a.shape).astype(np.float32)
  return out


def test_the_bf16_variants_are_the_big_ones():
  """released, full and small of every stage compute in bf16; tiny (the unit-test size) in float32."""
  assert BF16_SPECS == [_spec(s, v) for s in STAGES for v in ("released", "full", "small")]


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
  return ts.session_cache(tmp_path_factory)


@pytest.mark.parametrize("spec", BF16_SPECS)
def test_every_bf16_variant_trains_at_tiny_size(spec, _cache):
  from glide_jax.train import program as program_lib

  config = tiny_bf16_config(spec)
  assert config.model.dtype == "bfloat16"
  program = program_lib.build(config)
  assert program.stage.model.dtype == jnp.bfloat16
  state = program.init_state(jax.random.key(0), params=ts.perturbed_params(config), compiler_options=ts.FAST)
  before = jax.device_get(state.params)
  step, _ = program.compile(ts.FAST)
  # Two steps: a warmup from 0 (clip's) leaves the parameters where they were after the first.
  for i in range(2):
    state, metrics = step(state, program.put_batch(_host_batch(program, i)), program.put_rng(jax.random.key(1)))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"]) and int(metrics["finite"]) == 1, (i, metrics)
  assert int(state.step) == 2 and int(state.skipped) == 0
  after = jax.device_get(state.params)
  # Parameters, EMA (none for clip) and optimizer moments stay float32: only the compute is bf16.
  for name, tree in (("params", after), ("ema", state.ema), ("opt_state", state.opt_state)):
    floats = [x for x in jax.tree.leaves(jax.device_get(tree)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats or (name == "ema" and not config.ema.rates), name
    assert {str(x.dtype) for x in floats} <= {"float32"}, (name, {str(x.dtype) for x in floats})
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after))]
  assert sum(moved) > 0.9 * len(moved), f"{sum(moved)} of {len(moved)} parameters changed"


# ----------------------------------------------------------------------------- sampling
# A random tiny model is chaotic under the sampler (75 % of its pixels end saturated, and storing
# its parameters in bf16 alone moves single pixels by up to 1.25), so closeness is stated over the
# pixels: the mean difference and the share of pixels more than 0.1 apart, in [-1, 1].
MEAN_TOLERANCE = 0.02    # mean |x_bf16 - x_f32|; measured 0.013 (0.027 with the timesteps rounded to bf16)
FAR_TOLERANCE = 0.06     # share of pixels with |x_bf16 - x_f32| > 0.1; measured 0.029 (0.083 so rounded)


def test_a_bf16_bundle_samples_in_bf16_like_the_float32_bundle(tmp_path, _cache):
  """Saved as `glide-jax export --bf16` writes it (bf16 parameters, meta dtype bfloat16), loaded with
  a bf16 compute dtype, sampled with DPM++ 15 at guidance 3: finite and within the tolerances above
  of the float32 bundle sampled in float32 from the same noise."""
  import ml_dtypes

  from glide_jax import bundle, sampling

  config = ts.tiny_config("base")
  params = ts.perturbed_params(config)
  meta = {"model": {"kind": "text2im", "options": dict(config.model.options)}, "dtype": "float32",
          "diffusion": {"steps": 1000, "noise_schedule": "squaredcos_cap_v2"},
          "tokenizer": {"type": "words", "text_ctx": int(config.model.options.text_ctx)}}
  bundle.save_bundle(tmp_path / "b32", params, meta)
  bundle.save_bundle(tmp_path / "b16", jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16), params),
                     dict(meta, dtype="bfloat16"))
  m16 = sampling.load_sampler_model(tmp_path / "b16", dtype=jnp.bfloat16)
  m32 = sampling.load_sampler_model(tmp_path / "b32")
  assert m16.model.dtype == jnp.bfloat16 and m32.model.dtype == jnp.float32
  prompts, key = ["a red circle", "a big blue square"], jax.random.PRNGKey(0)

  def sample(sm):
    return np.asarray(sampling.generate(sm, prompts, key, guidance_scale=3.0, sampler="dpm++", respacing="15",
                                        progress=lambda done: None), np.float32)
  x16, x32 = sample(m16), sample(m32)
  assert x16.shape == x32.shape == (2, 8, 8, 3) and np.all(np.isfinite(x16)) and np.abs(x16).max() <= 1.0
  err = np.abs(x16 - x32)
  assert err.mean() < MEAN_TOLERANCE and (err > 0.1).mean() < FAR_TOLERANCE, (err.mean(), (err > 0.1).mean())
  assert err.max() > 0  # it did compute in bf16
  assert np.abs(x32[0] - x32[1]).max() > 0.1  # the prompts (and parameters) matter at all


def test_bf16_loss_curve_tracks_float32():
  """The same tiny run twice, float32 then bf16 compute (benchmarks/dtype_curve.py, the demo's
  measurement at test size): the paired losses differ (the dtype took effect), both curves fall,
  and every 10-step window mean of the bf16 run is within 5 % of float32's."""
  from benchmarks import dtype_curve

  steps = 60
  overrides = ["--config.log.every=1", "--config.checkpoint.every=2", "--config.log.tensorboard=false",
               "--config.diffusion.steps=50", *ts.UNET_TINY, f"--config.total_steps={steps}",
               "--config.batch_size=8", "--config.optimizer.lr=1e-3", "--config.optimizer.warmup_steps=5"]
  config = config_lib.load_config("configs/base.py:variant=tiny", overrides)
  curves = {}
  for dtype in dtype_curve.DTYPES:
    with tempfile.TemporaryDirectory() as wd:
      curves[dtype] = dtype_curve.train_losses("configs/base.py:variant=tiny", overrides, dtype, wd,
                                               data_iterator=ts.SyntheticIterator(config),
                                               tokenizer=ts.tokenizer(config), compiler_options=ts.FAST)
  assert len(curves["float32"]) == len(curves["bfloat16"]) == steps
  result = dtype_curve.compare_curves(curves["float32"], curves["bfloat16"], window=10)
  assert not result["identical"] and result["mean_abs_step_diff"] > 0
  rows = result["windows"]
  for d in dtype_curve.DTYPES:
    assert rows[-1][d] < 0.7 * rows[0][d]  # a learning curve, not noise around a constant
  assert result["max_rel_diff"] < 0.05, result
