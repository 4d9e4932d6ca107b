"""The train step and the four stages on the 8-device CPU platform."""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import train_support as ts

from glide_jax.data.tokenizers import Tokenizer
from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import sharding as shard_lib
from glide_jax.train import init_from, optim, stages, timesteps, train
from glide_jax.train import state as state_lib
from glide_jax.train import step as step_lib


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


# ----------------------------------------------------------------------------- a toy model
TOY = ts.Toy()


def toy_loss(params, batch, rng):
  del rng
  x = (batch["image"] + 0.3 * batch["noise"]).reshape(batch["image"].shape[0], -1)[:, :8]
  x = x + batch["t"][:, None].astype(jnp.float32) / 50.0
  pred = TOY.apply({"params": params}, x)
  losses = jnp.mean(jnp.square(pred - 0.5), axis=-1)
  return jnp.mean(losses * batch["weights"]), {"losses": losses, "mse": losses}


def toy_setup(microbatches=1, rates=(0.9, 0.99), dropout=0.0, optimizer=None, loss_fn=toy_loss, empty=None):
  mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
  rules = shard_lib.normalize_rules(ts.tiny_config("base").rules)
  tx, sched = optim.make_optimizer(optimizer or {"lr": 1e-2, "grad_clip_norm": 1.0})
  sampler = timesteps.make_sampler("uniform", 50)
  init = lambda r: TOY.init(r, jnp.zeros((1, 8)))["params"]
  state, _ = state_lib.create_train_state(init, tx, rates, mesh, rules, jax.random.key(0), sampler.init)
  cfg = step_lib.StepConfig(ema_rates=rates, microbatches=microbatches, caption_dropout=dropout, num_timesteps=50)
  empty = empty or (jnp.zeros(8, jnp.int32), jnp.zeros(8, bool))
  fn = step_lib.make_train_step(loss_fn, tx, sched, cfg, sampler, empty, mesh, rules)
  with jax.set_mesh(mesh):
    jitted = jax.jit(fn)
  return state, jitted, mesh


def toy_batch(seed, b=16):
  r = np.random.RandomState(seed)
  return {"image": r.uniform(-1, 1, (b, 4, 4, 3)).astype(np.float32),
          "tokens": r.randint(1, 30, (b, 8)).astype(np.int32), "mask": np.ones((b, 8), bool)}


def test_grad_accumulation_over_4_microbatches_equals_full_batch():
  # SGD: a sum over microbatches where the mean belongs would make 4x larger steps (Adam would not
  # notice); the gradient norms are compared as well.
  sgd = {"name": "sgd", "lr": 0.5}
  s1, step1, mesh = toy_setup(1, optimizer=sgd)
  s4, step4, _ = toy_setup(4, optimizer=sgd)
  p0 = jax.device_get(s1.params)
  rng = jax.random.key(3)
  for i in range(3):
    batch = shard_lib.host_local_to_global(toy_batch(i), mesh)
    with jax.set_mesh(mesh):
      s1, m1 = step1(s1, batch, rng)
      s4, m4 = step4(s4, batch, rng)
    np.testing.assert_allclose(float(m1["loss"]), float(m4["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)
    assert float(m1["grad_norm"]) > 1e-3
  for a, b in zip(jax.tree.leaves((s1.params, s1.opt_state, s1.ema)), jax.tree.leaves((s4.params, s4.opt_state, s4.ema))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  moved = [np.abs(np.asarray(a) - b).max() for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(p0))]
  assert min(moved) > 1e-3, moved  # far above the tolerance: the steps' size is checked
  assert int(s4.step) == 3  # one optimizer (and EMA) update per step, not per microbatch
  assert int(optax.tree_utils.tree_get(s4.opt_state, "count")) == 3


def test_train_step_drops_captions_at_the_rate_and_feeds_the_empty_caption():
  # Read from the step's own outputs: its realised rate, and a loss that is the fraction of examples
  # whose caption, as the loss function receives it, is exactly the tokenizer's empty caption.
  tok = Tokenizer(text_ctx=8, vocab_size=100, pad_id=7)
  empty = tuple(jnp.asarray(x[0]) for x in tok.empty(1))

  def empty_fraction(params, batch, rng):
    pred = TOY.apply({"params": params}, batch["image"].reshape(batch["image"].shape[0], -1)[:, :8])
    is_empty = jnp.all(batch["tokens"] == empty[0], -1) & jnp.all(batch["mask"] == empty[1], -1)
    losses = is_empty.astype(jnp.float32) + 0.0 * jnp.mean(pred, -1)
    return jnp.mean(losses * batch["weights"]), {"losses": losses}

  state, step, mesh = toy_setup(1, dropout=0.2, loss_fn=empty_fraction, empty=empty)
  rates = []
  for i in range(5):
    batch = toy_batch(i, b=4096)
    lengths = np.random.RandomState(i).randint(1, 9, 4096)
    batch["mask"] = np.arange(8)[None] < lengths[:, None]  # ragged real captions, never empty
    batch["tokens"] = np.where(batch["mask"], batch["tokens"], 7).astype(np.int32)
    with jax.set_mesh(mesh):
      state, m = step(state, shard_lib.host_local_to_global(batch, mesh), jax.random.key(9))
    rates.append(float(m["caption_dropout_rate"]))
    assert float(m["loss"]) == pytest.approx(rates[-1], abs=1e-6)  # dropped rows = empty-caption rows
  assert len(set(rates)) == 5  # fresh draws every step
  sigma = math.sqrt(0.2 * 0.8 / (5 * 4096))
  assert abs(np.mean(rates) - 0.2) < 4.5 * sigma, rates


def test_nan_step_is_skipped_counted_and_training_goes_on():
  state, step, mesh = toy_setup(2)
  rng = jax.random.key(0)
  with jax.set_mesh(mesh):
    state, _ = step(state, shard_lib.host_local_to_global(toy_batch(0), mesh), rng)
    before = jax.device_get((state.params, state.opt_state, state.ema))
    bad = toy_batch(1)
    bad["image"][5, 0, 1, 1] = np.nan  # inside the 8 values the toy model reads
    state, m = step(state, shard_lib.host_local_to_global(bad, mesh), rng)
    assert not np.isfinite(float(m["loss"])) and int(m["skipped"]) == 1
    after = jax.device_get((state.params, state.opt_state, state.ema))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
      np.testing.assert_array_equal(a, b)
    assert int(state.skipped) == 1 and int(state.step) == 2
    state, m = step(state, shard_lib.host_local_to_global(toy_batch(2), mesh), rng)
  assert np.isfinite(float(m["loss"])) and int(state.skipped) == 1
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[0]), jax.tree.leaves(jax.device_get(state.params)))]
  assert all(changed)


def test_ema_is_one_update_per_step_at_each_rate():
  state, step, mesh = toy_setup(1, rates=(0.5, 0.99))
  p0 = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    state, _ = step(state, shard_lib.host_local_to_global(toy_batch(0), mesh), jax.random.key(1))
  p1 = jax.device_get(state.params)
  for rate in (0.5, 0.99):
    want = jax.tree.map(lambda a, b, r=rate: r * a + (1 - r) * b, p0, p1)
    got = jax.device_get(state.ema[state_lib.ema_key(rate)])
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_caption_dropout_rate_within_binomial_bounds_and_equals_empty_caption():
  tok = Tokenizer(text_ctx=12, vocab_size=100, pad_id=7)
  n = 40_000
  tokens = np.random.RandomState(0).randint(8, 100, (n, 12)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens), "mask": jnp.ones((n, 12), bool)}
  et, em = tok.empty(1)
  out, dropped = jax.jit(lambda b, k: step_lib.apply_caption_dropout(b, k, 0.2, jnp.asarray(et[0]), jnp.asarray(em[0])))(
      batch, jax.random.key(5))
  dropped = np.asarray(dropped)
  rate = dropped.mean()
  sigma = math.sqrt(0.2 * 0.8 / n)
  assert abs(rate - 0.2) < 4.5 * sigma, rate
  sampler_empty_tokens, sampler_empty_mask = tok.empty(int(dropped.sum()))
  np.testing.assert_array_equal(np.asarray(out["tokens"])[dropped], sampler_empty_tokens)
  np.testing.assert_array_equal(np.asarray(out["mask"])[dropped], sampler_empty_mask)
  np.testing.assert_array_equal(np.asarray(out["tokens"])[~dropped], tokens[~dropped])
  # Defaults: 20% for base and inpaint, none for the upsampler (docs/pitfalls.md, 2).
  assert train.caption_dropout_rate(ts.tiny_config("base")) == pytest.approx(0.2)
  assert train.caption_dropout_rate(ts.tiny_config("inpaint")) == pytest.approx(0.2)
  assert train.caption_dropout_rate(ts.tiny_config("upsample")) == 0.0


@pytest.mark.parametrize("loc,scale", [(0.0, 1.0), (1.0, 0.6)])
def test_logit_normal_timesteps_follow_the_closed_form_law(loc, scale):
  """P(t = k) = Phi((logit((k+1)/T) - loc) / s) - Phi((logit(k/T) - loc) / s), weights 1."""
  n, draws = 10, 40000
  t, w = jax.jit(timesteps.logit_normal(n, loc, scale).sample, static_argnums=2)({}, jax.random.key(1), draws)
  edges = np.arange(n + 1) / n
  with np.errstate(divide="ignore"):
    z = (np.log(edges) - np.log1p(-edges) - loc) / scale
  cdf = 0.5 * (1 + np.array([math.erf(v / math.sqrt(2)) if np.isfinite(v) else math.copysign(1, v) for v in z]))
  expected = np.diff(cdf)
  freq = np.bincount(np.asarray(t), minlength=n) / draws
  np.testing.assert_allclose(freq, expected, atol=0.008)
  assert np.all(np.asarray(w) == 1.0)
  with pytest.raises(ValueError, match="logit_normal_scale"):
    timesteps.logit_normal(n, 0.0, 0.0)
  with pytest.raises(ValueError, match="logit-normal"):
    timesteps.make_sampler("cosine", n)
  cfg = ts.tiny_config("base", "--config.diffusion.schedule_sampler=logit-normal",
                       "--config.diffusion.logit_normal_loc=1.0", "--config.diffusion.logit_normal_scale=0.6")
  t2, _ = timesteps.sampler_from_config(cfg, n).sample({}, jax.random.key(1), draws)
  if (loc, scale) == (1.0, 0.6):
    np.testing.assert_array_equal(np.asarray(t2), np.asarray(t))


def test_uniform_timesteps():
  t, w = timesteps.uniform(10).sample({}, jax.random.key(3), 5000)
  assert t.dtype == jnp.int32 and int(t.min()) == 0 and int(t.max()) == 9
  assert np.all(np.asarray(w) == 1)
  np.testing.assert_allclose(np.bincount(np.asarray(t)) / 5000, 0.1, atol=0.02)


def test_stratified_timesteps_cover_every_stratum_and_stay_uniform():
  """Each batch holds exactly one draw per stratum of T/b timesteps (in shuffled order); over many
  batches every position's t is uniform on {0..T-1}; and the batch mean of t varies far less than
  under independent uniform draws, whose variance is (T^2 - 1) / (12 b) in closed form."""
  n, b, batches = 64, 32, 2000
  sample = jax.jit(jax.vmap(lambda k: timesteps.stratified(n).sample({}, k, b)))
  t, w = sample(jax.random.split(jax.random.key(5), batches))
  t = np.asarray(t)
  assert t.shape == (batches, b) and t.dtype == np.int32 and np.all(np.asarray(w) == 1.0)
  # n = 2b: the draw (u + i/b) mod 1 of stratum i lands on timestep 2i or 2i + 1.
  np.testing.assert_array_equal(np.sort(t // (n // b), axis=1), np.broadcast_to(np.arange(b), (batches, b)))
  strata = t // (n // b)  # shuffled: example 1's stratum is not always the one after example 0's
  assert len(set(((strata[:, 1] - strata[:, 0]) % b).tolist())) > b // 2
  for column in (t[:, 0], t[:, b - 1]):  # any one example's t is uniform
    np.testing.assert_allclose(np.bincount(column, minlength=n) / batches, 1 / n, atol=0.012)
  uniform_var = (n ** 2 - 1) / 12 / b
  assert np.var(t.mean(axis=1)) < uniform_var / 20  # 0.25 here: the mean is 31 or 32
  tu, _ = jax.vmap(lambda k: timesteps.uniform(n).sample({}, k, b))(jax.random.split(jax.random.key(5), batches))
  np.testing.assert_allclose(np.var(np.asarray(tu).mean(axis=1)), uniform_var, rtol=0.1)
  cfg = ts.tiny_config("base", "--config.diffusion.schedule_sampler=stratified")
  assert timesteps.sampler_from_config(cfg, n).name == "stratified"


def test_loss_second_moment_matches_reference_algorithm():
  n, hist = 6, 10
  sampler = timesteps.loss_second_moment(n, hist)
  state = sampler.init()
  r = np.random.RandomState(0)
  ref = {t: [] for t in range(n)}  # guided-diffusion: a FIFO of the last 10 losses per t
  # Until every t holds `hist` losses the law stays uniform, however skewed the losses are.
  cold = jax.jit(sampler.update)(state, jnp.full((hist * n - 1,), 5, jnp.int32),
                                 jnp.full((hist * n - 1,), 100.0, jnp.float32))
  t_cold, w_cold = sampler.sample(cold, jax.random.key(1), 6000)
  np.testing.assert_allclose(np.bincount(np.asarray(t_cold), minlength=n) / 6000, 1 / n, atol=0.02)
  np.testing.assert_allclose(np.asarray(w_cold), 1.0, rtol=1e-6)
  for _ in range(30):
    t = r.randint(0, n, 8)
    losses = r.uniform(0.1, 2.0, 8).astype(np.float32) * (1 + t)
    state = jax.jit(sampler.update)(state, jnp.asarray(t), jnp.asarray(losses))
    for ti, li in zip(t, losses):
      ref[ti] = (ref[ti] + [li])[-hist:]
  warm = all(len(v) == hist for v in ref.values())
  assert warm
  w = np.array([math.sqrt(np.mean(np.square(ref[t]))) for t in range(n)])
  p = w / w.sum() * (1 - 0.001) + 0.001 / n
  t, weights = sampler.sample(state, jax.random.key(0), 20000)
  freq = np.bincount(np.asarray(t), minlength=n) / 20000
  np.testing.assert_allclose(freq, p, atol=0.015)
  np.testing.assert_allclose(np.asarray(weights), 1 / (n * p[np.asarray(t)]), rtol=1e-5)


def test_learning_rate_warmup_then_cosine():
  sched = optim.learning_rate_schedule({"lr": 1e-3, "warmup_steps": 10, "decay": "cosine", "decay_steps": 100})
  assert float(sched(0)) == 0.0
  assert float(sched(5)) == pytest.approx(5e-4)
  assert float(sched(10)) == pytest.approx(1e-3)
  assert float(sched(60)) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)), rel=1e-5)
  with pytest.raises(ValueError, match="decay"):
    optim.learning_rate_schedule({"decay": "exp"})


def test_sgd_is_minus_lr_times_the_gradient_and_an_unknown_optimizer_is_refused():
  params, grads = {"w": jnp.array([3.0, 4.0])}, {"w": jnp.array([1.0, -2.0])}
  tx, _ = optim.make_optimizer({"name": "sgd", "lr": 0.1})
  np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["w"], [-0.1, 0.2], rtol=1e-6)
  tx, _ = optim.make_optimizer({"name": "sgd", "lr": 0.1, "weight_decay": 0.5})
  np.testing.assert_allclose(tx.update(grads, tx.init(params), params)[0]["w"], [-0.25, 0.0], atol=1e-7)
  adamw, _ = optim.make_optimizer({"lr": 0.1})  # the default
  assert adamw.init(params)[0].mu["w"].shape == (2,)
  with pytest.raises(ValueError, match="unknown optimizer.name 'adam'"):
    optim.make_optimizer({"name": "adam"})


# ----------------------------------------------------------------------------- the four stages
STEPS = 3


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
  """stage -> a bundle of its perturbed initial parameters (made once per module)."""
  made = {}

  def get(stage_name):
    if stage_name not in made:
      config = ts.tiny_config(stage_name)
      made[stage_name] = ts.perturbed_bundle(config, tmp_path_factory.mktemp(f"init-{stage_name}") / "bundle")
    return made[stage_name]
  return get


def stage_config(stage_name, bundle, *extra):
  return ts.tiny_config(stage_name, f"--config.total_steps={STEPS}", *ts.SGD, f"--config.init_from={bundle}", *extra)


@functools.cache
def reference_losses(stage_name: str, bundle: str, extra: tuple[str, ...] = ()) -> tuple[float, ...]:
  """STEPS losses of plain gradient descent on ONE device, written out here: the stage's loss
  function and its gradient on the whole batch, params -= lr * grad (no step function, no sharding).

  It does not depend on the mesh, so it is computed once per stage (and sampler) for all meshes.
  """
  from glide_jax import bundle as bundle_lib

  config = stage_config(stage_name, bundle, *extra)
  stage = stages.make_stage(config)
  it = ts.SyntheticIterator(config)
  tok = ts.tokenizer(config)
  sampler = timesteps.sampler_from_config(config, stage.diffusion.num_timesteps)
  _, step_rng = jax.random.split(jax.random.key(int(config.seed)))
  params = jax.tree.map(jnp.asarray, bundle_lib.load_bundle(bundle)[0])
  lr = float(config.optimizer.lr)
  et, em = tok.empty(1)
  cfg = step_lib.StepConfig(caption_dropout=train.caption_dropout_rate(config), uses_text=stage.uses_text,
                            num_timesteps=stage.diffusion.num_timesteps)
  grad_fn = jax.jit(jax.value_and_grad(stage.loss, has_aux=True))
  sampler_state, losses, compiled, params0 = sampler.init(), [], None, params
  for i in range(STEPS):
    batch = {k: jnp.asarray(v) for k, v in next(it).items() if k in stage.batch_keys}
    st = state_lib.TrainState(step=jnp.int32(i), params=params, opt_state=None, ema={},
                              skipped=jnp.zeros((), jnp.int32), sampler=sampler_state)
    b, k_model, _ = step_lib.prepare_batch(st, batch, step_rng, cfg, sampler, (jnp.asarray(et[0]), jnp.asarray(em[0])))
    compiled = compiled or grad_fn.lower(params, b, k_model).compile(compiler_options=ts.FAST)
    (loss, aux), grads = compiled(params, b, k_model)
    if i:  # the updates so far move this step's loss by far more than the test's tolerance
      (frozen, _), _ = compiled(params0, b, k_model)
      assert abs(float(loss) - float(frozen)) > 1e-3 * abs(float(frozen)), (i, float(loss), float(frozen))
    params = jax.tree.map(lambda p, g: p - lr * g, params, grads)
    if "losses" in aux:
      sampler_state = sampler.update(sampler_state, b["t"], aux["losses"])
    losses.append(float(loss))
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves(params))
  return tuple(losses)


MESHES = {"1x8": (1, 8), "2x4": (2, 4), "8x1": (8, 1)}
# Every stage on every mesh; base on 2x4 uses the loss-second-moment sampler (the program
# test_checkpoint.py also compiles, so a full run compiles it once).
CASES = [("base-lsm" if (stage, mesh) == ("base", "2x4") else stage, mesh)
         for stage in ("base", "upsample", "inpaint", "clip") for mesh in MESHES]


@pytest.mark.parametrize("stage,mesh_name", CASES)
def test_stage_trains_on_mesh_with_the_single_device_losses(stage, mesh_name, tmp_path, perturbed):
  # Perturbed parameters (no zero output layer) and SGD from the first step: every step's loss
  # depends on the sharded forward and backward of the steps before, and on the gradient's scale.
  data, fsdp = MESHES[mesh_name]
  extra = ()
  if stage == "base-lsm":
    stage, extra = "base", ("--config.diffusion.schedule_sampler=loss-second-moment",)
  bundle = perturbed(stage)
  config = stage_config(stage, bundle, *ts.mesh_overrides(data, fsdp), *extra)
  result = train.train(config, str(tmp_path), data_iterator=ts.SyntheticIterator(config),
                       tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)
  assert result["step"] == STEPS and int(result["state"].step) == STEPS
  leaf = jax.tree.leaves(result["state"].params)[0]
  assert leaf.sharding.mesh.shape["data"] == data and leaf.sharding.mesh.shape["fsdp"] == fsdp
  np.testing.assert_allclose(result["losses"], reference_losses(stage, bundle, extra), rtol=2e-5)


def make_small_shapes(data_dir):
  """A 512-example glide_shapes/size32 in its own data_dir (the registered one is 60k examples)."""
  from glide_jax.data.shapes import GlideShapes
  GlideShapes(config="size32", train_examples=512, validation_examples=64,
              data_dir=str(data_dir)).download_and_prepare()


@pytest.mark.slow
def test_tiny_base_loss_falls_on_glide_shapes(tmp_path):
  make_small_shapes(tmp_path / "tfds")
  # the real pipeline and the words tokenizer; images resized 32 -> 8 px for the tiny U-Net
  config = ts.tiny_config("base", "--config.total_steps=40", "--config.log.every=10", "--config.checkpoint.every=40",
                          "--config.optimizer.warmup_steps=5", f"--config.data.data_dir={tmp_path / 'tfds'}",
                          "--config.log.sample_every=40", "--config.sampling.steps=3", "--config.log.tensorboard=true",
                          *ts.mesh_overrides(1, 8))
  result = train.train(config, str(tmp_path / "wd"), progress=False, compiler_options=ts.FAST)
  losses = np.asarray(result["losses"])
  assert np.all(np.isfinite(losses))
  assert losses[-10:].mean() < 0.6 * losses[:5].mean(), losses
  log = (tmp_path / "wd" / "train.log").read_text()
  assert "caption_dropout_rate=" in log and "images_per_s=" in log and "loss_q0=" in log
  from PIL import Image
  for name in ("ema", "raw"):  # the sample grids of the fixed prompts, EMA and raw
    grid = np.asarray(Image.open(tmp_path / "wd" / "samples" / f"{name}_00000040.png"))
    assert grid.ndim == 3 and grid.shape[-1] == 3 and grid.std() > 0
  assert list((tmp_path / "wd" / "tensorboard").glob("events.*"))


@pytest.mark.parametrize("source", ["bundle", "glide-text2im"])
def test_inpaint_starts_from_a_base_model_with_zero_new_input_channels(source, tmp_path):
  from glide_jax import bundle
  from glide_jax.interop import glide_text2im

  base_cfg = ts.tiny_config("base")
  base_params = jax.device_get(nn.meta.unbox(jax.jit(stages.make_stage(base_cfg).init)(jax.random.key(4))))
  if source == "bundle":
    path = bundle.save_bundle(tmp_path / "b", base_params, {"model": {"kind": "text2im"}})
  else:  # a released-style state_dict file
    sd = glide_text2im.export_state_dict(base_params, "text2im", dict(base_cfg.model.options))
    path = glide_text2im.save_state_dict(sd, tmp_path / "base.safetensors")
  config = ts.tiny_config("inpaint", f"--config.init_from={path}")
  params = init_from.load_init_params(config, stages.make_stage(config))
  k_base = base_params["input_blocks_0_0"]["kernel"]
  k = params["input_blocks_0_0"]["kernel"]
  assert k_base.shape[2] == 3 and k.shape[2] == 7
  np.testing.assert_array_equal(k[:, :, :3], k_base)
  assert not np.any(k[:, :, 3:])
  flat_b = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(base_params)}
  for p, v in jax.tree_util.tree_leaves_with_path(params):
    if "input_blocks_0_0" not in jax.tree_util.keystr(p) or "bias" in jax.tree_util.keystr(p):
      np.testing.assert_array_equal(v, flat_b[jax.tree_util.keystr(p)])


def test_train_command_refuses_an_unknown_config_key(tmp_path, capsys):
  from glide_jax import cli
  code = cli.main(["train", "--config", "configs/base.py:variant=tiny", "--workdir", str(tmp_path),
                   "--config.optimizer.no_such_key=1"])
  assert code == 2
  assert "no_such_key" in capsys.readouterr().err
  assert not (tmp_path / "checkpoints").exists()
