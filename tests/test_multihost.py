"""Two processes x two CPU devices on localhost (jax.distributed, gloo) against one process x four."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import train_support as ts

from glide_jax import bundle
from glide_jax.train import train

pytestmark = pytest.mark.slow  # multi-process jobs (docs/testing.md)

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, {tests!r})
import jax, numpy as np
import train_support as ts
from glide_jax.parallel import multihost
from glide_jax.train import train

multihost.initialize()
ts.enable_compilation_cache({cache!r})
config = ts.tiny_config("base", "--config.total_steps=3", *ts.mesh_overrides(4, 1), *ts.SGD,
                        "--config.init_from={init}", "--config.log.tensorboard=true")
it = ts.SyntheticIterator(config, jax.process_index(), jax.process_count())
r = train.train(config, {workdir!r}, data_iterator=it, tokenizer=ts.tokenizer(config), progress=False,
                compiler_options=ts.FAST)
state = r["state"]
# Every process's own copy of the (data-parallel: replicated over processes) parameters.
local = {{jax.tree_util.keystr(p): np.asarray(x.addressable_shards[0].data) for p, x in
          jax.tree_util.tree_leaves_with_path(state.params) if x.sharding.is_fully_replicated}}
np.savez(os.path.join({workdir!r}, f"params_{{jax.process_index()}}.npz"), **local)
# One write of the whole line (gloo's log lines share the unbuffered stdout).
sys.stdout.write("RESULT " + json.dumps({{"process": jax.process_index(), "count": jax.process_count(),
                                          "losses": r["losses"], "replicated": len(local)}}) + "\n")
sys.stdout.flush()
"""


def test_two_processes_agree_and_equal_one_process_on_four_devices(tmp_path_factory):
  # Perturbed parameters and SGD: each process's gradient is averaged over the hosts, and a sum
  # (Adam would not notice) doubles the steps; gradient norms are compared from the logs too.
  cache = ts.session_cache(tmp_path_factory)
  init = ts.perturbed_bundle(ts.tiny_config("base"), tmp_path_factory.mktemp("init") / "bundle")
  workdir = tmp_path_factory.mktemp("multihost")
  script = tmp_path_factory.mktemp("script") / "mh.py"
  script.write_text(SCRIPT.format(tests=str(TESTS), cache=cache, workdir=str(workdir), init=init))
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "launch/local.py", "--processes", "2", "--devices-per-process", "2",
                         "--", sys.executable, str(script)], cwd=str(REPO), env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
  assert sorted(r["process"] for r in results) == [0, 1] and all(r["count"] == 2 for r in results)
  assert results[0]["losses"] == results[1]["losses"]
  p0, p1 = (np.load(workdir / f"params_{i}.npz") for i in (0, 1))
  assert set(p0.files) == set(p1.files) and len(p0.files) == results[0]["replicated"] > 0
  for k in p0.files:
    np.testing.assert_array_equal(p0[k], p1[k])  # the processes agree bit for bit
  # Only process 0 writes logs: its header, each step once, one TensorBoard file.
  log = (workdir / "train.log").read_text()
  assert log.count("process 0/2") == 1 and "process 1/2" not in log
  multi_log = ts.logged_steps(workdir)
  assert sorted(multi_log) == [1, 2, 3]
  assert len(list((workdir / "tensorboard").glob("events.*"))) == 1

  # The same run in one process on four devices.
  config = ts.tiny_config("base", "--config.total_steps=3", *ts.mesh_overrides(4, 1), *ts.SGD,
                          f"--config.init_from={init}")
  from glide_jax.parallel import mesh as mesh_lib
  mesh = mesh_lib.make_mesh(config.mesh, jax.devices()[:4])
  single_dir = tmp_path_factory.mktemp("single")
  single = train.train(config, str(single_dir), data_iterator=ts.SyntheticIterator(config),
                       tokenizer=ts.tokenizer(config), progress=False, mesh=mesh, compiler_options=ts.FAST)
  np.testing.assert_allclose(results[0]["losses"], single["losses"], rtol=1e-5)
  single_log = ts.logged_steps(single_dir)
  for step in (1, 2, 3):
    np.testing.assert_allclose(multi_log[step]["grad_norm"], single_log[step]["grad_norm"], rtol=1e-4)
  init_params = {jax.tree_util.keystr(p): x for p, x in
                 jax.tree_util.tree_leaves_with_path(bundle.load_bundle(init)[0])}
  moved, names = [], []
  for path, x in jax.tree_util.tree_leaves_with_path(single["state"].params):
    key = jax.tree_util.keystr(path)
    if key in p0.files:
      np.testing.assert_allclose(p0[key], np.asarray(x), rtol=1e-5, atol=1e-6)
      moved.append(np.abs(p0[key] - init_params[key]).max())
      names.append(key)
  # Trained far above atol: all but biases that a GroupNorm of one channel per group cancels.
  still = [n for m, n in zip(moved, names) if m <= 1e-4]
  assert all(n.endswith("['bias']") for n in still) and len(still) < len(moved) // 4, (len(moved), still)
