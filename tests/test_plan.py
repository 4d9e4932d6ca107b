"""`glide-jax plan` pieces: topology parsing, the analytic FLOP count, the HLO collective scan, the
search for settings that fit, and (with libtpu installed) an ahead-of-time TPU compile; (with jax's
CUDA plugin in .venv/cuda-plan, as launch/test.sh installs it) a deviceless GPU compile."""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from glide_jax import config_lib, plan


def test_parse_topology():
  assert plan.parse_topology("v5p:4x4x4") == ("v5p", (4, 4, 4))
  assert plan.parse_topology("v5e:16x16") == ("v5e", (16, 16))
  for bad in ("v5p:4x4", "v5e:4x4x4", "v9:2x2", "v5p-128", "v4:2x2x"):
    with pytest.raises(plan.PlanError):
      plan.parse_topology(bad)
  assert plan.parse_topology("h100:8") == ("h100", (1, 8))
  assert plan.parse_topology("h200:4x8") == ("h200", (4, 8))
  assert plan.parse_topology("a100:2") == ("a100", (1, 2))
  for bad, word in (("h100:16", "1 to 8 GPUs per node"), ("h100:0", "1 to 8"), ("h100:0x8", "1 to 8"),
                    ("h100:2x2x2", "GPU:[NODESx]GPUS"), ("b200:8", "GPU:[NODESx]GPUS"), ("h100", "GPU:[NODESx]GPUS")):
    with pytest.raises(plan.PlanError, match=word.replace("[", r"\[").replace("]", r"\]")):
      plan.parse_topology(bad)


def test_gpu_memory_fraction_is_jaxs(monkeypatch):
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  assert plan.gpu_memory_fraction() == 0.75
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", ".9")
  assert plan.gpu_memory_fraction() == 0.9
  for bad in ("most", "0", "1.5"):
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", bad)
    with pytest.raises(plan.PlanError, match="XLA_PYTHON_CLIENT_MEM_FRACTION"):
      plan.gpu_memory_fraction()


def test_analytic_flops_count_convs_matmuls_scans_and_remat():
  x = jnp.zeros((2, 16, 16, 4))
  k = jnp.zeros((3, 3, 4, 8))
  w = jnp.zeros((8, 32))

  def conv(x):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def f(x):
    h = jax.checkpoint(conv)(x)                       # inside a remat: counted once
    y = h.reshape(2, 256, 8) @ w                      # [2, 256, 8] x [8, 32]
    def body(c, _):
      return c @ jnp.zeros((32, 32)), None
    y, _ = jax.lax.scan(body, y, None, length=3)      # 3 x [2, 256, 32] x [32, 32]
    return jnp.einsum("bld,bmd->blm", y, y)           # batched [256, 32] x [32, 256]

  expected = (2 * (2 * 16 * 16 * 8) * (3 * 3 * 4) + 2 * (2 * 256 * 32) * 8 + 3 * 2 * (2 * 256 * 32) * 32
              + 2 * (2 * 256 * 256) * 32)
  assert plan._jaxpr_flops(jax.make_jaxpr(f)(x).jaxpr) == expected
  # and the compiler agrees on an unpadded conv (with SAME padding XLA skips the border taps)
  def valid(x):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  cost = jax.jit(valid).lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = plan._jaxpr_flops(jax.make_jaxpr(valid)(x).jaxpr)
  assert analytic == 2 * (2 * 14 * 14 * 8) * (3 * 3 * 4)
  assert cost["flops"] == pytest.approx(analytic, rel=0.05)


def test_collectives_in_a_compiled_program():
  mesh = Mesh(np.array(jax.devices()[:8]), ("d",))
  def grad(w, x):
    return jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
  compiled = jax.jit(grad, in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("d"))),
                     out_shardings=NamedSharding(mesh, P())).lower(
      jax.ShapeDtypeStruct((64, 64), jnp.float32), jax.ShapeDtypeStruct((16, 64), jnp.float32)).compile()
  stats = plan.collectives(compiled.as_text())
  assert stats["all-reduce"]["count"] >= 1 and stats["all-reduce"]["bytes"] >= 64 * 64 * 4
  text = ("%a = (f32[8,128]{1,0:T(8,128)}, /*index=1*/bf16[4]{0}) all-reduce-start(%x), channel_id=1\n"
          "%b = bf16[64,128]{1,0:T(8,128)(2,1)} all-gather(%y), dimensions={0}\n"
          "%c = f32[2]{0} collective-permute-done(%z)\n%d = f32[4]{0} reduce-scatter(%w)")
  stats = plan.collectives(text)
  assert stats["all-reduce"] == {"count": 1, "bytes": 8 * 128 * 4}
  assert stats["all-gather"] == {"count": 1, "bytes": 64 * 128 * 2}
  assert stats["reduce-scatter"] == {"count": 1, "bytes": 16}
  assert stats["collective-permute"]["count"] == 0  # '-done' halves are not counted twice


def test_oom_message_is_read():
  msg = "RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. Used 101.5G of 95.74G hbm. Exceeded"
  assert plan._oom_bytes(msg) == int(101.5 * (1 << 30))
  assert plan._oom_bytes("some other error") == 0


def test_candidates_offer_fsdp_remat_and_microbatches():
  c = config_lib.load_config("configs/base.py:variant=released")
  devices = list(range(64))
  labels = [label for label, _ in plan.candidates(c, devices)]
  # 192 channels and a 512-wide text encoder: fsdp 64 divides both
  assert plan.fsdp_size(c, 256) == 64 and plan.fsdp_size(c, 64) == 64 and plan.fsdp_size(c, 8) == 8
  assert labels[:3] == ["fsdp 64 (all chips)", "full remat", "fsdp 64 + full remat"]
  assert "fsdp 64 + full remat + 2 microbatches" in labels
  for _, overrides in plan.candidates(c, devices):  # every suggestion is a valid override
    config_lib.load_config("configs/base.py:variant=released", overrides)
  full = config_lib.load_config("configs/base.py:variant=full")  # already fsdp + remat
  assert next(label for label, _ in plan.candidates(full, devices)).endswith("2 microbatches")


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu (the tpu extra) is not installed")
def test_plan_command_compiles_for_a_tpu_topology():
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  out = subprocess.run([sys.executable, "-m", "glide_jax.cli", "plan", "--config", "configs/clip.py:variant=tiny",
                        "--topology", "v5p:2x2x1", "--batch", "16", "--config.mesh.fsdp=2"],
                       capture_output=True, text=True, env=env, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["fits"] is True and result["topology"] == "v5p:2x2x1" and result["chips"] == 4
  assert "host memory: malloc arenas capped at 2" in out.stdout or "MALLOC_ARENA_MAX" in out.stdout
  assert result["hbm_bytes"] == 95 * (1 << 30)
  assert 0 < result["per_chip_bytes"] < result["hbm_bytes"]
  # data parallel over 2 x fsdp 2: gradients are reduced and fsdp parameters gathered
  assert result["collectives"]["all-reduce"] + result["collectives"]["reduce-scatter"] >= 1
  assert result["collectives"]["all-gather"] >= 1
  # the compiler's FLOPs include the forward+backward the analytic count predicts (and more)
  assert result["flops_per_step"] >= 0.8 * result["model_flops_per_step"] > 0


CUDA_PLAN_SITE = pathlib.Path(__file__).resolve().parent.parent / ".venv" / "cuda-plan"


def _plan_json(topology: str, extra_env: dict, *args: str) -> tuple[dict, str]:
  env = dict(os.environ, **extra_env)
  env.pop("XLA_FLAGS", None)
  if topology == "cpu":
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  out = subprocess.run([sys.executable, "-m", "glide_jax.cli", "plan", "--topology", topology, *args],
                       capture_output=True, text=True, env=env, timeout=900,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


@pytest.mark.skipif(not (CUDA_PLAN_SITE / "jax_plugins").is_dir(),
                    reason="jax's CUDA plugin is not in .venv/cuda-plan (launch/test.sh installs it there)")
def test_plan_command_compiles_the_train_step_for_gpu_nodes():
  """The tiny base on two nodes of four H100s, compiled without a GPU: the device jax describes is
  the H100, the state and batch each chip holds are what the same program holds on 8 CPU devices
  (a real compile of the same mesh), gradients are reduced and fsdp parameters gathered, and
  `fits` is judged against jax's 0.75 of the chip's memory."""
  from glide_jax import hardware
  args = ("--config", "configs/base.py:variant=tiny", "--batch", "16", "--config.mesh.fsdp=2", "--no-search")
  gpu, text = _plan_json("h100:2x4", {"PYTHONPATH": str(CUDA_PLAN_SITE), "JAX_PLATFORMS": "cpu"}, *args)
  assert gpu["fits"] is True and gpu["topology"] == "h100:2x4" and gpu["chips"] == 8
  assert gpu["device_kind"] == "NVIDIA H100 80GB HBM3" == hardware.CHIPS["h100"].device_kinds[0]
  assert gpu["hbm_bytes"] == 81559 * (1 << 20) and gpu["usable_bytes"] == int(gpu["hbm_bytes"] * 0.75)
  assert "the compiler reports none" in text and gpu["flops_per_step"] == 0.0  # XLA:GPU has no cost analysis
  assert "collectives in the compiled step" in text and "step time >= " in text
  assert gpu["step_time_lower_bound_s"] == pytest.approx(gpu["model_flops_per_step"] / (989.4e12 * 8))
  assert gpu["collectives"]["all-reduce"] + gpu["collectives"]["reduce-scatter"] >= 1
  assert gpu["collectives"]["all-gather"] >= 1
  cpu, _ = _plan_json("cpu", {}, *args)
  assert cpu["chips"] == 8 and gpu["argument_bytes"] == cpu["argument_bytes"] > 0
  assert gpu["program_fingerprint"] != cpu["program_fingerprint"]  # each backend's own lowering


def test_chips_come_from_the_one_hardware_table():
  from glide_jax import hardware
  assert sorted(plan.CHIPS) == ["a100", "h100", "h200", "v4", "v5e", "v5p", "v6e"]
  for gen, chip in plan.CHIPS.items():
    assert chip is hardware.CHIPS[gen] and chip.peak_flops == chip.bf16_flops > 0
  host = plan.host_chip(4)
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  assert host.hbm_bytes == total // 4 and host.peak_flops == 0 and host.hbm_bandwidth == 0
  res = plan.Result(label="x", overrides=[], fits=True, per_device_bytes=1, flops_per_device=1e9,
                    bytes_accessed_per_device=1e6)
  config = config_lib.load_config("configs/shapes.py")
  out = plan.result_json(config, "cpu", res, host, 1, 4, 1e9, 1e8)
  assert out["hbm_bytes"] == host.hbm_bytes and out["step_time_lower_bound_s"] == 0.0  # no peak: no bound
  v5p = plan.result_json(config, "v5p:2x2x1", res, plan.CHIPS["v5p"], 1, 4, 4e12, 1e8)
  assert v5p["step_time_lower_bound_s"] == pytest.approx(4e12 / (459e12 * 4))


_ARENA_PROBE = r"""
import ctypes, os, re, sys, tempfile, threading
from glide_jax import plan
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes, libc.fclose.argtypes = [ctypes.c_int, ctypes.c_void_p], [ctypes.c_void_p]

def heaps():  # glibc's own report: one <heap nr=...> element per arena
  path = os.path.join(tempfile.mkdtemp(), "info.xml")
  fp = libc.fopen(path.encode(), b"w")
  libc.malloc_info(0, fp)
  libc.fclose(fp)
  return len(re.findall(r"<heap nr=", open(path).read()))

if sys.argv[1] == "cap":
  print(plan.limit_malloc_arenas(1), file=sys.stderr)
before = heaps()
barrier = threading.Barrier(8)
def work():  # eight threads alive at once, each allocating: glibc would give each its own arena
  p = libc.malloc(1 << 16)
  barrier.wait()
  libc.free(p)
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print(heaps() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists("/proc/self/maps")
                    or "libc.so.6" not in pathlib.Path("/proc/self/maps").read_text(), reason="needs glibc")
def test_plan_caps_glibc_malloc_arenas():
  """Threads allocating at once get new glibc arenas unless capped; the plan's cap stops that
  (glibc's malloc_info counts the arenas)."""
  env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
  def new_arenas(mode):
    out = subprocess.run([sys.executable, "-c", _ARENA_PROBE, mode], env=env, capture_output=True,
                         text=True, check=True, timeout=120)
    return int(out.stdout.split()[-1]), out.stderr
  assert new_arenas("free")[0] >= 4                 # the probe does create arenas when uncapped
  added, log = new_arenas("cap")
  assert added == 0, log
  assert "capped at 1" in log
  # The user's own MALLOC_ARENA_MAX is left alone.
  env["MALLOC_ARENA_MAX"] = "3"
  assert "from the environment" in new_arenas("cap")[1]
