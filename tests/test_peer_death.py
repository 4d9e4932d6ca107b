"""A 2-process training job (jax.distributed, gloo) whose peer is SIGKILLed mid-training: the survivor
exits, non-zero and with a message about the dead task, in bounded time instead of hanging in a
collective.

The processes are started the way launch/local.py starts them (its environment), but not through
its supervisor loop: that loop would SIGTERM the survivor as soon as the victim dies, hiding what
the survivor does on its own.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import train_support as ts

pytestmark = pytest.mark.slow  # multi-process jobs (docs/testing.md)

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent

_spec = importlib.util.spec_from_file_location("launch_local", REPO / "launch" / "local.py")
local = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(local)

# The model, mesh and compiler options of test_multihost.py: the XLA cache is shared with it.
SCRIPT = r"""
import sys
sys.path.insert(0, {tests!r})
import jax
import train_support as ts
from glide_jax.parallel import multihost
from glide_jax.train import train

multihost.initialize()
ts.enable_compilation_cache({cache!r})
config = ts.tiny_config("base", "--config.total_steps=1000000", "--config.checkpoint.every=1000000",
                        *ts.mesh_overrides(4, 1))
it = ts.SyntheticIterator(config, jax.process_index(), jax.process_count())
train.train(config, {workdir!r}, data_iterator=it, tokenizer=ts.tokenizer(config), progress=False,
            compiler_options=ts.FAST)
print("TRAINING RETURNED", flush=True)
"""

BOUND_S = 120  # jax.distributed's heartbeat timeout (60 s, multihost.initialize) plus slack


@pytest.mark.parametrize("victim", [1, 0], ids=["worker-dies", "coordinator-dies"])
def test_survivor_exits_with_a_message_when_its_peer_is_killed(victim, tmp_path, tmp_path_factory):
  cache = ts.session_cache(tmp_path_factory)
  script = tmp_path / "job.py"
  workdir = tmp_path / "wd"
  script.write_text(SCRIPT.format(tests=str(TESTS), cache=cache, workdir=str(workdir)))
  base = dict(os.environ)
  base.pop("XLA_FLAGS", None)  # process_env sets the device count per process
  coordinator = f"localhost:{local.free_port()}"
  outs = [tmp_path / f"out{i}.txt" for i in range(2)]
  files = [open(o, "w") for o in outs]  # noqa: SIM115 - the children's stdout, closed below
  procs = [subprocess.Popen([sys.executable, str(script)], cwd=str(REPO), stdout=files[i],
                            stderr=subprocess.STDOUT, env=local.process_env(base, i, 2, coordinator, 2))
           for i in range(2)]
  try:
    log = workdir / "train.log"  # written by process 0 after every step (log.every=1)
    t0 = time.time()
    while not (log.is_file() and "step 3 " in log.read_text()):
      assert all(p.poll() is None for p in procs), [o.read_text()[-2000:] for o in outs]
      assert time.time() - t0 < 600, "training did not start"
      time.sleep(0.1)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.time()
    survivor = procs[1 - victim]
    try:
      code = survivor.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f"the survivor still runs {BOUND_S}s after its peer died (hung in a collective?)")
    waited = time.time() - killed_at
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in files:
      f.close()
  out = outs[1 - victim].read_text()
  assert code != 0, out[-3000:]
  assert "TRAINING RETURNED" not in out
  # jax's coordination service names the problem: the dead task (heartbeats stopped) or the lost leader.
  assert "another task died" in out, out[-3000:]
  if victim == 1:
    assert "stopped sending heartbeats" in out, out[-3000:]
  else:
    assert "leader task was preempted/died" in out, out[-3000:]
  print(f"survivor exited with code {code} {waited:.1f}s after the kill")
