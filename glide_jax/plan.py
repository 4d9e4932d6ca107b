"""Ahead-of-time planning for TPU pods and NVIDIA GPU clusters from a CPU machine (`glide-jax plan`).

The real train step (glide_jax/train: stage loss, caption dropout, timestep sampler, microbatch
scan, AdamW, EMA) and one sampler step (classifier-free guided model call + sampler update) are
lowered with the config's mesh and rule table over the devices of a topology described by
`jax.experimental.topologies`, compile-only: libtpu compiles for a TPU slice, jax's CUDA plugin for
GPUs described by an XLA target config (no GPU, no driver). From the compiled program we read
per-chip memory (`memory_analysis`), FLOPs (`cost_analysis`, which XLA's GPU compiler leaves
empty) and the collectives in the HLO; an analytic count of the model's conv and matmul FLOPs,
taken from the model's jaxpr, sits next to the compiler's figure.

When a config does not fit, a few alternatives are tried (all chips on fsdp, full remat, more
microbatches) and the overrides of the first that fits are printed.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from glide_jax import hardware
from glide_jax.hardware import Chip
from glide_jax.parallel import sharding as shard_lib

GiB = 1 << 30

# The TPU generations a topology names, from the one chip table (glide_jax/hardware.py: peak
# FLOP/s, HBM size and bandwidth with their sources). `chip.peak_flops` is the dense bf16 peak.
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
GPU_KINDS = ("a100", "h100", "h200")
CHIPS: dict[str, Chip] = {gen: hardware.CHIPS[gen] for gen in TPU_GENERATIONS + GPU_KINDS}
GPUS_PER_NODE_MAX = 8  # one HGX node's NVLink domain
# jax preallocates this fraction of a GPU's memory and its allocator serves the program from it
# (XLA_PYTHON_CLIENT_MEM_FRACTION, jax's GPU memory allocation docs): what a GPU plan must fit in.
GPU_MEM_FRACTION_DEFAULT = 0.75


@dataclasses.dataclass(frozen=True)
class GpuTarget:
  """What XLA's GPU compiler needs to know of a chip it cannot query (no device): the SMs, their
  clock, cache and shared memory, and the compute capability. Memory size and bandwidth come from
  the chip table (hardware.CHIPS)."""
  sm_count: int
  clock_ghz: float          # max boost clock
  l2_bytes: int
  smem_per_sm: int          # shared memory per SM
  smem_per_block_optin: int  # the most one block may opt in to
  compute_capability: tuple[int, int]
  fp32_cores_per_sm: int


GPU_TARGETS: dict[str, GpuTarget] = {
    # NVIDIA A100 Tensor Core GPU Architecture whitepaper, A100 SXM4: 108 SMs, 1410 MHz boost, 40 MB
    # L2, 164 KB shared memory per SM (163 KB per block), 64 FP32 cores per SM; compute capability 8.0.
    "a100": GpuTarget(108, 1.41, 40 * hardware.MiB, 164 * 1024, 163 * 1024, (8, 0), 64),
    # NVIDIA H100 Tensor Core GPU Architecture whitepaper, H100 SXM5: 132 SMs, 1980 MHz max boost,
    # 50 MB L2, 228 KB shared memory per SM (227 KB per block), 128 FP32 cores per SM; 9.0.
    "h100": GpuTarget(132, 1.98, 50 * hardware.MiB, 228 * 1024, 227 * 1024, (9, 0), 128),
    # H200 SXM: the same GH100 chip as the H100 SXM5 with 141 GB of HBM3e (hardware.CHIPS).
    "h200": GpuTarget(132, 1.98, 50 * hardware.MiB, 228 * 1024, 227 * 1024, (9, 0), 128),
}


def gpu_target_config(gen: str) -> str:
  """XLA's GpuTargetConfig (text proto) for a chip of GPU_KINDS: the device description a
  deviceless compile uses in place of the one a real GPU would report."""
  t, chip = GPU_TARGETS[gen], CHIPS[gen]
  major, minor = t.compute_capability
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024", "  threads_per_warp: 32", "  shared_memory_per_block: 49152",
      f"  shared_memory_per_core: {t.smem_per_sm}", "  threads_per_core_limit: 2048",
      f"  core_count: {t.sm_count}", f"  fpus_per_core: {t.fp32_cores_per_sm}",
      "  block_dim_limit_x: 2147483647", "  block_dim_limit_y: 65535", "  block_dim_limit_z: 65535",
      f"  memory_bandwidth: {int(chip.hbm_bandwidth)}", f"  l2_cache_size: {t.l2_bytes}",
      f"  clock_rate_ghz: {t.clock_ghz}", f"  device_memory_size: {chip.hbm_bytes}",
      f"  shared_memory_per_block_optin: {t.smem_per_block_optin}",
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
      "  registers_per_core_limit: 65536", "  registers_per_block_limit: 65536",
      "}",
      'platform_name: "CUDA"',
      "dnn_version_info { major: 9 }",
      "runtime_version { major: 13 }",
      f'device_description_str: "{chip.device_kinds[0]}"',
  ])


def gpu_memory_fraction() -> float:
  """The share of each GPU's memory a jax process may use: XLA_PYTHON_CLIENT_MEM_FRACTION, else
  jax's default 0.75 (XLA_PYTHON_CLIENT_PREALLOCATE=false does not raise the ceiling)."""
  import os
  text = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "")
  try:
    value = float(text) if text else GPU_MEM_FRACTION_DEFAULT
  except ValueError:
    raise PlanError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} is not a number") from None
  if not 0 < value <= 1:
    raise PlanError(f"XLA_PYTHON_CLIENT_MEM_FRACTION={text!r} is not in (0, 1]")
  return value


# glibc's malloc gives contending threads their own arenas (up to 8 per core) and does not move
# memory freed in one arena to another; libtpu's backend compiles fusions on many threads for tens
# of minutes, so the plan's resident memory grows with that fragmentation (docs/scale.md, "Host
# memory"). Two arenas keep it down at no measured cost in compile time. glibc has no other
# interface for this than mallopt (MALLOC_ARENA_MAX only works before the process starts).
PLAN_MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # glibc malloc.h


def limit_malloc_arenas(arenas: int = PLAN_MALLOC_ARENAS) -> str:
  """Caps glibc's malloc arenas for the arenas created from now on; returns what was done.

  Leaves a MALLOC_ARENA_MAX from the environment alone (the user's choice, already applied by
  glibc) and does nothing where the C library is not glibc."""
  import ctypes
  import ctypes.util
  import os

  if os.environ.get("MALLOC_ARENA_MAX"):
    return f"MALLOC_ARENA_MAX={os.environ['MALLOC_ARENA_MAX']} from the environment"
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
    _ = libc.gnu_get_libc_version  # glibc only; musl and others have no M_ARENA_MAX
  except (OSError, AttributeError):
    return "not glibc: malloc arenas left as they are"
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  if mallopt(_M_ARENA_MAX, int(arenas)) != 1:
    return "mallopt(M_ARENA_MAX) refused: malloc arenas left as they are"
  return f"malloc arenas capped at {int(arenas)}"


def host_chip(n_devices: int) -> Chip:
  """`--topology cpu`: the local devices share this machine's memory; no peak is known (0)."""
  import os
  total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return Chip(name="cpu", device_kinds=(), bf16_flops=0.0, tf32_flops=None, fp32_flops=None,
              hbm_bytes=int(total // max(1, n_devices)), hbm_bandwidth=0.0, source="host memory (sysconf)")


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}


class PlanError(RuntimeError):
  """A plan that cannot be made (bad topology, batch not divisible, ...)."""


# ----------------------------------------------------------------------------- topology
def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); GPUs: 'h100:8' -> ('h100', (1, 8)) (one node of 8),
  'h100:4x8' -> ('h100', (4, 8)) (4 nodes of 8)."""
  g = re.fullmatch("(" + "|".join(GPU_KINDS) + r"):(?:(\d+)x)?(\d+)", name.strip())
  if g:
    nodes, gpus = int(g.group(2) or 1), int(g.group(3))
    if not (nodes >= 1 and 1 <= gpus <= GPUS_PER_NODE_MAX):
      raise PlanError(f"topology {name!r}: NODESxGPUS with 1 to {GPUS_PER_NODE_MAX} GPUs per node "
                      f"(e.g. {g.group(1)}:8, {g.group(1)}:4x8)")
    return g.group(1), (nodes, gpus)
  m = re.fullmatch("(" + "|".join(TPU_GENERATIONS) + r"):(\d+(?:x\d+)+)", name.strip())
  if not m:
    raise PlanError(f"topology {name!r} is not of the form GEN:AxB[xC] with GEN in {list(TPU_GENERATIONS)} "
                    f"(e.g. v5p:4x4x4, v5e:16x16, v4:2x2x1, v6e:8x8) or GPU:[NODESx]GPUS with GPU in "
                    f"{list(GPU_KINDS)} (e.g. h100:8, h200:4x8)")
  dims = tuple(int(d) for d in m.group(2).split("x"))
  if m.group(1) in ("v4", "v5p") and len(dims) != 3:
    raise PlanError(f"topology {name!r}: {m.group(1)} slices are 3-D (e.g. {m.group(1)}:4x4x4)")
  if m.group(1) in ("v5e", "v6e") and len(dims) != 2:
    raise PlanError(f"topology {name!r}: {m.group(1)} slices are 2-D (e.g. {m.group(1)}:16x16)")
  return m.group(1), dims


def topology_devices(name: str) -> list:
  """Compile-only devices of a topology: a TPU slice (needs libtpu: `pip install 'glide-jax[tpu]'`)
  or GPU nodes (needs jax's CUDA plugin, `pip install 'glide-jax[gpu-plan]'`, and
  JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 before jax starts: there is no driver to check;
  `glide-jax plan` sets it)."""
  gen, dims = parse_topology(name)
  from jax.experimental import topologies
  if gen in GPU_KINDS:
    nodes, gpus = dims
    try:
      topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(gen),
                                          topology=f"1x{nodes}x{gpus}")
    except Exception as e:  # noqa: BLE001 - jax's own message, with what to install
      raise PlanError(f"cannot describe GPU topology {name!r}: {type(e).__name__}: {str(e)[:300]}. Is jax's "
                      "CUDA plugin installed (pip install 'glide-jax[gpu-plan]'), and was "
                      "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 set before jax started?") from e
    return list(topo.devices)
  try:
    topo = topologies.get_topology_desc(name, "tpu")
  except Exception as e:  # noqa: BLE001 - the message from libtpu is what the user needs
    raise PlanError(f"cannot describe TPU topology {name!r}: {type(e).__name__}: {e}. "
                    "Is libtpu installed (pip install 'glide-jax[tpu]')?") from e
  return list(topo.devices)


def devices_per_chip(devices: Sequence[Any]) -> int:
  """TensorCores exposed as separate devices on one chip (v4 without megacore shows 2)."""
  cores = {getattr(d, "core_on_chip", 0) for d in devices}
  return max(1, len(cores))


# ----------------------------------------------------------------------------- HLO reading
def _shape_bytes(text: str) -> list[int]:
  out = []
  for dtype, dims in re.findall(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]", text):
    if dtype in _DTYPE_BYTES:
      out.append(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d))
  return out


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Collective ops in an optimized HLO module: {kind: {'count', 'bytes'}}.

  `bytes` is the size of each op's result (for async '-start' ops the largest array of the tuple).
  Ops inside a while loop (the microbatch scan) are counted once, not once per iteration.
  """
  stats = {k: {"count": 0, "bytes": 0} for k in COLLECTIVES}
  pattern = re.compile(r"=\s*(\S.*?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
  hlo_text = re.sub(r"/\*.*?\*/", "", hlo_text)  # tuple shapes carry /*index=N*/ comments
  for shape, kind, start in pattern.findall(hlo_text):
    sizes = _shape_bytes(shape)
    stats[kind]["count"] += 1
    stats[kind]["bytes"] += (max(sizes) if start else sum(sizes)) if sizes else 0
  return stats


# ----------------------------------------------------------------------------- analytic FLOPs
def _eqn_flops(eqn) -> float:
  name = eqn.primitive.name
  if name == "dot_general":
    lhs = eqn.invars[0].aval.shape
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  if name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    out = eqn.outvars[0].aval.shape
    dn = eqn.params["dimension_numbers"]
    spec = dn.rhs_spec  # (out feature dim, in feature dim, spatial...)
    kernel_in = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
    return 2.0 * math.prod(out) * kernel_in
  return 0.0


def _jaxpr_flops(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    mult = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for sub in _subjaxprs(eqn.params):
      total += mult * _jaxpr_flops(sub)
  return total


def _subjaxprs(params: dict) -> list:
  out = []
  for value in params.values():
    for v in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(v, "jaxpr") and hasattr(v, "consts"):  # ClosedJaxpr
        out.append(v.jaxpr)
      elif hasattr(v, "eqns"):
        out.append(v)
  return out


def forward_flops(stage: Any, params_abstract: Any) -> float:
  """Conv + matmul FLOPs of one forward pass for ONE example (2 x MACs), from the jaxpr."""
  model = stage.model
  if stage.name == "clip":
    size, length = int(model.image_size), int(model.max_text_len)

    def fwd(p):
      return model.apply({"params": p}, jnp.zeros((1, size, size, 3)), jnp.zeros((1,), jnp.int32),
                         jnp.zeros((1, length), jnp.int32), jnp.ones((1,), jnp.int32))
  else:
    inputs = model.dummy_inputs(1, stage.image_size)

    def fwd(p):
      return model.apply({"params": p}, **inputs, train=False)
  closed = jax.make_jaxpr(fwd)(params_abstract)
  return _jaxpr_flops(closed.jaxpr)


# ----------------------------------------------------------------------------- compile
@dataclasses.dataclass
class Result:
  label: str
  overrides: list[str]
  fits: bool
  per_device_bytes: int = 0       # arguments + outputs - aliased + temporaries + code, one device
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops_per_device: float = 0.0   # compiler's count for one device (a while body counted once)
  bytes_accessed_per_device: float = 0.0
  collectives: dict = dataclasses.field(default_factory=dict)
  compile_seconds: float = 0.0   # lowering (Python -> StableHLO) + XLA compile
  lower_seconds: float = 0.0
  fingerprint: str = ""           # sha256 of the step's StableHLO (the trainer logs the same)
  error: str = ""


def _memory(compiled: Any, result: Result) -> None:
  m = compiled.memory_analysis()
  result.argument_bytes = int(m.argument_size_in_bytes)
  result.output_bytes = int(m.output_size_in_bytes)
  result.alias_bytes = int(m.alias_size_in_bytes)
  result.temp_bytes = int(m.temp_size_in_bytes)
  result.code_bytes = int(m.generated_code_size_in_bytes)
  result.per_device_bytes = (result.argument_bytes + result.output_bytes - result.alias_bytes
                             + result.temp_bytes + result.code_bytes)


def _cost(compiled: Any, result: Result) -> None:
  cost = hardware.compiled_cost(compiled)
  result.flops_per_device = float(cost.get("flops", 0.0))
  result.bytes_accessed_per_device = float(cost.get("bytes accessed", 0.0))


_OOM = re.compile(r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+([\d.]+)([KMGT]?)i?B?\s+hbm", re.IGNORECASE)


def _oom_bytes(message: str) -> int:
  m = _OOM.search(message)
  if not m:
    return 0
  scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
  return int(float(m.group(1)) * scale[m.group(2).upper()])


def compile_train_step(config: Any, devices: Sequence[Any], label: str = "",
                       overrides: Sequence[str] = ()) -> tuple[Result, Any]:
  """Lowers and compiles the trainer's own step (glide_jax/train/program.py) for `devices`;
  returns (Result, program). An over-full HBM reported by the compiler is a Result, not an error."""
  from glide_jax.train import program as program_lib

  result = Result(label=label, overrides=list(overrides), fits=False)
  try:
    program = program_lib.build(config, devices=devices)
  except program_lib.ProgramError as e:
    raise PlanError(str(e)) from e
  start = time.time()
  try:
    lowered = program.lower()
    result.lower_seconds = time.time() - start
    result.fingerprint = program.fingerprint(lowered)
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001 - libtpu reports an over-full HBM as a compile error
    result.compile_seconds = time.time() - start
    message = str(e)
    result.per_device_bytes = _oom_bytes(message)
    result.error = message.strip().splitlines()[0][:400] if message.strip() else type(e).__name__
    if not result.per_device_bytes:
      raise
    return result, program
  result.compile_seconds = time.time() - start
  _memory(compiled, result)
  _cost(compiled, result)
  result.collectives = collectives(compiled.as_text())
  return result, program


def compile_sampler_step(config: Any, devices: Sequence[Any], batch: int) -> Result:
  """One step of the configured sampler with classifier-free guidance (a doubled model batch, the
  unconditional half on the program's empty caption), parameters sharded as in training; the
  compiled scan has one iteration."""
  from glide_jax.diffusion import guidance, samplers
  from glide_jax.diffusion.schedules import diffusion_from_settings
  from glide_jax.train import program as program_lib

  result = Result(label="sampler step", overrides=[], fits=False)
  program = program_lib.build(config, devices=devices)
  stage, mesh, rules = program.stage, program.mesh, program.rules
  shards = shard_lib.num_batch_shards(mesh, rules)
  if batch % shards:
    raise PlanError(f"sampling batch {batch} is not divisible by {shards} batch shards")
  params = program.abstract_state.params
  params_sh = program.state_shardings.params
  diffusion = diffusion_from_settings(config.diffusion, "1")
  s = stage.image_size
  cond = dict(program_lib.abstract_batch(stage, config, batch))
  cond.pop("image")
  cond_sh = shard_lib.batch_shardings(cond, mesh, rules)
  sampler_name = config.sampling.sampler if config.sampling.sampler in samplers.SAMPLERS else "ddim"
  scale = float(config.sampling.guidance_scale)
  empty = program.empty_caption

  def sample_one_step(params, cond, key):
    model = stage.model

    def apply_fn(x, t, c):
      extra = {k: c[k] for k in ("low_res", "inpaint_mask") if k in c}
      if "inpaint_mask" in extra:
        extra["inpaint_image"] = jnp.zeros(x.shape, x.dtype)
      return model.apply({"params": params}, x, t, c["tokens"], c["mask"], **extra)

    if stage.uses_text:
      tokens = jnp.broadcast_to(jnp.asarray(empty[0]), cond["tokens"].shape)
      mask = jnp.broadcast_to(jnp.asarray(empty[1]), cond["mask"].shape)
      uncond = dict(cond, tokens=tokens, mask=mask)
      model_fn = guidance.cfg_model_fn(apply_fn, cond, uncond, scale)
    else:
      model_fn = lambda x, t: apply_fn(x, t, cond)  # noqa: E731
    return samplers.sample_loop(model_fn, diffusion, (batch, s, s, 3), key, sampler=sampler_name)

  repl = program.rng_sharding
  jitted = jax.jit(program_lib.traced_for(program.platform, sample_one_step), in_shardings=(params_sh, cond_sh, repl))
  start = time.time()
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    compiled = jitted.lower(params, cond, program.abstract_rng()).compile()
  result.compile_seconds = time.time() - start
  _memory(compiled, result)
  _cost(compiled, result)
  result.collectives = collectives(compiled.as_text())
  result.fits = True
  return result


# ----------------------------------------------------------------------------- search
def fsdp_size(config: Any, n_devices: int) -> int:
  """The largest fsdp axis that divides both the device count and the model's widths (a width it
  does not divide is replicated by the sharding rules, which defeats the purpose)."""
  o = config.model.options
  widths = [int(o[k]) for k in ("num_channels", "xf_width", "n_embd") if k in o]
  g = math.gcd(*widths) if widths else n_devices
  size = 1
  while size * 2 <= n_devices and n_devices % (size * 2) == 0 and g % (size * 2) == 0:
    size *= 2
  return size


def candidates(config: Any, devices: Sequence[Any]) -> list[tuple[str, list[str]]]:
  """Alternatives to try when the config does not fit, cheapest change first."""
  out: list[tuple[str, list[str]]] = []
  n = len(devices)
  f = fsdp_size(config, n)
  shard = [] if int(config.mesh.fsdp) in (f, -1 if f == n else f) else \
      ["--config.mesh.replica=1", "--config.mesh.data=-1", f"--config.mesh.fsdp={f}"]
  remat = [] if config.model.remat_policy == "full" else ["--config.model.remat_policy=full"]
  if shard:
    out.append((f"fsdp {f}" + (" (all chips)" if f == n else ""), shard))
  if remat:
    out.append(("full remat", remat))
  if shard and remat:
    out.append((f"fsdp {f} + full remat", shard + remat))
  batch = int(config.batch_size)
  for m in (2, 4, 8):
    if batch % (m * n) == 0 and m > int(config.microbatches):
      out.append((f"fsdp {f} + full remat + {m} microbatches", shard + remat + [f"--config.microbatches={m}"]))
  return out


def result_json(config: Any, topology: str, res: Result, chip: Chip, per_chip: int, n_chips: int,
                model_flops: float, fwd_flops: float) -> dict:
  compiled_flops = res.flops_per_device * per_chip * n_chips
  per = lambda num, den: num / den if den else 0.0  # noqa: E731 - no peak known (cpu): no bound
  bound_compute = per(res.flops_per_device * per_chip, chip.peak_flops)
  bound_memory = per(res.bytes_accessed_per_device * per_chip, chip.hbm_bandwidth)
  model_bound = per(model_flops, chip.peak_flops * n_chips)
  return {
      "fits": bool(res.fits),
      "topology": topology,
      "chips": n_chips,
      "per_chip_bytes": int(res.per_device_bytes * per_chip),
      "argument_bytes": int(res.argument_bytes * per_chip),  # the sharded state and batch, per chip
      "hbm_bytes": int(chip.hbm_bytes),
      "flops_per_step": float(compiled_flops),
      "model_flops_per_step": float(model_flops),
      "forward_flops_per_example": float(fwd_flops),
      "step_time_lower_bound_s": float(max(bound_compute, bound_memory, model_bound)),
      "batch_size": int(config.batch_size),
      "microbatches": int(config.microbatches),
      "remat_policy": str(config.model.remat_policy),
      "mesh": {k: int(v) for k, v in config.mesh.items()},
      "overrides": list(res.overrides),
      "collectives": {k: v["count"] for k, v in res.collectives.items()},
      "compile_seconds": round(res.compile_seconds, 1),
      "lower_seconds": round(res.lower_seconds, 1),
      "program_fingerprint": res.fingerprint,
  }
