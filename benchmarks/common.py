"""Shared helpers of the benchmarks: model options, random weights, timing, FLOPs and JSON lines.

Every benchmark prints one JSON object per line. Timings are the median wall time over `--repeats`
runs after a warm-up run (the first call, which also compiles; its time is reported as
`first_call_s`). The reference (openai/glide-text2im, PyTorch) is used when importable.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

from glide_jax import hardware

# A tiny model with the released architecture's structure, for tests of the harness. The reference
# tokenizer fixes n_vocab at 50257, so the tiny model keeps it (it is only an embedding table).
TINY_OPTIONS: dict[str, dict[str, Any]] = {
    "text2im": {"image_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
                "attention_resolutions": "8", "num_head_channels": 16, "xf_width": 32, "xf_layers": 1,
                "xf_heads": 2, "text_ctx": 8, "dropout": 0.0},
    "upsample": {"image_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
                 "attention_resolutions": "8", "num_head_channels": 16, "xf_width": 32, "xf_layers": 1,
                 "xf_heads": 2, "text_ctx": 8, "dropout": 0.0},
}

# Smaller still, for the device check's --cpu run in CI: one 8 px level compiles in half tiny's time.
MICRO_OPTIONS: dict[str, dict[str, Any]] = {
    "text2im": dict(TINY_OPTIONS["text2im"], image_size=8, channel_mult="1"),
}


def add_common_args(p: argparse.ArgumentParser) -> None:
  p.add_argument("--preset", default="released", choices=["released", "shapes", "tiny", "micro"],
                 help="released = the released GLIDE sizes; shapes = the demo model of configs/shapes.py "
                      "(text2im only); tiny = a 16 px model for testing the harness; micro = an 8 px one "
                      "(text2im only)")
  p.add_argument("--repeats", type=int, default=3, help="timed runs after the warm-up run (median reported)")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our compute dtype")
  p.add_argument("--no-reference", action="store_true", help="run ours alone even if glide-text2im is importable")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0 = the number of cores)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--fast-compile", action="store_true", help="XLA optimisation off (tests only; slows the run)")
  p.add_argument("--attention-impl", default=None, choices=["xla", "cudnn"],
                 help="the model option attention_impl (default: the backend's default attention)")


def model_options(kind: str, preset: str, attention_impl: str | None = None) -> dict[str, Any]:
  """glide-text2im option names for `kind` ('text2im' | 'upsample') at `preset`."""
  from glide_jax.models import registry
  extra = {"attention_impl": attention_impl} if attention_impl else {}
  if preset in ("tiny", "micro"):
    table = TINY_OPTIONS if preset == "tiny" else MICRO_OPTIONS
    if kind not in table:
      raise ValueError(f"--preset {preset} has no {kind} model")
    return registry.resolve_options(kind, {**table[kind], **extra})
  if preset == "shapes":
    if kind != "text2im":
      raise ValueError(f"--preset shapes is the demo's text2im model; there is no shapes {kind} model")
    from configs import shapes
    return registry.resolve_options(kind, {**shapes.MODEL, **extra})
  return registry.resolve_options(kind, extra)


def random_params(kind: str, options: dict[str, Any], seed: int = 0, std: float = 0.02):
  """Random float32 weights of the model's shapes (numpy RNG: no init compile for the big models).

  Zero-initialised output layers would make the forward trivially small, so everything is drawn;
  norm scales are kept at 1 so activations stay O(1)."""
  import jax
  import numpy as np

  from glide_jax.models import registry
  rng = np.random.default_rng(seed)
  if kind == "noised_clip":
    import flax.linen as nn
    import jax.numpy as jnp

    from glide_jax.models import clip
    model = clip.create_clip_model(options)
    size, text_len = int(model.image_size), int(model.max_text_len)
    shapes = jax.eval_shape(lambda: nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32),
        jnp.zeros((1, text_len), jnp.int32), jnp.ones((1,), jnp.int32))["params"]))
  else:
    shapes = registry.param_shapes(kind, options)

  def draw(path, s):
    name = jax.tree_util.keystr(path)
    if "scale" in name and len(s.shape) == 1:
      return np.ones(s.shape, np.float32)
    return (rng.standard_normal(s.shape, np.float32) * std).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def count_params(params) -> int:
  import jax
  import numpy as np
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))


def machine() -> dict[str, Any]:
  """Where this ran: CPU model, cores, load average, library versions, devices."""
  import jax
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return {"cpu": cpu, "cores": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
          "jax": jax.__version__, "backend": jax.default_backend(), "device": str(jax.devices()[0]),
          "device_kind": jax.devices()[0].device_kind, "num_devices": len(jax.devices()),
          "matmul_precision": jax.config.jax_default_matmul_precision, "xla_threads": "default",
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def emit(record: dict[str, Any]) -> None:
  print(json.dumps(record, default=_jsonable), flush=True)


class Phases:
  """Progress lines of a long benchmark, `{"benchmark", "phase", "elapsed_s", ...}`, printed as each
  step ends: a run cut off by a time limit (the device check's sections) still says how far it got
  and where its seconds went. The first H200 run's train step timed out with nothing to show."""

  def __init__(self, benchmark: str, **tags: Any):
    self.benchmark, self.tags, self.t0 = benchmark, tags, time.perf_counter()

  def __call__(self, name: str, **extra: Any) -> None:
    emit({"benchmark": self.benchmark, "phase": name, "elapsed_s": round(time.perf_counter() - self.t0, 3),
          **self.tags, **extra})


def _jsonable(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def time_fn(fn: Callable[[], Any], repeats: int, block: Callable[[Any], Any] | None = None) -> dict[str, Any]:
  """Median wall and process-CPU seconds over `repeats` calls of `fn` after one warm-up call.

  `block` waits for the result (jax.block_until_ready by default). CPU time covers all threads, so
  on a shared machine it shows how much work was done when wall time is inflated by other tenants."""
  import jax
  if block is None:
    block = jax.block_until_ready
  # XLA compile seconds of the warm-up call, as JAX reports them: "first call - median" is no
  # measure when one run takes a minute and varies by a few seconds.
  compiled = []

  def on_duration(event: str, duration: float, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(duration)
  jax.monitoring.register_event_duration_secs_listener(on_duration)
  try:
    t0 = time.perf_counter()
    block(fn())
    first = time.perf_counter() - t0
  finally:
    jax.monitoring.unregister_event_duration_listener(on_duration)
  wall, cpu = [], []
  for _ in range(max(1, repeats)):
    w0, c0 = time.perf_counter(), time.process_time()
    block(fn())
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return {"median_s": statistics.median(wall), "min_s": min(wall), "cpu_s": statistics.median(cpu),
          "runs": len(wall), "first_call_s": first, "warmup_compile_s": sum(compiled),
          "load_avg_1m": round(os.getloadavg()[0], 2)}


def compiler_options(args: argparse.Namespace) -> dict[str, Any] | None:
  # --fast-compile: XLA backend optimisation off, for tests of the harness (never for figures).
  return {"xla_backend_optimization_level": 0} if getattr(args, "fast_compile", False) else None


def compile_timed(jitted, *args, options: dict[str, Any] | None = None) -> tuple[Any, float, float | None]:
  """(compiled executable, lower+compile seconds, XLA's FLOP count or None)."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile(compiler_options=options)
  seconds = time.perf_counter() - t0
  return compiled, seconds, hardware.compiled_flops(compiled)


def compile_program_timed(program, options: dict[str, Any] | None = None,
                          phase: Callable[..., None] | None = None) -> tuple[Any, float, float | None, str]:
  """A train program (glide_jax/train/program.py) compiled: (executable, seconds, FLOPs, fingerprint).
  `phase` (a `Phases`) is told when the program is lowered, before XLA compiles it."""
  t0 = time.perf_counter()
  lowered = program.lower()
  fingerprint = program.fingerprint(lowered)
  if phase is not None:
    phase("lowered", lower_s=round(time.perf_counter() - t0, 3))
  compiled = lowered.compile(compiler_options=options)
  seconds = time.perf_counter() - t0
  return compiled, seconds, hardware.compiled_flops(compiled), fingerprint


def utilisation(flops: float | None, seconds: float, dtype: str) -> dict[str, Any]:
  """Achieved TFLOP/s (XLA's FLOP count of the program / seconds) and MFU: that over one chip's
  dense peak for `dtype` at jax's default matmul precision (glide_jax.hardware; float32 on a GPU
  runs TF32 unless the precision is 'highest'). MFU is None where no peak is known (CPUs)."""
  import jax

  from glide_jax import hardware
  if not flops or seconds <= 0:
    return {"tflops_per_s": None, "peak_tflops_per_s": None, "mfu": None}
  achieved = flops / seconds
  peak = hardware.peak_flops(jax.devices()[0].device_kind, dtype, jax.config.jax_default_matmul_precision)
  return {"tflops_per_s": achieved / 1e12, "peak_tflops_per_s": peak and peak / 1e12,
          "mfu": achieved / peak if peak else None}


def reference_status(disabled: bool = False) -> tuple[bool, str]:
  """(usable, why): whether openai/glide-text2im and torch import."""
  if disabled:
    return False, "disabled by --no-reference"
  try:
    import glide_text2im
    import torch  # noqa: F401
  except ImportError as e:
    return False, f"not importable: {e}"
  return True, "glide_text2im " + os.path.dirname(glide_text2im.__file__)


def setup_torch(threads: int) -> int:
  import torch
  n = threads or os.cpu_count() or 1
  torch.set_num_threads(n)
  return n


def enable_compile_cache() -> str | None:
  from glide_jax import compile_cache
  return compile_cache.enable()


def round_floats(d: dict[str, Any], nd: int = 4) -> dict[str, Any]:
  return {k: (round(v, nd) if isinstance(v, float) else v) for k, v in d.items()}
