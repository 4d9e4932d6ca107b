"""The training loop on the host: what it reads from the devices and when, how often it agrees on a
stop, its save policy, the profile it writes on request, and flat memory and step rate over
thousands of steps.

The loop does not care which model it trains, so most tests swap the stage for a two-layer MLP
(`toy_stage`): its step compiles in a second and runs in about a millisecond, and the loop's own
cost is what is measured.
"""
from __future__ import annotations

import gzip
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import train_support as ts
from jax._src import array as array_lib

from glide_jax import config_lib
from glide_jax.diffusion.schedules import diffusion_from_settings
from glide_jax.parallel import mesh as mesh_lib
from glide_jax.parallel import multihost
from glide_jax.train import checkpoint as ckpt_lib
from glide_jax.train import stages, train


@pytest.fixture(scope="module", autouse=True)
def _cache(tmp_path_factory):
  ts.session_cache(tmp_path_factory)


# ----------------------------------------------------------------------------- a toy stage
def toy_stage(config):
  """A stage (stages.Stage) whose model is a 2-layer MLP on 8 pixels: the loop, not the model."""
  model = ts.Toy()

  def init(rng):
    return model.init(rng, jnp.zeros((1, 8)))["params"]

  def loss(params, batch, rng):
    del rng
    b = batch["image"].shape[0]
    x = (batch["image"] + 0.3 * batch["noise"]).reshape(b, -1)[:, :8] + batch["t"][:, None] / 50.0
    losses = jnp.mean(jnp.square(model.apply({"params": params}, x) - 0.5), axis=-1)
    return jnp.mean(losses * batch["weights"]), {"losses": losses, "mse": losses}

  return stages.Stage("base", "text2im", model, diffusion_from_settings(config.diffusion),
                      int(config.model.options.image_size), ("image", "tokens", "mask"), False, init, loss)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setattr(stages, "make_stage", toy_stage)  # program.build calls stages.make_stage


class Fixed(ts.SyntheticIterator):
  """The same batch every step (no per-step host work of its own); counts the batches it served and,
  if asked, records the time and this process's resident memory at each."""

  def __init__(self, config, record: bool = False):
    super().__init__(config)
    self.batch = super().__next__()
    self.served = 0
    self.record = record
    self.times: list[float] = []
    self.rss: list[int] = []
    self._page = os.sysconf("SC_PAGE_SIZE")

  def __next__(self):
    self.served += 1
    if self.record:
      self.times.append(time.perf_counter())
      with open("/proc/self/statm") as f:
        self.rss.append(int(f.read().split()[1]) * self._page)
    return self.batch

  def get_state(self):
    return {"step": self.served, "seed": self.seed}

  def set_state(self, state):
    self.served = int(state["step"])


def toy_config(*extra):
  config = ts.tiny_config("base", "--config.log.sample_every=0", "--config.batch_size=8", *extra)
  config.checkpoint["async"] = False  # every read of a save happens inside the save call
  return config


def run(config, workdir, iterator=None, mesh=None):
  iterator = iterator or Fixed(config)
  result = train.train(config, str(workdir), data_iterator=iterator, tokenizer=ts.tokenizer(config),
                       progress=False, mesh=mesh, compiler_options=ts.FAST)
  return result, iterator


# ----------------------------------------------------------------------------- host reads
class Steps(multihost.Watchdog):
  """The loop kicks its watchdog once after each step's dispatch: `done` = steps dispatched so far."""
  done = 0

  def kick(self):
    Steps.done += 1
    super().kick()


class Reads:
  """Counts reads of device values by the host (jax.Array._value: np.asarray, float(), device_get,
  printing), each attributed to the step whose host work it belongs to: step s's is everything from
  its dispatch to the next step's (its log, save, stop check, then reading and dispatching step s+1);
  0 = set-up and the first dispatch."""

  def __init__(self, monkeypatch):
    self.by_step: dict[int, int] = {}
    Steps.done = 0
    monkeypatch.setattr(multihost, "Watchdog", Steps)
    original = array_lib.ArrayImpl._value
    reads = self

    def counted(arr):
      reads.by_step[Steps.done] = reads.by_step.get(Steps.done, 0) + 1
      return original.fget(arr)

    monkeypatch.setattr(array_lib.ArrayImpl, "_value", property(counted))


def test_the_loop_reads_device_values_only_at_log_save_and_check_steps(toy, tmp_path, monkeypatch):
  # Run as if multi-process (one process: the collectives are fakes that read a device value, as
  # process_allgather does): SIGTERM agreed every check_every=5 steps, the parameter checksums at
  # the start and end (params_check_every=0), logs every 4, saves every 6, 12 steps.
  config = toy_config("--config.total_steps=12", "--config.log.every=4", "--config.checkpoint.every=6",
                      "--config.checkpoint.keep=5", "--config.checkpoint.check_every=5",
                      "--config.checkpoint.params_check_every=0")
  monkeypatch.setattr(train, "_multi_process", lambda: True)
  monkeypatch.setenv("GLIDE_JAX_WATCHDOG_SECONDS", "0")
  it = Fixed(config)
  agreed, checked = [], []

  def agree(flag):
    agreed.append(Steps.done)
    return bool(float(jnp.asarray(int(flag)) + 0))  # a round trip through the device, like the real one

  real_check = multihost.check_params_agree

  def check(params, step):
    checked.append(step)
    real_check(params, step)  # the on-device checksums: a few numbers reach the host

  monkeypatch.setattr(multihost, "agree_on_flag", agree)
  monkeypatch.setattr(multihost, "check_params_agree", check)
  reads = Reads(monkeypatch)
  result, _ = run(config, tmp_path, it)
  assert result["step"] == 12 and len(result["losses"]) == 12 and all(np.isfinite(result["losses"]))
  busy = {4, 8, 12} | {6, 12} | {5, 10}  # log, save, stop-agreement steps (and the end)
  quiet = [s for s in range(1, 12) if s not in busy]
  assert [s for s in quiet if reads.by_step.get(s)] == [], reads.by_step
  assert agreed == [5, 10] and checked == [0, 12]
  # The counter sees the reads that are there: each log step's fetch, the save, the agreement.
  assert all(reads.by_step.get(s, 0) > 0 for s in (4, 5, 6, 8, 10)), reads.by_step
  # orbax's policy: every 6 steps, no save at the first step of a fresh run, the last step forced.
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), 6, 5)
  assert ck.all_steps() == [6, 12]
  ck.close()


def test_a_single_process_reads_nothing_between_logs_and_stops_on_sigterm_at_once(toy, tmp_path, monkeypatch):
  # One process: no agreement at all (nothing to agree with), and the local SIGTERM flag is read
  # after every step; checkpoint.every=0: no save but the forced one at the stop.
  config = toy_config("--config.total_steps=50", "--config.log.every=10", "--config.checkpoint.every=0",
                      "--config.checkpoint.check_every=100")
  monkeypatch.setattr(multihost, "agree_on_flag", lambda flag: pytest.fail("agreement on one process"))

  class Terminating(Fixed):
    def __next__(self):
      if self.served == 7:  # SIGTERM arrives while the 8th batch is read: stop after step 8
        os.kill(os.getpid(), 15)
      return super().__next__()

  it = Terminating(config)
  reads = Reads(monkeypatch)
  result, _ = run(config, tmp_path, it)
  assert result["stopped"] and result["step"] == 8
  assert [s for s in range(1, 8) if reads.by_step.get(s)] == [], reads.by_step
  ck = ckpt_lib.Checkpointer(os.path.join(tmp_path, "checkpoints"), 0, 3)
  assert ck.all_steps() == [8]
  ck.close()


def test_stop_is_agreed_only_every_check_every_steps_on_several_processes(monkeypatch):
  calls = []

  def agree(flag):
    calls.append(flag)
    return flag

  monkeypatch.setattr(multihost, "agree_on_flag", agree)
  monkeypatch.setattr(train, "_preemption_notice", lambda step: step == 23)
  signal_ = train._StopSignal()
  multi = train._StopCheck(signal_, every=4, multi_process=True)
  seen = []
  for step in range(1, 13):
    if step == 6:
      signal_.requested = True  # SIGTERM on this process after step 5
    seen.append(multi.poll(step))
  assert calls == [False, True, True]  # asked at 4, 8, 12 only
  assert [s for s, (stop, _) in zip(range(1, 13), seen) if stop] == [8, 12]  # the next check step
  assert seen[7] == (True, True)
  # One process reads its flag every step and never calls the collective.
  calls.clear()
  signal_ = train._StopSignal()
  single = train._StopCheck(signal_, every=4, multi_process=False)
  assert not single.poll(5)[0]
  signal_.requested = True
  assert single.poll(6) == (True, True) and calls == []
  # jax's preemption sync point stops every process at its step without any agreement of ours.
  assert multi.poll(23) == (True, False) and single.poll(23)[1] is True


def test_pending_metrics_are_stacked_on_device_and_fetched_in_step_order():
  pending = train._Pending(chunk=3)
  values = [{"loss": jnp.float32(i) / 4, "count": jnp.int32(10 * i)} for i in range(10)]
  for v in values:
    pending.add(v)
  assert len(pending) == 10 and len(pending._steps) == 1 and len(pending._stacked) == 3
  fetched = pending.fetch()
  assert [float(h["loss"]) for h in fetched] == [i / 4 for i in range(10)]
  assert [int(h["count"]) for h in fetched] == [10 * i for i in range(10)]
  assert len(pending) == 0 and pending.fetch() == []


# ----------------------------------------------------------------------------- parameter check
def _replicas(mesh, spec, x, odd_device=None, change=None):
  """A global array of `x` laid out by `spec` whose copy on `odd_device` is changed by `change`."""
  sharding = jax.sharding.NamedSharding(mesh, spec)
  arrays = []
  for device, index in sharding.devices_indices_map(x.shape).items():
    block = np.array(x[index])
    if device.id == odd_device:
      block = change(block)
    arrays.append(jax.device_put(block, device))
  return jax.make_array_from_single_device_arrays(x.shape, sharding, arrays)


def _one_ulp(block):
  block.flat[0] = np.nextafter(block.flat[0], np.float32(np.inf))
  return block


def _negative_zero(block):
  block.flat[1] = -0.0
  return block


def test_params_check_finds_one_ulp_in_one_copy_and_names_step_and_leaf():
  # 2 x 4 devices: `w` replicated on all 8, `k` split over fsdp and replicated over data (devices
  # 2 and 6 hold the same block); the checksums are per device, so any copy that differs shows.
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"))
  P = jax.sharding.PartitionSpec
  r = np.random.RandomState(0)
  w = r.standard_normal((3, 5)).astype(np.float32)
  k = r.standard_normal((3, 8)).astype(np.float32)
  k[0, 1] = 0.0
  good = {"w": _replicas(mesh, P(), w), "k": _replicas(mesh, P(None, "fsdp"), k)}
  multihost.check_params_agree(good, 5)  # equal copies pass
  table = np.asarray(multihost.params_fingerprint(good))
  assert table.shape == (8, 2, 2) and table.dtype == np.uint32
  cases = [({"w": _replicas(mesh, P(), w, 5, _one_ulp)}, "['w']", "device 0 vs [5]"),
           ({"k": _replicas(mesh, P(None, "fsdp"), k, 6, _one_ulp)}, "['k']", "device 2 vs [6]"),
           ({"k": _replicas(mesh, P(None, "fsdp"), k, 4, _negative_zero)}, "['k']", "device 0 vs [4]")]
  for bad, leaf, where in cases:
    with pytest.raises(RuntimeError) as e:
      multihost.check_params_agree(dict(good, **bad), 1234)
    message = str(e.value)
    assert message.startswith("step 1234: ") and leaf in message and where in message, message
    assert ("['w']" in message) == (leaf == "['w']")  # only the leaf that differs is named


# ----------------------------------------------------------------------------- profile
def _trace_events(run_dir):
  with gzip.open(os.path.join(run_dir, "perfetto_trace.json.gz")) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def test_profile_steps_writes_a_trace_of_exactly_those_steps(toy, tmp_path):
  config = toy_config("--config.total_steps=6", "--config.log.every=2", "--config.checkpoint.every=0",
                      "--config.log.profile_steps=(3,2)")
  run(config, tmp_path / "on")
  runs = list((tmp_path / "on" / "profile" / "plugins" / "profile").iterdir())
  assert len(runs) == 1
  assert list(runs[0].glob("*.xplane.pb")) and (runs[0] / "perfetto_trace.json.gz").is_file()
  events = _trace_events(runs[0])
  marked = sorted(int(e["args"]["step_num"]) for e in events if e.get("name") == "train" and "args" in e)
  assert marked == [3, 4]
  log = (tmp_path / "on" / "train.log").read_text()
  assert "profiling steps 3-4 into" in log and f"wrote a profile of steps 3-4 to {runs[0]}" in log

  run(toy_config("--config.total_steps=6", "--config.checkpoint.every=0"), tmp_path / "off")
  assert not (tmp_path / "off" / "profile").exists()


def test_loop_config_keys_are_refused_when_misspelt_or_out_of_range(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="check_evry"):
    toy_config("--config.checkpoint.check_evry=5")
  for override, key in [("--config.log.profile_steps=(0,2)", "log.profile_steps"),
                        ("--config.checkpoint.check_every=0", "checkpoint.check_every"),
                        ("--config.checkpoint.params_check_every=-1", "checkpoint.params_check_every")]:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
      train.train(toy_config(override), str(tmp_path), data_iterator=iter(()), progress=False)
  assert not (tmp_path / "train.log").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- thousands of steps
def test_memory_and_step_rate_stay_flat_over_thousands_of_steps(toy, tmp_path):
  # 4000 steps on one device, logs every 100. A loop that keeps a device array (or a host object)
  # per step grows; one that syncs or gathers more as the run goes on slows down.
  steps = 4000
  config = toy_config(f"--config.total_steps={steps}", "--config.log.every=100", "--config.checkpoint.every=0",
                      *ts.mesh_overrides(1, 1), "--config.ema.rates=()")
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:1])
  it = Fixed(config, record=True)
  result, _ = run(config, tmp_path, it, mesh=mesh)
  assert result["step"] == steps and len(result["losses"]) == steps
  t, rss = np.asarray(it.times), np.asarray(it.rss)
  assert len(t) == steps
  growth = (rss[-1] - rss[1000]) / 2**20
  first, last = np.median(np.diff(t[:1000])), np.median(np.diff(t[-1000:]))
  print(f"RSS {rss[1000] / 2**20:.1f} -> {rss[-1] / 2**20:.1f} MiB over steps 1000-{steps}; "
        f"median step {first * 1e3:.3f} ms (first 1000) vs {last * 1e3:.3f} ms (last 1000)")
  assert growth < 2.0, growth
  assert last < 1.5 * first, (first, last)
