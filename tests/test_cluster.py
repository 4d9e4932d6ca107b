"""Multi-process start-up wherever jax can start it (explicit variables, SLURM, Open MPI, TPU,
Kubernetes), the refusal of a run that announces several processes but ends with one, data prepared
once in a multi-process run, and launch/slurm.sbatch."""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pathlib
import random
import shlex
import socket
import subprocess
import sys
import textwrap
import threading
from unittest import mock

import pytest

from glide_jax import config_lib, errors
from glide_jax.data import pipeline
from glide_jax.parallel import multihost

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

# A glide_shapes split that prepares in a few seconds (TFDS's name/config:version/kwargs form), big
# enough that two processes reaching the data at once overlap (6000 examples: ~5 s on 2 cores).
SHAPES_6000 = "glide_shapes/size32:1.0.0/train_examples=6000,validation_examples=8"
SHAPES_64 = "glide_shapes/size32:1.0.0/train_examples=64,validation_examples=8"
# A small U-Net and text transformer, so the two-process run compiles in about a minute.
SMALL_MODEL = ["--config.model.options.channel_mult=1", "--config.model.options.image_size=8",
               "--config.model.options.attention_resolutions=8", "--config.model.options.xf_layers=1",
               "--config.model.options.xf_width=32", "--config.model.options.xf_heads=1"]
# XLA compiles faster at -O0 (local.py keeps these and adds the device count).
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "GLIDE_JAX_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES",
                    "JAX_PROCESS_ID", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_COMPLETION")


def _env(**extra) -> dict[str, str]:
  """The parent's environment without cluster or device-count variables, plus `extra`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_PREFIXES)}
  env.pop("XLA_FLAGS", None)
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  env.update(extra)
  return env


# ----------------------------------------------------------------------------- detection (pure)

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "16",
              "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_STEP_NUM_NODES": "2"}
OMPI4 = {"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
         "OMPI_MCA_orte_hnp_uri": "1531576320.0;tcp://10.96.0.1,10.148.0.1:34911"}


def _jax_cluster(name: str, env: dict[str, str]):
  """jax's own verdict on `env`: (is_env_present, process count, process id) of its cluster class."""
  from jax._src import clusters
  cls = {"slurm": clusters.SlurmCluster, "ompi": clusters.OmpiCluster}[name]
  with mock.patch.dict(os.environ, env, clear=True):
    if not cls.is_env_present():
      return False, None, None
    return True, cls.get_process_count(), cls.get_process_id()


@pytest.mark.parametrize("name,env", [
    ("slurm", SLURM_STEP),
    ("slurm", {**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}),
    ("slurm", {k: v for k, v in SLURM_STEP.items() if k != "SLURM_STEP_NODELIST"}),  # a batch step
    ("ompi", OMPI4),
    ("ompi", {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}),    # Open MPI 5
])
def test_detection_agrees_with_jax(name, env):
  cluster = multihost.detect_cluster(env)
  present, n, i = _jax_cluster(name, env)
  assert cluster.kind == name and cluster.jax_detects == present
  assert (cluster.num_processes, cluster.process_id) == (int(env[next(k for k in env if k.endswith(
      ("NTASKS", "WORLD_SIZE")))]), int(env[next(k for k in env if k.endswith(("PROCID", "WORLD_RANK")))]))
  if present:
    assert (cluster.num_processes, cluster.process_id) == (n, i)


def test_detection_of_each_environment():
  d = multihost.detect_cluster
  assert d({}) == multihost.Cluster("single", 1, 0) and not d({}).multi
  # srun, 16 tasks on 2 nodes: jax starts it
  c = d(SLURM_STEP)
  assert (c.kind, c.num_processes, c.process_id, c.multi, c.jax_detects) == ("slurm", 16, 9, True, True)
  assert "SLURM_NTASKS=16" in c.describe() and "SLURM_PROCID=9" in c.describe()
  # one task, or an ssh session into an allocation (SLURM_JOB_ID alone): one process
  assert not d({**SLURM_STEP, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}).multi
  assert not d({"SLURM_JOB_ID": "7", "SLURM_NODELIST": "gpu001"}).multi
  # the batch step of a 16-task allocation: announced, but jax cannot start it (no step node list)
  batch = d({k: v for k, v in SLURM_STEP.items() if k not in ("SLURM_STEP_NODELIST", "SLURM_LOCALID")})
  assert batch.multi and not batch.jax_detects
  assert "SLURM_STEP_NODELIST" in batch.missing and "SLURM_LOCALID" in batch.missing
  # Open MPI 4 (mpirun), inside a SLURM allocation too: Open MPI first, as jax
  c = d({**OMPI4, **SLURM_STEP})
  assert (c.kind, c.num_processes, c.process_id, c.jax_detects, c.method) == ("ompi", 4, 3, True, None)
  ompi5 = {k: v for k, v in OMPI4.items() if k != "OMPI_MCA_orte_hnp_uri"}
  assert not d(ompi5).jax_detects and d(ompi5, have_mpi4py=True).method == "mpi4py"
  # MPICH / Intel MPI: only through mpi4py
  c = d({"PMI_SIZE": "8", "PMI_RANK": "5"}, have_mpi4py=True)
  assert (c.kind, c.num_processes, c.process_id, c.method) == ("mpi", 8, 5, "mpi4py")
  assert not d({"PMI_SIZE": "8", "PMI_RANK": "5"}).jax_detects
  # GKE TPU, 2 slices of 4 hosts: worker 2 of slice 1 is process 6 of 8 (jax's numbering)
  tpu = {"TPU_WORKER_HOSTNAMES": "h0,h1,h2,h3", "TPU_WORKER_ID": "2", "MEGASCALE_NUM_SLICES": "2",
         "MEGASCALE_SLICE_ID": "1", "MEGASCALE_COORDINATOR_ADDRESS": "h0", "KUBERNETES_SERVICE_HOST": "10.0.0.1",
         "JOB_COMPLETION_INDEX": "2"}
  c = d(tpu, on_tpu_vm=True)
  assert (c.kind, c.num_processes, c.process_id, c.jax_detects) == ("tpu", 8, 6, True)
  assert not d(tpu).jax_detects  # TPU variables on a machine without TPU chips
  # the compile-only TPU environment of `glide-jax plan` is one host
  assert not d({"TPU_WORKER_HOSTNAMES": "localhost", "TPU_SKIP_MDS_QUERY": "1"}).multi
  # a GCE TPU VM: nothing in the environment, jax asks the metadata server
  c = d({}, on_tpu_vm=True)
  assert (c.kind, c.num_processes, c.multi) == ("tpu", None, True)
  # a Kubernetes Indexed Job of GPU pods: the count comes from the API (jax[k8s])
  k8s = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "JOB_COMPLETION_INDEX": "3"}
  c = d(k8s, have_kubernetes=True)
  assert (c.kind, c.num_processes, c.process_id, c.multi, c.jax_detects) == ("kubernetes", None, 3, True, True)
  assert not d(k8s).jax_detects and "kubernetes" in d(k8s).missing[0]
  assert not d({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}).multi  # a plain pod


def test_explicit_variables_win():
  d = multihost.detect_cluster
  ours = {"GLIDE_JAX_COORDINATOR": "n0:1234", "GLIDE_JAX_NUM_PROCESSES": "2", "GLIDE_JAX_PROCESS_ID": "1"}
  c = d({**ours, **SLURM_STEP, **OMPI4})
  assert (c.kind, c.num_processes, c.process_id, c.coordinator) == ("explicit", 2, 1, "n0:1234")
  # GLIDE_JAX_NUM_PROCESSES=1: one process on purpose, whatever the launcher says
  assert not d({"GLIDE_JAX_NUM_PROCESSES": "1", **SLURM_STEP}).multi
  with pytest.raises(ValueError, match="GLIDE_JAX_PROCESS_ID"):
    d({"GLIDE_JAX_COORDINATOR": "n0:1234", "GLIDE_JAX_NUM_PROCESSES": "2"})
  with pytest.raises(ValueError, match=r"GLIDE_JAX_PROCESS_ID=2 is not in \[0, GLIDE_JAX_NUM_PROCESSES=2\)"):
    d({**ours, "GLIDE_JAX_PROCESS_ID": "2"})
  with pytest.raises(ValueError, match="SLURM_NTASKS='two'"):
    d({**SLURM_STEP, "SLURM_NTASKS": "two"})


# ----------------------------------------------------------------------------- the refusal

def test_refuses_an_announced_run_jax_cannot_start(monkeypatch):
  # `glide-jax train` in the batch step of a 2-task allocation (no srun): nothing is started.
  for k in [k for k in os.environ if k.startswith(CLUSTER_PREFIXES)]:
    monkeypatch.delenv(k)
  for k, v in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}.items():
    monkeypatch.setenv(k, v)
  started = []
  monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *a, **k: started.append(1))
  with pytest.raises(multihost.MultiHostError) as e:
    multihost.initialize()
  assert not started
  message = str(e.value)
  assert message.startswith("SLURM_JOB_ID=77 SLURM_NTASKS=2 SLURM_PROCID=0 announce 2 slurm processes")
  assert "SLURM_STEP_NODELIST" in message and "srun" in message and "GLIDE_JAX_NUM_PROCESSES=1" in message
  assert errors.is_user_error(e.value)  # the CLI prints it in one line
  # GLIDE_JAX_NUM_PROCESSES=1 runs the one process on purpose
  monkeypatch.setenv("GLIDE_JAX_NUM_PROCESSES", "1")
  assert multihost.initialize() is False and not started


REFUSED = textwrap.dedent("""
    import sys, jax
    jax.distributed.initialize = lambda *a, **k: None  # a launcher jax "started" but never joined
    from glide_jax import cli
    sys.exit(cli.main(["train", "--config", "configs/shapes.py:runlocal", "--workdir", sys.argv[1]]))
""")


def test_refuses_a_run_that_ends_with_one_process(tmp_path):
  # Every SLURM variable jax reads, but this process ends up alone: jax.process_count() == 1.
  env = _env(JAX_PLATFORMS="cpu", SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_LOCALID="1",
             SLURM_STEP_NODELIST="localhost", SLURM_STEP_NUM_NODES="1")
  out = subprocess.run([sys.executable, "-c", REFUSED, str(tmp_path / "w")], cwd=str(ROOT), env=env,
                       check=False, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("glide-jax train: SLURM_JOB_ID=4242 SLURM_STEP_NODELIST=localhost SLURM_NTASKS=2 "
                         "SLURM_PROCID=1 SLURM_LOCALID=1"), line
  assert "announce 2 slurm processes but jax.process_count()==1" in line, line
  assert not (tmp_path / "w").exists()  # refused before anything was written


# ----------------------------------------------------------------------------- srun on localhost

WORKER = textwrap.dedent("""
    import json, logging, sys
    logging.basicConfig(level=logging.INFO)
    from glide_jax.parallel import multihost
    assert multihost.initialize() and multihost.initialize()  # idempotent
    import jax, numpy as np
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array([10 + jax.process_index()]))
    result = json.dumps({"index": jax.process_index(), "count": jax.process_count(),
                         "devices": jax.device_count(), "gathered": gathered.ravel().tolist()})
    # One write of the whole line: print() writes each argument apart, and gloo's own log lines on
    # the same stdout have landed between them.
    sys.stdout.write("RESULT " + result + "\\n")
    sys.stdout.flush()
""")


def _slurm_job_id() -> int:
  """A SLURM_JOB_ID whose port (jax: 61440 + id mod 4096) is free on this machine now."""
  for _ in range(200):
    port = random.randrange(61440, 65536)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
    return 4096 * 1000 + port - 61440
  raise RuntimeError("no free port in 61440..65535")


@pytest.mark.slow
def test_two_processes_started_as_srun_starts_them(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  job = str(_slurm_job_id())
  procs = []
  for i in range(2):
    env = _env(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2", SLURM_JOB_ID=job,
               SLURM_NTASKS="2", SLURM_PROCID=str(i), SLURM_LOCALID=str(i), SLURM_NODEID="0",
               SLURM_STEP_NODELIST="localhost", SLURM_NODELIST="localhost", SLURM_JOB_NODELIST="localhost",
               SLURM_STEP_NUM_NODES="1", SLURM_STEP_NUM_TASKS="2", SLURM_NNODES="1")
    procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240)[0])
  finally:
    for p in procs:
      p.kill() if p.poll() is None else None
  shown = "\n".join(f"---- SLURM_PROCID={i} exit {p.returncode}\n{o[-3000:]}" for i, (p, o) in enumerate(zip(procs, outs)))
  assert all(p.returncode == 0 for p in procs), shown
  results = [json.loads(ln.split("RESULT ", 1)[1]) for o in outs for ln in o.splitlines() if "RESULT " in ln]
  assert [r["index"] for r in results] == [0, 1], shown  # outs in SLURM_PROCID order
  assert all(r["count"] == 2 and r["devices"] == 4 and r["gathered"] == [10, 11] for r in results), results
  assert any("jax.distributed (slurm): process 0 of 2" in o for o in outs), outs[0][-2000:]


# ----------------------------------------------------------------------------- data prepared once

@pytest.mark.slow
def test_two_processes_prepare_the_data_once(tmp_path):
  # A fresh data dir: before, both processes prepared glide_shapes into it at once.
  data_dir, workdir = tmp_path / "tfds", tmp_path / "work"
  train = [sys.executable, "-m", "glide_jax.cli", "train", "--config", "configs/shapes.py:runlocal",
           "--workdir", str(workdir), "--no-progress", f"--config.data.name={SHAPES_6000}",
           f"--config.data.data_dir={data_dir}", "--config.total_steps=2", "--config.checkpoint.every=2",
           *SMALL_MODEL]
  out = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--processes", "2", "--devices-per-process", "2",
                        "--timeout", "600", "--", *train],
                       cwd=str(ROOT), check=False, capture_output=True, text=True, env=_env(XLA_FLAGS=FAST_XLA),
                       timeout=700)
  text = out.stdout + out.stderr
  assert out.returncode == 0, text[-6000:]
  assert "process 0/2" in (workdir / "train.log").read_text()  # both processes joined one run
  assert "step 2 " in (workdir / "train.log").read_text()
  # Exactly one process prepared; the other waited for it (or found it prepared).
  preparing = [ln[:4] for ln in text.splitlines() if "preparing glide_shapes" in ln]
  waiting = [ln[:4] for ln in text.splitlines() if "waiting for glide_shapes" in ln]
  assert len(preparing) == 1 and preparing[0] in ("[0] ", "[1] "), text[-6000:]
  assert len(waiting) <= 1 and preparing[0] not in waiting, text[-6000:]
  version_dir = data_dir / "glide_shapes" / "size32"
  assert sorted(p.name for p in version_dir.iterdir() if not p.name.startswith(".")) == ["1.0.0"]


def _hold_lock(data_dir):
  import filelock
  lock_dir = data_dir / "glide_shapes" / "size32"
  lock_dir.mkdir(parents=True)
  return filelock.FileLock(str(lock_dir / ".1.0.0.prepare.lock"), thread_local=False)  # released by a thread


def test_waits_for_the_process_that_prepares(tmp_path, caplog):
  # Another process holds the lock and prepares; load_builder waits, then reads its result.
  import tensorflow_datasets as tfds

  data_dir = tmp_path / "tfds"
  lock = _hold_lock(data_dir)
  lock.acquire()
  released = threading.Event()

  def other():
    tfds.builder(SHAPES_64, data_dir=str(data_dir)).download_and_prepare(file_format=pipeline.DEFAULT_FILE_FORMAT)
    lock.release()
    released.set()

  caplog.set_level(logging.INFO, logger="glide_jax.data.pipeline")
  thread = threading.Timer(1.0, other)
  thread.start()
  builder = pipeline.load_builder({"name": SHAPES_64, "data_dir": str(data_dir), "prepare_timeout": 120})
  thread.join()
  assert released.is_set() and builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 64
  messages = [r.getMessage() for r in caplog.records]
  assert any("waiting for glide_shapes" in m for m in messages), messages
  assert not any("preparing glide_shapes" in m for m in messages), messages


def test_wait_times_out_naming_the_directory_and_command(tmp_path):
  data_dir = tmp_path / "tfds"
  lock = _hold_lock(data_dir)
  with lock, pytest.raises(errors.UserError) as e:
    pipeline.load_builder({"name": SHAPES_64, "data_dir": str(data_dir), "prepare_timeout": 0.5})
  message = str(e.value)
  assert message.startswith("waited 0.5 s (data.prepare_timeout) for the process holding ")
  assert str(data_dir / "glide_shapes" / "size32" / "1.0.0") in message
  assert (f"`glide-jax data prepare --name glide_shapes/size32 --train-examples 64 --validation-examples 8 "
          f"--data-dir {data_dir}`") in message
  assert not (data_dir / "glide_shapes" / "size32" / "1.0.0").exists()  # nothing prepared in parallel


def test_without_file_locks_process_0_prepares_and_the_others_poll(tmp_path, monkeypatch):
  # A bucket or a file system without flock: process 1 polls for what process 0 prepares.
  import filelock

  def no_flock(self, *a, **k):
    raise NotImplementedError("FileSystem does not appear to support flock")

  monkeypatch.setattr(filelock.FileLock, "acquire", no_flock)
  monkeypatch.setattr(pipeline, "_process_index", lambda: 1)
  data_dir = tmp_path / "tfds"
  with pytest.raises(errors.UserError, match="for process 0 to prepare"):
    pipeline.load_builder({"name": SHAPES_64, "data_dir": str(data_dir), "prepare_timeout": 0.3})
  import tensorflow_datasets as tfds
  threading.Timer(0.5, lambda: tfds.builder(SHAPES_64, data_dir=str(data_dir)).download_and_prepare(
      file_format=pipeline.DEFAULT_FILE_FORMAT)).start()
  builder = pipeline.load_builder({"name": SHAPES_64, "data_dir": str(data_dir), "prepare_timeout": 120})
  assert builder.info.splits["train"].num_examples == 64


def test_unpreparable_datasets_name_the_command(tmp_path):
  with pytest.raises(FileNotFoundError, match="glide-jax data build --images DIR --out DATA_DIR"):
    pipeline.load_builder({"name": "image_folder", "data_dir": str(tmp_path)})


# ----------------------------------------------------------------------------- launch/slurm.sbatch

def _parse_glide_jax(argv: list[str]) -> argparse.Namespace:
  """`argv` (after `glide-jax`) through the command's own parser, as glide_jax.cli.main does."""
  module = importlib.import_module(f"glide_jax.commands.{argv[0].replace('-', '_')}")
  parser = argparse.ArgumentParser(prog=f"glide-jax {argv[0]}")
  module.add_arguments(parser)
  if parser.get_default("config_overrides") is not None:
    return config_lib.parse_args(parser, argv[1:])
  return parser.parse_args(argv[1:])


def test_slurm_sbatch_script(tmp_path):
  script = LAUNCH / "slurm.sbatch"
  assert subprocess.run(["bash", "-n", str(script)], check=False, capture_output=True).returncode == 0
  directives = [ln for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
  assert "#SBATCH --gpus-per-node=8" in directives and "#SBATCH --ntasks-per-node=8" in directives
  assert not any("--gpus-per-task" in d for d in directives)
  env = _env(DRY_RUN="1", GLIDE_JAX_DATA_DIR=str(tmp_path / "tfds"),
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], PYTHON=sys.executable)
  out = subprocess.run(["bash", str(script), "configs/shapes.py:runlocal", str(tmp_path / "w"),
                        "--config.total_steps=3"], cwd=str(ROOT), env=env, check=False, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  prepare, train = (shlex.split(ln) for ln in out.stdout.strip().splitlines())
  assert prepare[:3] == ["glide-jax", "data", "prepare"]
  args = _parse_glide_jax(prepare[1:])
  assert (args.name, args.data_dir) == ("glide_shapes/size32", str(tmp_path / "tfds"))
  assert train[0] == "srun" and "--kill-on-bad-exit=1" in train
  args = _parse_glide_jax(train[train.index("glide-jax") + 1:])
  config = config_lib.config_from_args(args)  # every override names a real key
  assert args.workdir == str(tmp_path / "w") and args.no_progress
  assert config.data.data_dir == str(tmp_path / "tfds") and config.total_steps == 3
  # no arguments: the usage, exit 2
  bad = subprocess.run(["bash", str(script)], check=False, capture_output=True, text=True, env=env)
  assert bad.returncode == 2 and "sbatch --nodes" in bad.stdout


def test_a_workdir_saved_before_prepare_timeout_resumes():
  # data.prepare_timeout is new: a checkpoint's config without it must not be a mismatch.
  import ml_collections

  from glide_jax.train import checkpoint

  config = config_lib.load_config("configs/shapes.py:runlocal")
  saved = config.to_dict()
  del saved["data"]["prepare_timeout"]
  saved = ml_collections.ConfigDict(saved)
  assert config_lib.diff_configs(saved, config) == ["data.prepare_timeout"]
  assert config_lib.diff_configs(saved, config, ignore=checkpoint.RESUMABLE_KEYS) == []
