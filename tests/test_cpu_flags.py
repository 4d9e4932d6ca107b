"""The XLA CPU flags: nothing at import, applied by the entry points on the CPU only, unknown flags dropped."""
from __future__ import annotations

import os
import subprocess
import sys
import types

import pytest

from glide_jax import cli, cpu_flags

CPU = {"JAX_PLATFORMS": "cpu"}


def test_import_leaves_the_environment_unchanged():
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIDE_JAX_CPU_FLAGS")}
  env["JAX_PLATFORMS"] = "cpu"  # where apply() would act
  # `import glide_jax` alone; then our modules after jax and flax (jax's own import sets
  # TPU_LIBRARY_PATH and TPU_SKIP_MDS_QUERY when libtpu is installed: not ours).
  code = ("import os, sys\n"
          "def check(before):\n"
          "  changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
          "  assert not changed, {k: (before.get(k), os.environ.get(k)) for k in changed}\n"
          "before = dict(os.environ)\n"
          "import glide_jax, glide_jax.cli, glide_jax.cpu_flags\n"
          "check(before); assert 'jax' not in sys.modules\n"
          "import jax, flax.linen\n"
          "before = dict(os.environ)\n"
          "import glide_jax.models.registry, glide_jax.diffusion.gaussian, glide_jax.diffusion.samplers\n"
          "check(before)\n"
          "print('unchanged')")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "unchanged"


def test_flags_are_added_once_and_respect_the_user():
  env = {**CPU, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  added = cpu_flags.apply(env)
  assert added == list(cpu_flags.FLAGS)
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=8 ")
  assert cpu_flags.apply(env) == []  # idempotent
  mine = {**CPU, "XLA_FLAGS": "--xla_cpu_experimental_onednn_fusion_type="}
  cpu_flags.apply(mine)
  assert "--xla_cpu_experimental_onednn_fusion_type=individual_convolution" not in mine["XLA_FLAGS"]
  off = {**CPU, "GLIDE_JAX_CPU_FLAGS": "0"}
  assert cpu_flags.apply(off) == [] and "XLA_FLAGS" not in off


@pytest.fixture(autouse=True)
def _flag_cache(tmp_path, monkeypatch):
  monkeypatch.setenv("GLIDE_JAX_FLAG_CACHE", str(tmp_path / "missing.json"))  # not the user's
  cpu_flags._known.cache_clear()
  yield
  cpu_flags._known.cache_clear()


def test_an_unknown_flag_is_dropped_with_a_warning():
  env = dict(CPU)
  # A made-up name, and a prefix of a real one (XLA aborts on both).
  bad = ("--xla_cpu_no_such_flag_for_glide_jax=1", "--xla_cpu_experimental_ynn_fusion=dot")
  with pytest.warns(RuntimeWarning, match="does not know"):
    added = cpu_flags.apply(env, flags=cpu_flags.FLAGS + bad)
  assert added == list(cpu_flags.FLAGS)
  assert env["XLA_FLAGS"] == " ".join(cpu_flags.FLAGS)


def test_the_flags_xla_would_abort_on_are_the_ones_dropped():
  # The byte search agrees with XLA itself: a kept flag lets a CPU backend start, a dropped one aborts.
  kept = cpu_flags.known_flags(list(cpu_flags.FLAGS) + ["--xla_cpu_no_such_flag_for_glide_jax=1"])
  assert kept == list(cpu_flags.FLAGS)
  probe = "import jax; jax.devices('cpu'); print('ok')"
  for flags, ok in ((" ".join(kept), True), ("--xla_cpu_no_such_flag_for_glide_jax=1", False)):
    env = {**os.environ, **CPU, "XLA_FLAGS": flags}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert (out.returncode == 0 and out.stdout.strip() == "ok") == ok, (flags, out.stderr[-500:])


def test_a_missing_name_is_scanned_for_once_per_jaxlib(tmp_path, monkeypatch):
  bad = "--xla_cpu_no_such_flag_for_glide_jax=1"
  scanned = []
  real = cpu_flags._name_in
  monkeypatch.setattr(cpu_flags, "_name_in", lambda mm, name: scanned.append(name) or real(mm, name))
  assert cpu_flags.known_flags([bad]) == []
  assert scanned == [b"xla_cpu_no_such_flag_for_glide_jax"]
  assert "xla_cpu_no_such_flag_for_glide_jax" in (tmp_path / "missing.json").read_text()
  cpu_flags._known.cache_clear()  # a new process: the file remembers, only the known flags are searched
  scanned.clear()
  assert cpu_flags.known_flags([bad, *cpu_flags.FLAGS]) == list(cpu_flags.FLAGS)
  assert b"xla_cpu_no_such_flag_for_glide_jax" not in scanned and len(scanned) == len(cpu_flags.FLAGS)


@pytest.mark.parametrize("platforms, applied", [("cpu", True), ("cpu,cuda", True), ("cuda", False),
                                                ("tpu,cpu", False), ("cuda,cpu", False)])
def test_only_when_the_backend_will_be_the_cpu(platforms, applied):
  env = {"JAX_PLATFORMS": platforms}
  assert bool(cpu_flags.apply(env)) == applied
  assert ("XLA_FLAGS" in env) == applied


def test_an_accelerator_plugin_with_its_device_is_not_the_cpu(monkeypatch):
  # JAX_PLATFORMS unset: the installed plugins and device nodes decide.
  monkeypatch.setattr(cpu_flags, "_gpu_node_present", lambda: False)
  monkeypatch.setattr(cpu_flags, "_tpu_chip_present", lambda: False)
  monkeypatch.setattr(cpu_flags, "_installed", lambda m: m == "libtpu")
  assert cpu_flags.cpu_backend_expected({})  # libtpu without a chip: JAX falls back to the CPU
  monkeypatch.setattr(cpu_flags, "_tpu_chip_present", lambda: True)
  assert not cpu_flags.cpu_backend_expected({})
  monkeypatch.setattr(cpu_flags, "_tpu_chip_present", lambda: False)
  monkeypatch.setattr(cpu_flags, "_installed", lambda m: m == "jax_cuda12_plugin")
  monkeypatch.setattr(cpu_flags, "_gpu_node_present", lambda: True)
  assert not cpu_flags.cpu_backend_expected({})
  assert cpu_flags.cpu_backend_expected({"CUDA_VISIBLE_DEVICES": ""})  # GPUs hidden
  assert not cpu_flags.apply({}) and cpu_flags.apply({"JAX_PLATFORMS": "cpu"})


def test_the_cli_applies_the_flags_on_the_cpu(monkeypatch):
  seen = {}
  probe = types.ModuleType("glide_jax.commands._probe")
  probe.add_arguments = lambda parser: None
  probe.run = lambda args: seen.update(flags=os.environ.get("XLA_FLAGS", "")) or 0
  monkeypatch.setitem(sys.modules, "glide_jax.commands._probe", probe)
  monkeypatch.setitem(cli.COMMANDS, "probe", ("_probe", "records XLA_FLAGS"))
  monkeypatch.delenv("GLIDE_JAX_CPU_FLAGS", raising=False)
  for platforms, applied in (("cpu", True), ("cuda", False)):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert cli.main(["probe"]) == 0
    assert all((f in seen["flags"]) == applied for f in cpu_flags.FLAGS), (platforms, seen)
