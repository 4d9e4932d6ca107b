"""Sweep expansion: one command per run, each with its own workdir and name; local runs in turn."""
import os
import pathlib
import subprocess
import sys

import pytest

from glide_jax import config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import sweep as sweep_lib  # noqa: E402


def test_expand_shapes_sweep():
  runs = sweep_lib.expand("configs/shapes.py", "local", "/w")
  assert [r["name"] for r in runs] == ["lr=0.0002", "lr=0.0005", "lr=0.001", "no_caption_dropout"]
  assert len({r["workdir"] for r in runs}) == 4
  assert runs[0]["workdir"] == "/w/shapes/lr=0.0002"
  assert runs[0]["command"] == ["glide-jax", "train", "--config", "configs/shapes.py", "--workdir",
                                "/w/shapes/lr=0.0002", "--config.optimizer.lr=0.0002"]
  # every run's overrides load into a valid config with the swept value
  for r in runs:
    c = config_lib.load_config("configs/shapes.py", config_lib.make_override_args(r["overrides"]))
    for key, value in r["overrides"].items():
      node = c
      for part in key.split("."):
        node = node[part]
      assert node == value


@pytest.mark.parametrize("stage", ["base", "upsample", "inpaint", "clip"])
def test_every_stage_sweep_expands(stage):
  runs = sweep_lib.expand(f"configs/{stage}.py:variant=small", "gke", "gs://b", image="img", tpu_type="v5p",
                          topology="4x4x4")
  assert len(runs) >= 2 and len({r["name"] for r in runs}) == len(runs)
  for r in runs:
    assert r["line"].endswith("| kubectl apply -f -")
    name = r["command"][r["command"].index("--name") + 1]
    assert len(name) <= 40 and name[0].isalpha() and name == name.lower()


def test_sweep_with_a_bad_key_is_refused(tmp_path):
  cfg = tmp_path / "bad.py"
  cfg.write_text("from configs import shapes\n"
                 "get_config = shapes.get_config\n"
                 "def sweep(add, arg=None):\n"
                 "  add(**{'optimizer.learning_rate': 1.0})\n")
  with pytest.raises(config_lib.ConfigError, match="optimizer.learning_rate"):
    sweep_lib.expand(str(cfg), "local", "/w")


def test_sweep_cli_dry_run_and_local_run(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  dry = subprocess.run([sys.executable, str(ROOT / "launch/sweep.py"), "configs/shapes.py", "--target", "tpu-vm",
                        "--tpu", "t", "--zone", "z", "--dry-run"], capture_output=True, text=True, cwd=ROOT, env=env)
  assert dry.returncode == 0, dry.stderr
  commands = [l for l in dry.stdout.splitlines() if not l.startswith("#")]
  assert len(commands) == 4 and all(c.startswith("bash launch/tpu_vm.sh run --tpu t --zone z") for c in commands)
  # a local run executes each command in turn; the 'program' records its arguments
  program = f"{sys.executable} -c \"import sys, pathlib; p = pathlib.Path(sys.argv[sys.argv.index('--workdir') + 1]); " \
            "p.mkdir(parents=True); (p / 'args').write_text(' '.join(sys.argv[1:]))\""
  out = subprocess.run([sys.executable, str(ROOT / "launch/sweep.py"), "configs/shapes.py", "--target", "local",
                        "--workdir-root", str(tmp_path), "--program", program, "--only", "lr=0.001",
                        "--only", "no_caption_dropout", "--", "--extra"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr
  done = sorted(p.parent.name for p in tmp_path.glob("shapes/*/args"))
  assert done == ["lr=0.001", "no_caption_dropout"]
  assert (tmp_path / "shapes/lr=0.001/args").read_text().endswith("--config.optimizer.lr=0.001 --extra")
  # a failing run makes the sweep fail
  bad = subprocess.run([sys.executable, str(ROOT / "launch/sweep.py"), "configs/shapes.py", "--workdir-root",
                        str(tmp_path / "x"), "--program", f"{sys.executable} -c 'raise SystemExit(4)'"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
  assert bad.returncode == 1 and "failed" in bad.stderr
