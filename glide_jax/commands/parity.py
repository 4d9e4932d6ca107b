"""`glide-jax parity DUMP...`: compare our models and diffusion arithmetic with reference dumps.

Prints max|ours - ref| / max|ref| for every output of every dump and exits 1 if any error is above
its tolerance: 1e-4 for the models (text2im_*, noised_clip), 1e-5 for the diffusion arithmetic
(`diffusion.npz`, computed in float64 by the reference). Exit 2 if a dump cannot be read.

Float32 checks run with jax_default_matmul_precision='highest' on every backend: by default a GPU
runs float32 matmuls in TF32 and a TPU in one bfloat16 pass, whose rounding (5e-4 and 4e-3 per
product) is above the 1e-4 tolerance and not a difference of ours.
"""
from __future__ import annotations

import argparse
import contextlib
import pathlib

import numpy as np

from glide_jax.errors import UserError

MODEL_TOLERANCE = 1e-4
DIFFUSION_TOLERANCE = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.description = __doc__
  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.add_argument("paths", nargs="+", metavar="PATH",
                      help="reference dump(s) (.npz); a directory means every .npz in it")
  parser.add_argument("--tolerance", type=float, default=None,
                      help=f"override the relative tolerance (default {MODEL_TOLERANCE:g} for models, "
                           f"{DIFFUSION_TOLERANCE:g} for diffusion dumps)")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype of the models; float32 forces full-precision matmuls "
                           "(jax_default_matmul_precision='highest'; no TF32 on GPUs, no one-pass bf16 "
                           "on TPUs); bfloat16 is informative: expect ~1e-2")


def _is_diffusion_dump(path: pathlib.Path) -> bool:
  with np.load(path, allow_pickle=False) as z:
    return any(k.startswith("betas/") for k in z.files)


def run(args: argparse.Namespace) -> int:
  import jax
  import jax.numpy as jnp

  from glide_jax.interop.glide_text2im import check_dump

  paths: list[pathlib.Path] = []
  for p in map(pathlib.Path, args.paths):
    if not p.exists():
      raise FileNotFoundError(f"{p} does not exist (give reference dumps, .npz, or directories of them)")
    paths.extend(sorted(p.glob("*.npz")) if p.is_dir() else [p])
  if not paths:
    raise UserError(f"no .npz dumps in {', '.join(args.paths)}")
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  precision = jax.default_matmul_precision("highest") if dtype is None else contextlib.nullcontext()
  if dtype is None:
    print("float32, jax_default_matmul_precision='highest'")
  with precision:
    return _check_all(paths, args.tolerance, dtype, check_dump)


def _check_all(paths, tolerance, dtype, check_dump) -> int:
  failed = broken = 0
  for path in paths:
    try:
      tol = tolerance or (DIFFUSION_TOLERANCE if _is_diffusion_dump(path) else MODEL_TOLERANCE)
      errors = check_dump(path, dtype=dtype)
    except Exception as e:  # noqa: BLE001 - report every dump, then fail
      print(f"{path}: ERROR {type(e).__name__}: {e}")
      broken += 1
      continue
    print(f"{path} (tolerance {tol:g})")
    for name, err in sorted(errors.items()):
      ok = np.isfinite(err) and err <= tol
      failed += not ok
      print(f"  {'ok  ' if ok else 'FAIL'} {name:48s} {err:.3e}")
  print(f"{len(paths)} dump(s): {failed} output(s) above tolerance, {broken} dump(s) unreadable")
  return 2 if broken else (1 if failed else 0)
