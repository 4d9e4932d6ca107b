"""The demo's loss curve in bfloat16 against float32: the same run twice, only the compute dtype differs.

  python -m benchmarks.run dtype_curve --steps 300                  # the shapes demo, 300 steps each
  python -m benchmarks.run dtype_curve --steps 300 --data-dir runs/tensorflow_datasets

Both runs start from the same float32 parameters and see the same batches, caption dropout,
timesteps and noise (everything random is a function of the seed and the step), so their per-step
losses pair up and any gap is the dtype's. The losses are averaged over windows of `--window` steps
(one step's loss swings with its timesteps); the report gives each window's two means and their
relative difference, and the largest one. Parameters, norms and softmax stay float32 in both runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from benchmarks import common

DTYPES = ("float32", "bfloat16")


def compare_curves(reference: Sequence[float], other: Sequence[float], window: int) -> dict[str, Any]:
  """Window means of two paired loss curves and their relative differences |other - ref| / ref."""
  import numpy as np

  ref, oth = np.asarray(reference, np.float64), np.asarray(other, np.float64)
  if ref.shape != oth.shape or ref.size < window or window < 1:
    raise ValueError(f"need two curves of equal length >= window {window}, got {ref.size} and {oth.size}")
  n = ref.size // window
  rows = []
  for i in range(n):
    a, b = ref[i * window:(i + 1) * window].mean(), oth[i * window:(i + 1) * window].mean()
    rows.append({"steps": [i * window + 1, (i + 1) * window], "float32": round(float(a), 5),
                 "bfloat16": round(float(b), 5), "rel_diff": round(float(abs(b - a) / abs(a)), 5)})
  return {"window": window, "windows": rows, "max_rel_diff": max(r["rel_diff"] for r in rows),
          "identical": bool(np.array_equal(ref, oth)),
          "mean_abs_step_diff": round(float(np.mean(np.abs(oth - ref))), 6)}


def train_losses(spec: str, overrides: Sequence[str], dtype: str, workdir: str, data_iterator: Any = None,
                 tokenizer: Any = None, compiler_options: dict | None = None) -> list[float]:
  """Trains `spec` with `overrides` at compute dtype `dtype` in `workdir`; its per-step losses."""
  from glide_jax import config_lib
  from glide_jax.train import train as train_lib

  quiet = ["--config.log.every=1", "--config.log.sample_every=0", "--config.log.tensorboard=false",
           f"--config.model.dtype={dtype}"]
  config = config_lib.load_config(spec, list(overrides) + quiet)
  config.checkpoint.every = int(config.total_steps)  # one save, at the end
  result = train_lib.train(config, workdir, data_iterator=data_iterator, tokenizer=tokenizer, progress=False,
                           compiler_options=compiler_options)
  return [float(x) for x in result["losses"]]


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(prog="dtype_curve", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/shapes.py", help="the config to train (default: the demo's)")
  p.add_argument("--steps", type=int, default=300, help="training steps of each run (the schedule ends there)")
  p.add_argument("--window", type=int, default=50, help="steps per averaged window")
  p.add_argument("--data-dir", default="runs/tensorflow_datasets", help="where glide_shapes is prepared")
  p.add_argument("--workdir", default=None, help="parent of the two runs' workdirs (default: a temporary one)")
  args = p.parse_args(argv)
  spec = f"{args.config}:steps={args.steps}" if ":" not in args.config else args.config
  overrides = [f"--config.data.data_dir={args.data_dir}", f"--config.total_steps={args.steps}"]
  common.emit({"benchmark": "dtype_curve", "machine": common.machine(), "config": spec, "steps": args.steps})
  with tempfile.TemporaryDirectory(dir=args.workdir) as root:
    curves = {d: train_losses(spec, overrides, d, f"{root}/{d}") for d in DTYPES}
  result = compare_curves(curves["float32"], curves["bfloat16"], args.window)
  common.emit({"benchmark": "dtype_curve", "config": spec, **result})
  return 0


if __name__ == "__main__":
  sys.exit(main())
