"""The models, the diffusion code, the train program and the benchmarks import without TensorFlow,
TFDS and ml_collections (an accelerator machine that has only jax: benchmarks/device_check.sh);
the configs, the trainer and the commands need ml_collections, not TensorFlow. Only the data
pipeline needs TensorFlow. Each list is imported in a fresh interpreter whose imports of the
blocked packages fail as if they were not installed."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Run by `python -c`: a meta-path finder that refuses BLOCKED (as a missing package would), then
# every module of MODULES; prints the failures as JSON.
SCRIPT = r"""
import importlib, importlib.abc, json, sys
BLOCKED, MODULES = json.loads(sys.argv[1]), json.loads(sys.argv[2])

class Refuse(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in BLOCKED:
      raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
    return None

sys.meta_path.insert(0, Refuse())
failed = {}
for module in MODULES:
  try:
    importlib.import_module(module)
  except Exception as e:
    failed[module] = f"{type(e).__name__}: {e}"
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"failed": failed, "leaked": leaked}))
"""

TF = ["tensorflow", "tensorflow_datasets"]


def _modules(package: str, exclude: tuple[str, ...] = ()) -> list[str]:
  folder = ROOT / package.replace(".", "/")
  names = sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__" and p.stem not in exclude)
  return [package] + [f"{package}.{n}" for n in names]


# Needs neither TensorFlow nor ml_collections: what builds and runs models, programs and samplers.
CORE = (_modules("glide_jax.models") + _modules("glide_jax.diffusion") + _modules("glide_jax.parallel")
        + _modules("glide_jax.interop") + _modules("glide_jax.eval")
        + _modules("glide_jax.train", exclude=("train", "checkpoint", "init_from"))
        + ["glide_jax", "glide_jax.plan", "glide_jax.hardware", "glide_jax.bundle", "glide_jax.images",
           "glide_jax.sampling", "glide_jax.constants", "glide_jax.settings",
           "glide_jax.cpu_flags", "glide_jax.compile_cache", "glide_jax.data", "glide_jax.data.tokenizers",
           "glide_jax.data.pipeline", "benchmarks.common", "benchmarks.forward", "benchmarks.train_step",
           "benchmarks.sample", "benchmarks.run", "benchmarks.device_check"])
# Needs ml_collections (the config layer), not TensorFlow.
CONFIG_LAYER = (_modules("configs") + _modules("glide_jax.commands")
                + ["glide_jax.config_lib", "glide_jax.train.train", "glide_jax.train.checkpoint", "glide_jax.train.init_from",
                   "glide_jax.cli"])


def _import(blocked: list[str], modules: list[str]) -> dict:
  out = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(blocked), json.dumps(modules)],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_core_imports_without_tensorflow_tfds_or_ml_collections():
  result = _import(TF + ["ml_collections"], CORE)
  assert result == {"failed": {}, "leaked": []}, result


def test_core_imports_without_anything_the_device_machine_lacks():
  """benchmarks/device_check.py's DEVICE_LACKS (matplotlib, filelock, braceexpand, ... besides
  TensorFlow), and ml_collections, which the check carries but the core must not need."""
  from benchmarks import device_check
  result = _import([*device_check.DEVICE_LACKS, "ml_collections"], CORE)
  assert result == {"failed": {}, "leaked": []}, result


def test_configs_trainer_and_commands_import_without_tensorflow():
  result = _import(TF, CONFIG_LAYER)
  assert result == {"failed": {}, "leaked": []}, result


@pytest.mark.parametrize("module", ["glide_jax.data.masks", "glide_jax.data.shapes", "glide_jax.config_lib"])
def test_the_block_is_real(module):
  """The data layer does need TensorFlow and the config layer ml_collections, so the lists above
  prove something."""
  result = _import(TF + ["ml_collections"], [module])
  assert module in result["failed"] and "blocked by the test" in result["failed"][module]
