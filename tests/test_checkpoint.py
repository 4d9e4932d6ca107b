"""Checkpoints: exact resume, restore on another mesh, config refusal, SIGTERM and SIGKILL."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import train_support as ts

from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import sharding as shard_lib
from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import optim, stages, timesteps, train
from glide_jax.train import state as state_lib

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return ts.session_cache(tmp_path_factory)


def run(config, workdir):
  return train.train(config, str(workdir), data_iterator=ts.SyntheticIterator(config),
                     tokenizer=ts.tokenizer(config), progress=False, compiler_options=ts.FAST)


def cfg(*extra):
  # loss-second-moment: its history is part of the state that must survive a restart
  return ts.tiny_config("base", *ts.mesh_overrides(2, 4), "--config.diffusion.schedule_sampler=loss-second-moment",
                        *extra)


@pytest.fixture(scope="module")
def init_bundle(tmp_path_factory):
  """Perturbed initial parameters: with GLIDE's zero output layer, most parameters would get no
  gradient in these few steps, and the comparisons would compare untrained values."""
  return ts.perturbed_bundle(cfg(), tmp_path_factory.mktemp("init") / "bundle")


@pytest.fixture(scope="module")
def straight_and_resumed(cache_dir, tmp_path_factory, init_bundle):
  a = tmp_path_factory.mktemp("straight")
  b = tmp_path_factory.mktemp("resumed")
  init = f"--config.init_from={init_bundle}"
  straight = run(cfg("--config.total_steps=4", init), a)
  first = run(cfg("--config.total_steps=2", init), b)
  second = run(cfg("--config.total_steps=4", init), b)
  return straight, first, second, a, b


def test_resume_is_exact(straight_and_resumed, init_bundle):
  straight, first, second, _, _ = straight_and_resumed
  assert straight["losses"] == first["losses"] + second["losses"]  # bit for bit
  sa, sb = jax.device_get(straight["state"]), jax.device_get(second["state"])
  for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
    np.testing.assert_array_equal(x, y)  # params, opt state, EMA, sampler history, counters
  assert int(sb.step) == 4
  # The compared parameters were trained (all but biases a one-channel GroupNorm cancels).
  init = jax.tree.leaves(ts.bundle_params(init_bundle))
  still = [i for i, (x, y) in enumerate(zip(jax.tree.leaves(sa.params), init)) if np.array_equal(x, y)]
  assert len(still) < len(init) // 4, still


def test_resume_onto_another_mesh_continues_the_same_run(straight_and_resumed, init_bundle, tmp_path):
  # Steps 3-4 after restoring step 2 onto 1x4 (from 2x4) equal the straight 2x4 run's losses and
  # gradient norms (a sum over the data axis where the mean belongs would change those; Adam's
  # parameters would hardly show it, and its sign-like update of near-zero gradients turns float
  # rounding into differences of up to lr, so parameters are compared only loosely).
  straight, _, _, a, _ = straight_and_resumed
  init = f"--config.init_from={init_bundle}"
  run(cfg("--config.total_steps=2", init), tmp_path)
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4}, jax.devices()[:4])
  config = cfg("--config.total_steps=4", init, *ts.mesh_overrides(1, 4))
  cont = train.train(config, str(tmp_path), data_iterator=ts.SyntheticIterator(config),
                     tokenizer=ts.tokenizer(config), progress=False, mesh=mesh, compiler_options=ts.FAST)
  assert "resumed from step 2" in (tmp_path / "train.log").read_text()
  np.testing.assert_allclose(cont["losses"], straight["losses"][2:], rtol=1e-5)
  here, there = ts.logged_steps(tmp_path), ts.logged_steps(a)
  for step in (3, 4):
    np.testing.assert_allclose(here[step]["grad_norm"], there[step]["grad_norm"], rtol=1e-4)
  for x, y in zip(jax.tree.leaves(jax.device_get(cont["state"].params)),
                  jax.tree.leaves(jax.device_get(straight["state"].params))):
    np.testing.assert_allclose(x, y, rtol=0, atol=2e-4)


def test_restore_onto_a_different_mesh(straight_and_resumed):
  straight, _, _, _, b = straight_and_resumed
  config = cfg("--config.total_steps=4")
  mesh = mesh_lib.make_mesh({"data": 1, "fsdp": 4}, jax.devices()[:4])  # fewer devices, other axes
  stage = stages.make_stage(config)
  tx, _ = optim.make_optimizer(config.optimizer)
  sampler = timesteps.make_sampler("loss-second-moment", stage.diffusion.num_timesteps)
  abstract, shardings = state_lib.state_shardings(stage.init, tx, tuple(config.ema.rates), sampler.init, mesh,
                                                  shard_lib.normalize_rules(config.rules))
  ck = ckpt_lib.Checkpointer(os.path.join(b, "checkpoints"), 2, 3)
  restored, _, data_state = ck.restore(abstract, shardings)
  ck.close()
  assert data_state["step"] == 4
  for x, s in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert x.sharding == s
  for x, y in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(jax.device_get(straight["state"]))):
    np.testing.assert_array_equal(x, y)
  kernels = [x for x in jax.tree.leaves(restored.params) if x.ndim == 4]
  assert any(x.sharding.spec[2] == "fsdp" for x in kernels)


def test_mismatched_config_is_refused_naming_the_keys(straight_and_resumed):
  *_, b = straight_and_resumed
  bad = cfg("--config.total_steps=6", "--config.optimizer.lr=0.5", "--config.ema.rates=(0.9,)")
  with pytest.raises(ckpt_lib.ConfigMismatchError) as e:
    run(bad, b)
  assert "optimizer.lr" in str(e.value) and "ema.rates" in str(e.value)
  assert "total_steps" not in str(e.value)


SCRIPT = r"""
import os, sys, time
sys.path.insert(0, {tests!r})
import train_support as ts
from glide_jax.train import train

class Slow(ts.SyntheticIterator):
  def __next__(self):
    time.sleep(0.3)
    return super().__next__()

ts.enable_compilation_cache({cache!r})
config = ts.tiny_config("base", *ts.mesh_overrides(2, 4), "--config.diffusion.schedule_sampler=loss-second-moment",
                        "--config.total_steps=100000", "--config.checkpoint.every={every}")
r = train.train(config, {workdir!r}, data_iterator=Slow(config), tokenizer=ts.tokenizer(config), progress=False,
                compiler_options=ts.FAST)
print("STOPPED", r["stopped"], r["step"], flush=True)
"""


def _spawn(workdir, cache, every):
  script = SCRIPT.format(tests=str(TESTS), cache=str(cache), workdir=str(workdir), every=every)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.Popen([sys.executable, "-c", script], cwd=str(REPO), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _wait_for(pred, proc, timeout=600):
  t0 = time.time()
  while not pred():
    if proc.poll() is not None:
      raise AssertionError(f"trainer exited early:\n{proc.stdout.read()[-3000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out")
    time.sleep(0.005)


@pytest.mark.slow
def test_sigkill_mid_save_resumes_from_last_complete_checkpoint_and_sigterm_saves(cache_dir, tmp_path):
  ckdir = tmp_path / "checkpoints"

  def saving():  # an orbax temporary (unfinished) checkpoint directory exists, and a finished one
    if not ckdir.is_dir():
      return False
    names = os.listdir(ckdir)
    return any("tmp" in n for n in names) and any(n.isdigit() for n in names)

  proc = _spawn(tmp_path, cache_dir, every=1)
  _wait_for(saving, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  ck = ckpt_lib.Checkpointer(str(ckdir), 1, 3)
  last = ck.latest_step()
  ck.close()
  assert last is not None and last >= 1
  # A restart resumes from that step (the half-written one is ignored) and SIGTERM saves and exits 0.
  proc = _spawn(tmp_path, cache_dir, every=1000)
  log = tmp_path / "train.log"
  _wait_for(lambda: log.is_file() and f"step {last + 2} " in log.read_text().split("resumed from step")[-1]
            and "resumed from step" in log.read_text(), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert f"resumed from step {last}" in log.read_text()
  stopped_at = int(out.split("STOPPED True ")[1].split()[0])
  ck = ckpt_lib.Checkpointer(str(ckdir), 1000, 3)
  assert ck.latest_step() == stopped_at > last + 1
  ck.close()


@pytest.mark.parametrize("impl", ["rbg", "threefry2x32"])
def test_rng_round_trips_under_the_default_prng_impl(tmp_path, impl):
  # TPU runs often set jax_default_prng_impl=rbg, whose key data is 4 words, not threefry's 2.
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", impl)
  try:
    mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    w = jax.numpy.arange(3.0)
    state = state_lib.TrainState(step=jax.numpy.int32(3), params={"w": w}, opt_state={"mu": w + 1},
                                 ema={"0.9": {"w": w + 2}}, skipped=jax.numpy.int32(0), sampler={"h": w + 3})
    rng = jax.random.key(7)
    ck = ckpt_lib.Checkpointer(str(tmp_path), 1, 2, use_async=False)
    ck.save(3, state, rng, {"step": 3}, cfg(), force=True)
    restored, key, data_state = ck.restore(state, jax.tree.map(lambda _: rep, state))
    ck.close()
    assert jax.random.key_impl(key) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(rng))
    np.testing.assert_array_equal(jax.random.normal(jax.random.fold_in(key, 3), (4,)),
                                  jax.random.normal(jax.random.fold_in(rng, 3), (4,)))
    np.testing.assert_array_equal(restored.sampler["h"], w + 3)
    assert data_state == {"step": 3}
  finally:
    jax.config.update("jax_default_prng_impl", previous)


def test_a_key_of_another_prng_impl_is_refused_by_name(tmp_path):
  mesh = mesh_lib.make_mesh({"data": 1}, jax.devices()[:1])
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  w = jax.numpy.arange(3.0)
  state = state_lib.TrainState(step=jax.numpy.int32(1), params={"w": w}, opt_state={"mu": w}, ema={},
                               skipped=jax.numpy.int32(0), sampler={"h": w})
  ck = ckpt_lib.Checkpointer(str(tmp_path), 1, 2, use_async=False)
  ck.save(1, state, jax.random.key(0, impl="threefry2x32"), {"step": 1}, cfg(), force=True)
  previous = jax.config.jax_default_prng_impl
  jax.config.update("jax_default_prng_impl", "rbg")
  try:
    with pytest.raises(ValueError, match="jax_default_prng_impl='rbg'.*shape \\(4,\\)"):
      ck.restore(state, jax.tree.map(lambda _: rep, state))
  finally:
    jax.config.update("jax_default_prng_impl", previous)
    ck.close()


def test_a_checkpoint_from_before_optimizer_name_resumes_as_adamw(tmp_path):
  # Configs saved before `optimizer.name` existed ran AdamW: resuming them with the default is no
  # mismatch, resuming them with SGD is.
  from glide_jax import config_lib

  w = jax.numpy.arange(3.0)
  state = state_lib.TrainState(step=jax.numpy.int32(1), params={"w": w}, opt_state={"mu": w}, ema={},
                               skipped=jax.numpy.int32(0), sampler={"h": w})
  old = config_lib.config_from_json(config_lib.config_to_json(cfg()))
  with old.unlocked():
    del old.optimizer["name"]
  ck = ckpt_lib.Checkpointer(str(tmp_path), 1, 2, use_async=False)
  ck.save(1, state, jax.random.key(0), {"step": 1}, old, force=True)
  ck.check_config(cfg())
  with pytest.raises(ckpt_lib.ConfigMismatchError, match="optimizer.name: 'adamw' != 'sgd'"):
    ck.check_config(cfg("--config.optimizer.name=sgd"))
  ck.close()


def test_an_older_saved_config_is_read_in_todays_schema():
  """A config saved before keys were added (and with one since removed) reads back as today's
  config: export and resume use it, and the data pipeline refuses unknown keys."""
  import json

  from glide_jax import config_lib
  from glide_jax.data import pipeline
  current = ts.tiny_config("base")
  old = json.loads(config_lib.config_to_json(current))
  for key in ckpt_lib.ADDED_KEYS:
    section, name = key.split(".")
    del old[section][name]
  old["data"]["shuffle_buffer"] = 256
  saved = config_lib.config_from_json(json.dumps(old))
  with pytest.raises(KeyError, match="data.shuffle_buffer"):
    pipeline.data_section(saved.data)
  upgraded = ckpt_lib.upgrade_saved_config(saved)
  assert upgraded.to_dict() == current.to_dict()
  pipeline.data_section(upgraded.data)
