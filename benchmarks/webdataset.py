"""Converting WebDataset tar shards (`glide-jax data build --webdataset`): samples per second.

  python -m benchmarks.run webdataset [--tars 8] [--samples-per-tar 100] [--size 256]
      [--workers 1,2] [--format png] [--keep DIR]

Writes `--tars` img2dataset-like tars of JPEG images (`--size` px square, smooth random colour
fields, so they compress like photographs rather than noise) with `.txt` captions and `.json`
metadata, then converts them once per `--workers` value into a fresh output directory, timing
`webdataset.build_webdataset` end to end (spawning the workers, decoding, scaling to `--max-size`,
re-encoding, writing ArrayRecord, finalizing). One JSON line per run.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

import numpy as np

from benchmarks import common


def make_tars(root: str, tars: int, per_tar: int, size: int, seed: int = 0) -> str:
  """img2dataset-like shards under root; returns their brace pattern."""
  from PIL import Image

  rng = np.random.default_rng(seed)
  for t in range(tars):
    with tarfile.open(os.path.join(root, f"{t:05d}.tar"), "w") as tar:
      for i in range(per_tar):
        key = f"{t:05d}{i:04d}"
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        caption = f"a smooth picture number {i} of shard {t}"
        meta = json.dumps({"caption": caption, "url": f"http://example.invalid/{key}.jpg", "key": key})
        for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", meta.encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(data)
          tar.addfile(info, io.BytesIO(data))
  return os.path.join(root, f"{{00000..{tars - 1:05d}}}.tar")


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tars", type=int, default=8)
  p.add_argument("--samples-per-tar", type=int, default=100)
  p.add_argument("--size", type=int, default=256, help="source image side (px)")
  p.add_argument("--max-size", type=int, default=256, help="short side the conversion scales to")
  p.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
  p.add_argument("--format", choices=("png", "jpeg"), default="png")
  p.add_argument("--keep", default=None, help="write the tars and outputs here and keep them")
  args = p.parse_args(argv)

  from glide_jax.data import webdataset

  root = args.keep or tempfile.mkdtemp(prefix="wds_bench_")
  os.makedirs(root, exist_ok=True)
  try:
    tars_dir = os.path.join(root, "tars")
    os.makedirs(tars_dir, exist_ok=True)
    pattern = make_tars(tars_dir, args.tars, args.samples_per_tar, args.size)
    tar_bytes = sum(os.path.getsize(os.path.join(tars_dir, f)) for f in os.listdir(tars_dir))
    for workers in (int(w) for w in args.workers.split(",")):
      out = os.path.join(root, f"out_w{workers}")
      shutil.rmtree(out, ignore_errors=True)
      start = time.perf_counter()
      result = webdataset.build_webdataset(pattern, out, workers=workers, min_size=16,
                                           max_size=args.max_size, val_fraction=0.05,
                                           image_format=args.format)
      wall = time.perf_counter() - start
      ds = result["dataset"]
      common.emit({"benchmark": "webdataset", "workers": workers, "tars": args.tars,
                   "samples": ds["samples"], "kept": ds["kept"], "size": args.size,
                   "max_size": args.max_size, "format": args.format, "input_mb": tar_bytes / 2 ** 20,
                   "wall_s": wall, "samples_per_s": ds["samples"] / wall,
                   "cores": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]})
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  return 0
