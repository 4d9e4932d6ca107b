"""launch/local.py (a real 2-process jax.distributed job on localhost), launch/gke.py manifests and
launch/tpu_vm.sh's command plan."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def _env():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # local.py sets the device count per process
  env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
  return env


WORKER = textwrap.dedent("""
    import os, sys, jax, numpy as np
    jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"], int(os.environ["JAX_NUM_PROCESSES"]),
                               int(os.environ["JAX_PROCESS_ID"]))
    from jax.experimental import multihost_utils
    gathered = multihost_utils.process_allgather(np.array([10 + jax.process_index()]))
    # One write of the whole line: print() writes each argument apart, and gloo's own log lines on
    # the same unbuffered stdout (launch/local.py) have landed between them.
    sys.stdout.write(" ".join(map(str, ["RESULT", jax.process_index(), jax.process_count(), jax.device_count(),
                                        jax.local_device_count(), gathered.ravel().tolist(),
                                        os.environ["GLIDE_JAX_PROCESS_ID"]])) + "\\n")
    sys.stdout.flush()
""")


def test_local_two_process_job(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  out = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--processes", "2", "--devices-per-process", "2",
                        "--timeout", "120", "--", sys.executable, str(script)],
                       capture_output=True, text=True, env=_env(), timeout=180)
  assert out.returncode == 0, out.stdout + out.stderr
  results = sorted(line.split("RESULT ", 1)[1] for line in out.stdout.splitlines() if "RESULT " in line)
  # each process sees 2 processes, 4 global devices, 2 local, and both processes' values
  assert results == ["0 2 4 2 [10, 11] 0", "1 2 4 2 [10, 11] 1"], out.stdout
  assert any(line.startswith("[0] ") for line in out.stdout.splitlines())
  assert any(line.startswith("[1] ") for line in out.stdout.splitlines())


def test_local_failure_stops_the_others(tmp_path):
  script = tmp_path / "fail.py"
  script.write_text("import os, sys, time\n"
                    "if os.environ['JAX_PROCESS_ID'] == '1': sys.exit(3)\n"
                    "time.sleep(120)\n")
  start = time.time()
  out = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--processes", "2", "--",
                        sys.executable, str(script)], capture_output=True, text=True, env=_env(), timeout=100)
  assert out.returncode == 3, out.stdout + out.stderr
  assert time.time() - start < 60
  assert "process 1 exited with code 3" in out.stderr


def test_local_substitutes_placeholders(tmp_path):
  out = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--processes", "3", "--", sys.executable, "-c",
                        "import os; print('P', '{process_id}', '{num_processes}', os.environ['XLA_FLAGS'])"],
                       capture_output=True, text=True, env=_env(), timeout=60)
  assert out.returncode == 0, out.stderr
  lines = sorted(l.split("P ", 1)[1] for l in out.stdout.splitlines() if " P " in l)
  assert lines == [f"{i} 3 --xla_force_host_platform_device_count=1" for i in range(3)]


def test_local_needs_a_command():
  out = subprocess.run([sys.executable, str(LAUNCH / "local.py"), "--processes", "2"], capture_output=True,
                       text=True, env=_env(), timeout=60)
  assert out.returncode == 2 and "command" in out.stderr


def _gke(*args):
  return subprocess.run([sys.executable, str(LAUNCH / "gke.py"), *args], capture_output=True, text=True,
                        env=_env(), timeout=60)


def test_gke_jobset_manifest():
  yaml = pytest.importorskip("yaml")
  args = ["--name", "glide-base", "--image", "img:1", "--tpu-type", "v5p", "--topology", "4x4x4",
          "--num-slices", "2", "--env", "A=b", "--", "glide-jax", "train", "--config",
          "configs/base.py:variant=full", "--workdir", "gs://bucket/run 1"]
  out = _gke(*args)
  assert out.returncode == 0, out.stderr
  doc = yaml.safe_load(out.stdout)
  assert doc == json.loads(_gke("--json", *args).stdout)  # the YAML says what the JSON says
  assert doc["kind"] == "JobSet" and doc["apiVersion"].startswith("jobset.x-k8s.io/")
  job = doc["spec"]["replicatedJobs"][0]
  assert job["replicas"] == 2
  spec = job["template"]["spec"]
  assert spec["parallelism"] == spec["completions"] == 16  # 64 chips / 4 per host
  pod = spec["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "4x4x4"}
  container = pod["containers"][0]
  assert container["resources"]["limits"]["google.com/tpu"] == 4
  assert container["command"][:2] == ["bash", "-c"]
  assert "'gs://bucket/run 1'" in container["command"][2]
  env = {e["name"]: e.get("value") for e in container["env"]}
  assert env["MEGASCALE_NUM_SLICES"] == "2" and env["A"] == "b" and "MEGASCALE_SLICE_ID" in env


def test_gke_refuses_bad_input():
  assert _gke("--name", "Bad_Name", "--image", "i", "--", "x").returncode == 2
  out = _gke("--name", "ok", "--image", "i", "--tpu-type", "v5p", "--topology", "3x1x1", "--", "x")
  assert out.returncode == 2 and "4-chip hosts" in out.stderr
  assert _gke("--name", "ok", "--image", "i").returncode == 2


def test_tpu_vm_dry_run(tmp_path):
  out = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "all", "--tpu", "glide-v5p", "--zone", "us-east5-a",
                        "--type", "v5p-128", "--run-name", "r1", "--workers", "2", "--dry-run", "--",
                        "glide-jax", "train", "--config", "configs/base.py:variant=full"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
  assert out.returncode == 0, out.stderr
  lines = [l for l in out.stdout.splitlines() if l.startswith("+ gcloud")]
  assert "create glide-v5p --zone us-east5-a --accelerator-type v5p-128 --version v2-alpha-tpuv5" in lines[0]
  assert sum("--worker=all" in l for l in lines) == 3  # copy, install, run
  assert "glide-jax\\\\\\ train" in lines[3] or "glide-jax\\ train" in lines[3]
  assert [l.split("--worker=")[1].split()[0] for l in lines[4:]] == ["0", "1"]  # logs per worker
  assert not (tmp_path / "logs").exists()  # a dry run touches nothing
  bad = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), "run", "--zone", "z"], capture_output=True, text=True)
  assert bad.returncode == 2 and "--tpu" in bad.stderr


def _stub_timeout_and_glide_jax(tmp_path):
  """A bin folder for PATH whose `timeout` writes its arguments to the returned file and exits 3
  (stopping a demo script at its training command) and whose `glide-jax` does nothing."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  record = tmp_path / "timeout_args"
  (bin_dir / "timeout").write_text(f'#!/usr/bin/env bash\necho "$@" > {record}\nexit 3\n')
  (bin_dir / "glide-jax").write_text("#!/usr/bin/env bash\nexit 0\n")
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  return bin_dir, record


@pytest.mark.parametrize("script,minutes", [("demo.sh", 45), ("demo_distill.sh", 40), ("demo_upsample.sh", 20),
                                            ("demo_inpaint.sh", 20)])
def test_demo_scripts_bound_training_by_their_documented_minutes(tmp_path, script, minutes):
  """Each demo script's training runs under `timeout` with the minutes its header documents (a script
  that set its own default after sourcing demo_lib.sh, which sets 20 first, silently got 20).
  `timeout` and `glide-jax` are stubs on PATH: the stub timeout records its seconds and fails, which
  stops the script right there."""
  bin_dir, record = _stub_timeout_and_glide_jax(tmp_path)
  base = tmp_path / "base"
  base.mkdir()
  (base / "meta.json").write_text("{}")
  header = (LAUNCH / script).read_text().split("set -euo pipefail")[0]
  assert f"{minutes}" in header, f"{script}'s header no longer documents {minutes} minutes"
  env = {k: v for k, v in os.environ.items() if k not in ("TRAIN_MINUTES", "QUICK")}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SKIP_SETUP="1", WORKDIR=str(tmp_path / "w"),
             BASE=str(base), DATA_DIR=str(tmp_path / "data"))
  proc = subprocess.run(["bash", str(LAUNCH / script)], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 3, proc.stdout + proc.stderr
  args = record.read_text().split()
  assert args[:3] == ["-s", "TERM", str(minutes * 60)] and args[4] == "train", args


@pytest.mark.parametrize("schedule,checkpoints,expected", [
    # the demo's schedule: phase 1, then one round 8 -> 4
    (dict(guidance_steps=1400, steps_per_round=400, start_steps=8, final_steps=4), [1400, 1800],
     {"exports": [("1400", "bundle8"), (None, "bundle")],
      "sweeps": [("bundle8", "trailing8", "sweep8"), ("bundle4", "trailing4", "sweep4"),
                 ("bundle8", "trailing4", "sweep4_from8")]}),
    # run Q's: 16 -> 8 -> 4, the middle round's student closes at 600 + 600
    (dict(guidance_steps=600, steps_per_round=600, start_steps=16, final_steps=4), [600, 1200, 1800],
     {"exports": [("600", "bundle16"), ("1200", "bundle8"), (None, "bundle")],
      "sweeps": [("bundle16", "trailing16", "sweep16"), ("bundle8", "trailing8", "sweep8"),
                 ("bundle4", "trailing4", "sweep4"), ("bundle16", "trailing4", "sweep4_from16")]}),
    # stopped inside the round: the phase-1 student only (the latest is not a finished 4-step one)
    (dict(guidance_steps=1400, steps_per_round=400, start_steps=8, final_steps=4), [1400, 1600],
     {"exports": [("1400", "bundle8")], "sweeps": [("bundle8", "trailing8", "sweep8")]}),
    # stopped inside phase 1: no student at all
    (dict(guidance_steps=1400, steps_per_round=400, start_steps=8, final_steps=4), [1200],
     {"exports": [], "sweeps": []}),
])
def test_demo_distill_exports_and_scores_each_student(tmp_path, schedule, checkpoints, expected):
  """launch/demo_distill.sh reads the distill schedule from the workdir's config.json and exports the
  checkpoint closing phase 1 and each round (the last: the latest), then sweeps each student with DDIM
  at its own count on the trailing grid, and the first one at the final count too. `glide-jax` and
  `timeout` are stubs: the calls are recorded, not run."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "calls"
  (bin_dir / "timeout").write_text("#!/usr/bin/env bash\nexit 0\n")
  (bin_dir / "glide-jax").write_text(f'#!/usr/bin/env bash\necho "$@" >> {calls}\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  base = tmp_path / "base"
  base.mkdir()
  (base / "meta.json").write_text("{}")
  work = tmp_path / "w"
  for step in checkpoints:
    (work / "checkpoints" / str(step)).mkdir(parents=True)
  (work / "config.json").write_text(json.dumps({"distill": schedule, "diffusion": {"steps": 1000}}))
  env = {k: v for k, v in os.environ.items() if k not in ("TRAIN_MINUTES", "QUICK", "N_EVAL")}
  # SKIP_SETUP's `python` is the one on PATH: this interpreter, which has glide_jax
  path = os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), env["PATH"]])
  env.update(PATH=path, SKIP_SETUP="1", WORKDIR=str(work), BASE=str(base),
             DATA_DIR=str(tmp_path / "data"))
  proc = subprocess.run(["bash", str(LAUNCH / "demo_distill.sh")], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = [l.split() for l in calls.read_text().splitlines()]

  def flag(args, name):
    return args[args.index(name) + 1] if name in args else None

  exports = [(flag(a, "--step"), os.path.basename(flag(a, "--out"))) for a in lines if a[0] == "export"]
  assert exports == expected["exports"]
  sweeps = [(os.path.basename(flag(a, "--bundle")), flag(a, "--steps"), os.path.basename(flag(a, "--out")))
            for a in lines if a[:2] == ["eval", "sweep"]]
  assert sweeps == expected["sweeps"]
  assert all(flag(a, "--sampler") == "ddim" for a in lines if a[:2] == ["eval", "sweep"])
  if (None, "bundle") in exports:
    assert os.readlink(work / "bundle4") == "bundle"
  finished = max(checkpoints) == 1800  # every schedule here ends at step 1800
  assert ("no checkpoint at step" in proc.stderr) == (not finished), proc.stderr


def test_demo_passes_lr_and_train_steps_to_the_trainer(tmp_path):
  """`TRAIN_STEPS=750 LR=5e-4 bash launch/demo.sh` trains configs/shapes.py:steps=750 at peak
  learning rate 5e-4; without them the config's own steps and rate stand.
  Stubs as above: the stub timeout records the train command line and stops the script."""
  bin_dir, record = _stub_timeout_and_glide_jax(tmp_path)
  env = {k: v for k, v in os.environ.items() if k not in ("TRAIN_MINUTES", "QUICK", "LR", "TRAIN_STEPS")}
  env.update(PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", SKIP_SETUP="1", WORKDIR=str(tmp_path / "w"),
             DATA_DIR=str(tmp_path / "data"))
  for extra, expect_lr in (({"TRAIN_STEPS": "750", "LR": "5e-4"}, True), ({}, False)):
    proc = subprocess.run(["bash", str(LAUNCH / "demo.sh")], env={**env, **extra}, cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    args = record.read_text().split()
    config = args[args.index("--config") + 1]
    assert config == ("configs/shapes.py:steps=750" if extra else "configs/shapes.py"), args
    assert ("--config.optimizer.lr=5e-4" in args) == expect_lr, args
