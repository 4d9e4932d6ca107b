r"""`glide-jax plan`: compile a config's train step (and a sampler step) for a TPU slice or for
NVIDIA GPU nodes on this machine and report per-chip memory against HBM, FLOPs, collectives and a
step-time lower bound.

  glide-jax plan --config configs/base.py:variant=full --topology v5p:4x4x4 --batch 2048
  glide-jax plan --config configs/base.py:variant=full --topology h100:4x8 --batch 256

TPUs need libtpu (`pip install 'glide-jax[tpu]'`), GPUs jax's CUDA plugin (`pip install
'glide-jax[gpu-plan]'`, no CUDA libraries or driver); nothing runs on either. On a GPU the program
must fit in the share of memory jax takes (XLA_PYTHON_CLIENT_MEM_FRACTION, default 0.75). When the
config does not fit, alternatives (all chips on fsdp, full remat, microbatches) are compiled and
the overrides of the first that fits are printed. The last line of output is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from glide_jax import config_lib


def add_arguments(parser: argparse.ArgumentParser) -> None:
  config_lib.add_config_flags(parser)
  parser.add_argument("--topology", required=True,
                      help="TPU slice, e.g. v4:2x2x1, v5p:4x4x4, v5p:8x8x8, v5e:16x16, v6e:8x8; NVIDIA GPU "
                           "nodes, [NODESx]GPUS of a100, h100 or h200, e.g. h100:8, h200:4x8; or 'cpu': "
                           "this machine's local devices (e.g. the 8-device CPU platform), compiled for real")
  parser.add_argument("--batch", type=int, default=None, help="global batch (default: config.batch_size)")
  parser.add_argument("--sample-batch", type=int, default=None,
                      help="images per sampler step (default: one per batch shard)")
  parser.add_argument("--no-sampler", action="store_true", help="skip the sampler step")
  parser.add_argument("--no-search", action="store_true", help="do not try alternatives when it does not fit")
  parser.add_argument("--explore", action="store_true", help="compile every alternative, not just up to a fit")


def _gib(n: float) -> str:
  return f"{n / (1 << 30):.2f} GiB"


def _size(n: float) -> str:
  for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
    if n >= scale:
      return f"{n / scale:.2f} {unit}"
  return f"{int(n)} B"


def _flops(n: float) -> str:
  return f"{n:.3e}"


def _mesh_text(config, n_devices: int) -> str:
  from glide_jax.parallel import mesh as mesh_lib
  sizes = mesh_lib.resolve_axis_sizes(config.mesh, n_devices)
  return ",".join(str(sizes[a]) for a in mesh_lib.AXES)


# libtpu reads these when the compile-only TPU client starts: it must not look for a real
# accelerator, warn at length, or hold the exclusive lock (plans may then run side by side).
_TPU_COMPILE_ONLY_ENV = {"TPU_ACCELERATOR_TYPE": "v5p-8", "TPU_SKIP_MDS_QUERY": "1",
                         "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
# jax's CUDA plugin checks the installed CUDA libraries against a driver when it starts; a
# deviceless GPU compile has neither, and the plugin does not register unless told to skip that.
_GPU_COMPILE_ONLY_ENV = {"JAX_SKIP_CUDA_CONSTRAINTS_CHECK": "1"}


def _is_gpu_topology(name: str) -> bool:
  from glide_jax import plan as plan_lib
  return name.split(":", 1)[0].strip() in plan_lib.GPU_KINDS


def run(args: argparse.Namespace) -> int:
  """Sets the compile-only environment for the plan and puts the previous one back after it, so a
  later `train` in the same process does not take TPU_WORKER_HOSTNAMES for a TPU pod."""
  from glide_jax import plan as plan_lib
  args.host_memory = plan_lib.limit_malloc_arenas()  # before libtpu starts its compiler threads
  if args.topology == "cpu":
    return _run(args)
  env = _GPU_COMPILE_ONLY_ENV if _is_gpu_topology(args.topology) else _TPU_COMPILE_ONLY_ENV
  saved = {k: os.environ.get(k) for k in env}
  for k, v in env.items():
    os.environ.setdefault(k, v)
  try:
    return _run(args)
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _run(args: argparse.Namespace) -> int:
  import flax.linen as nn
  import jax

  from glide_jax import plan as plan_lib
  from glide_jax.train import stages

  overrides = list(args.config_overrides)
  if args.batch is not None:
    overrides.append(f"--config.batch_size={args.batch}")
  try:
    config = config_lib.load_config(args.config, overrides)
    if args.topology == "cpu":
      devices = jax.devices()
      chip = plan_lib.host_chip(len(devices))
    else:
      gen, _ = plan_lib.parse_topology(args.topology)
      devices = plan_lib.topology_devices(args.topology)
      chip = plan_lib.CHIPS[gen]
    usable = plan_lib.gpu_memory_fraction() if _is_gpu_topology(args.topology) else 1.0
  except (config_lib.ConfigError, plan_lib.PlanError) as e:
    print(f"glide-jax plan: {e}", file=sys.stderr)
    return 2
  per_chip = plan_lib.devices_per_chip(devices)
  n_chips = len(devices) // per_chip
  device_hbm = int(chip.hbm_bytes * usable) // per_chip
  print(f"glide-jax plan: {args.config} {' '.join(overrides)}")
  print(f"topology {args.topology}: {n_chips} chips ({len(devices)} devices, {per_chip} per chip), "
        f"{_gib(chip.hbm_bytes)} HBM and {chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip"
        + (" (cpu: host memory shared by the devices; no peak known)" if args.topology == "cpu" else ""))
  if usable < 1.0:
    print(f"a program fits in {usable:g} of each GPU's memory, {_gib(device_hbm)}: what jax takes "
          "(XLA_PYTHON_CLIENT_MEM_FRACTION; jax's default 0.75)")
  if getattr(args, "host_memory", None):
    print(f"host memory: {args.host_memory}")

  # --- analytic count: conv + matmul FLOPs of the model's forward pass, from its jaxpr ----------
  stage = stages.make_stage(config)
  params = nn.meta.unbox(jax.eval_shape(stage.init, jax.random.key(0)))
  n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(params))
  fwd = plan_lib.forward_flops(stage, params)
  batch = int(config.batch_size)
  model_flops = 3.0 * fwd * batch  # backward = 2 x forward for convs and matmuls
  print(f"model: {config.model.kind}, {n_params:,} parameters, dtype {config.model.dtype}; "
        f"forward conv+matmul FLOPs per example {_flops(fwd)}")
  print(f"global batch {batch} ({batch / n_chips:g} per chip); analytic train FLOPs per step "
        f"3 x forward x batch = {_flops(model_flops)}")

  # --- compile as given, then alternatives --------------------------------------------------------
  tried: list[tuple[object, object]] = []
  failures: list[str] = []
  header = f"{'candidate':38s} {'mesh r,d,f,t':>13s} {'remat':>6s} {'micro':>5s} {'per-chip memory':>26s} {'fits':>4s} {'compile':>8s}"
  print("\n" + header)

  def attempt(label: str, extra: list[str]):
    cfg = config_lib.apply_overrides(config, extra)
    try:
      res, _ = plan_lib.compile_train_step(cfg, devices, label, extra)
    except plan_lib.PlanError as e:
      print(f"{label:38s} skipped: {e}")
      return None
    except Exception as e:  # noqa: BLE001 - report the compiler's refusal, try the next setting
      print(f"{label:38s} compile failed: {type(e).__name__}: {str(e).strip()[:600]}", flush=True)
      failures.append(f"{label}: {type(e).__name__}: {str(e).strip()[:600]}")
      return None
    res.fits = bool(res.per_device_bytes and not res.error and res.per_device_bytes <= device_hbm)
    mem = f"{_gib(res.per_device_bytes * per_chip)} / {_gib(device_hbm * per_chip)}"
    print(f"{label:38s} {_mesh_text(cfg, len(devices)):>13s} {cfg.model.remat_policy:>6s} {cfg.microbatches:>5d} "
          f"{mem:>26s} {'yes' if res.fits else 'NO':>4s} {res.compile_seconds:7.0f}s", flush=True)
    if res.error:
      print(f"  compiler: {res.error}")
    tried.append((cfg, res))
    return res

  given = attempt("as given", [])
  chosen = (config, given) if given is not None and given.fits else None
  if chosen is None and not args.no_search:
    for label, extra in plan_lib.candidates(config, devices):
      res = attempt(label, extra)
      if res is not None and res.fits and chosen is None:
        chosen = (tried[-1][0], res)
        if not args.explore:
          break
  if args.explore and given is not None and given.fits and not args.no_search:
    for label, extra in plan_lib.candidates(config, devices):
      attempt(label, extra)
  if not tried:
    print("glide-jax plan: nothing could be compiled", file=sys.stderr)
    print(json.dumps({"fits": False, "topology": args.topology, "per_chip_bytes": 0,
                      "hbm_bytes": int(chip.hbm_bytes), "flops_per_step": 0.0,
                      "model_flops_per_step": model_flops, "errors": failures}, sort_keys=True))
    return 2
  cfg, res = chosen if chosen is not None else tried[0]

  # --- the report for the chosen configuration ---------------------------------------------------
  print(f"\ntrain step ({res.label}{': ' + ' '.join(res.overrides) if res.overrides else ''}):")
  if res.error:
    print(f"  does not fit: {res.error}")
  else:
    print(f"  per chip: arguments {_gib(res.argument_bytes * per_chip)}, outputs {_gib(res.output_bytes * per_chip)}, "
          f"aliased (donated) {_gib(res.alias_bytes * per_chip)}, temporaries {_gib(res.temp_bytes * per_chip)}, "
          f"code {_gib(res.code_bytes * per_chip)}")
    print(f"  total {_gib(res.per_device_bytes * per_chip)} of {_gib(device_hbm * per_chip)} usable HBM "
          f"({100.0 * res.per_device_bytes / device_hbm:.1f}%)")
  summary = plan_lib.result_json(cfg, args.topology, res, chip, per_chip, n_chips, 3.0 * fwd * int(cfg.batch_size), fwd)
  summary["usable_bytes"] = int(device_hbm * per_chip)  # what `fits` is judged against, per chip
  summary["device_kind"] = devices[0].device_kind
  if not res.error:
    ratio = summary["flops_per_step"] / max(summary["model_flops_per_step"], 1.0)
    if not res.flops_per_device:  # XLA's GPU compiler gives no cost analysis
      print(f"  FLOPs per step: the compiler reports none; analytic {_flops(summary['model_flops_per_step'])} "
            "(3 x forward conv+matmul FLOPs x batch)")
    else:
      print(f"  FLOPs per step: compiled {_flops(summary['flops_per_step'])} "
            f"({_flops(res.flops_per_device)} per device x {len(devices)}); analytic {_flops(summary['model_flops_per_step'])}"
            f" (compiled/analytic {ratio:.2f};{' remat recomputes the forward;' if cfg.model.remat_policy != 'none' else ''}"
            f" elementwise ops and the optimizer are not in the analytic count{'; a microbatch scan body is counted once by the compiler' if cfg.microbatches > 1 else ''})")
    coll = ", ".join(f"{k} x{v['count']} ({_size(v['bytes'])})" for k, v in res.collectives.items() if v["count"]) or "none"
    print(f"  collectives in the compiled step (result sizes, per device): {coll}")
    if chip.peak_flops:
      print(f"  step time >= {summary['step_time_lower_bound_s'] * 1e3:.1f} ms "
            f"(max of compiled FLOPs / peak {res.flops_per_device * per_chip / chip.peak_flops * 1e3:.1f} ms, "
            f"bytes accessed / HBM bandwidth {res.bytes_accessed_per_device * per_chip / chip.hbm_bandwidth * 1e3:.1f} ms, "
            f"analytic FLOPs / pod peak {summary['model_flops_per_step'] / (chip.peak_flops * n_chips) * 1e3:.1f} ms)")
  print(f"  program_fingerprint {res.fingerprint}")
  summary["given_fits"] = bool(given is not None and given.fits)
  summary["tried"] = [{"label": r.label, "overrides": r.overrides, "fits": r.fits,
                       "per_chip_bytes": int(r.per_device_bytes * per_chip)} for _, r in tried]
  if chosen is not None and res.overrides:
    print(f"\nfits with: {' '.join(res.overrides)}")
  elif chosen is None:
    print("\nno tried setting fits; try a larger topology, more microbatches or a smaller batch")

  # --- one sampler step ------------------------------------------------------------------------
  if not args.no_sampler and cfg.stage != "clip" and chosen is not None:
    from glide_jax.parallel import mesh as mesh_lib
    from glide_jax.parallel import sharding as shard_lib
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    sample_batch = args.sample_batch or shard_lib.num_batch_shards(mesh, shard_lib.normalize_rules(cfg.rules))
    try:
      s = plan_lib.compile_sampler_step(cfg, devices, sample_batch)
      s_fits = s.per_device_bytes <= device_hbm
      print(f"\nsampler step ({cfg.sampling.sampler}, guidance {cfg.sampling.guidance_scale}, {sample_batch} images,"
            f" {2 * sample_batch if stage.uses_text else sample_batch} model rows): per chip "
            f"{_gib(s.per_device_bytes * per_chip)} ({'fits' if s_fits else 'does NOT fit'}), "
            + (f"compiled FLOPs {_flops(s.flops_per_device * len(devices))}" if s.flops_per_device
               else "no compiled FLOP count")
            + (f", >= {s.flops_per_device * per_chip / chip.peak_flops * 1e3:.2f} ms at peak"
               if chip.peak_flops and s.flops_per_device else "")
            + f"; compile {s.compile_seconds:.0f}s")
      summary["sampler"] = {"batch": sample_batch, "per_chip_bytes": int(s.per_device_bytes * per_chip),
                            "fits": bool(s_fits), "flops_per_step": s.flops_per_device * len(devices)}
    except Exception as e:  # noqa: BLE001 - the train-step plan stands on its own
      print(f"\nsampler step: could not compile: {type(e).__name__}: {str(e)[:300]}")
      summary["sampler"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  # What the compile cost this machine (the numbers docs/scale.md reports for each plan).
  import resource
  summary["host_peak_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
  print(json.dumps(summary, sort_keys=True))
  return 0 if summary["fits"] else 1
