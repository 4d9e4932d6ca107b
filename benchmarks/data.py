"""Input-pipeline throughput: images/second of the 64 px and 256 px pipelines from prepared data.

  python -m benchmarks.data [--data-dir DIR] [--batch 64] [--seconds 20] [--cores 1 2]

Prepares glide_shapes/size64 and glide_shapes/size256 (the registered configs) in --data-dir if
needed, timing the preparation, then for each core count runs each pipeline in a subprocess pinned
to that many cores (sched_setaffinity, and a tf.data thread pool of that size) and prints
images/second after a warm-up. 64 px: the base stage (decode, tokens, mask). 256 px: the upsample
stage (decode, 64 px area-downsampled low-res input, tokens, mask).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

PIPELINES = {  # name -> (dataset, stage, image size, extra data config)
    "64px base": ("glide_shapes/size64", "base", 64, {}),
    "256px upsample": ("glide_shapes/size256", "upsample", 256, {"low_res_size": 64}),
    "64px inpaint": ("glide_shapes/size64", "inpaint", 64, {"masks": {"kind": "random"}}),
}


def prepare(data_dir: str, names: list[str] | None = None) -> dict[str, float]:
  import tensorflow_datasets as tfds

  import glide_jax.data  # noqa: F401

  seconds = {}
  for name in names or sorted({v[0] for v in PIPELINES.values()}):
    builder = tfds.builder(name, data_dir=data_dir)
    if builder.is_prepared():
      continue
    t, cpu = time.perf_counter(), time.process_time()
    builder.download_and_prepare()
    seconds[name] = time.perf_counter() - t
    cpu = time.process_time() - cpu
    print(f"prepared {name} in {seconds[name]:.1f} s wall, {cpu:.1f} s CPU "
          f"({', '.join(f'{k} {v.num_examples}' for k, v in builder.info.splits.items())})", flush=True)
  return seconds


def measure(name: str, data_dir: str, batch: int, seconds: float, cores: int) -> dict:
  """Runs in a child process pinned to `cores` cores."""
  os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:cores]))
  from glide_jax.data import pipeline

  dataset, stage, size, extra = PIPELINES[name]
  cfg = {"name": dataset, "data_dir": data_dir, "split": "train", "num_threads": cores,
         "tokenizer": {"type": "words", "text_ctx": 128}, **extra}
  it = pipeline.make_train_iterator(cfg, stage, batch, size, seed=0, process_index=0, process_count=1)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(5):  # warm-up: let AUTOTUNE settle
    next(it)
  n, t = 0, time.perf_counter()
  while time.perf_counter() - t < seconds:
    next(it)
    n += batch
  dt = time.perf_counter() - t
  return {"pipeline": name, "cores": cores, "images_per_s": n / dt, "images": n, "first_batch_s": first}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "glide_jax_bench_tfds"))
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--seconds", type=float, default=20.0)
  p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
  p.add_argument("--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES))
  p.add_argument("--prepare-only", action="store_true", help="only prepare (and time) the datasets")
  p.add_argument("--datasets", nargs="+", default=None, help="datasets to prepare (default: those the pipelines read)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    name, cores = args.child.rsplit(":", 1)
    print(json.dumps(measure(name, args.data_dir, args.batch, args.seconds, int(cores))))
    return 0
  print(f"machine: {os.cpu_count()} cores visible; batch {args.batch}; {args.seconds:.0f} s per run")
  prepare(args.data_dir, args.datasets)
  if args.prepare_only:
    return 0
  rows = []
  for name in args.pipelines:
    for cores in args.cores:
      out = subprocess.run([sys.executable, "-m", "benchmarks.data", "--child", f"{name}:{cores}",
                            "--data-dir", args.data_dir, "--batch", str(args.batch),
                            "--seconds", str(args.seconds)], capture_output=True, text=True, check=False)
      if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        return out.returncode
      row = json.loads(out.stdout.strip().splitlines()[-1])
      rows.append(row)
      print(f"{name:16s} cores={cores}  {row['images_per_s']:8.0f} images/s  "
            f"({row['images']} images; first batch {row['first_batch_s']:.1f} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
