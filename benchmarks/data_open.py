"""Opening a prepared split: ArrayRecord (no pass over the records) against TFRecord, side by side.

  python -m benchmarks.data_open [--examples 1000000] [--repeats 5] [--data-dir DIR] [--keep]

Writes one `image_folder` dataset per format with the same records: tiny examples (an 8x8 PNG, a
short caption, a file name) serialized by the image_folder features themselves, in TFDS's layout
(its shard count for that size, its file names, a DatasetInfo with the shard lengths written by
TFDS), the records written directly with ArrayRecordWriter / TFRecordWriter (the same bytes a TFDS
build writes, without its per-example Python encode, which would dominate at 1M examples). Then,
in a fresh process per run (imports not timed), times what a training run does before its first
batch: `tfds.builder('image_folder', data_dir=...)` + `pipeline.RecordSource(builder, 'train')` +
reading one record, and prints the median per format and the ratio. The files are written just
before they are opened, so they are in the page cache: the TFRecord figure is a lower bound for a
cold disk, and far below what reading every record header over gs:// costs.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

FORMATS = ("array_record", "tfrecord")
DISTINCT = 1000  # distinct serialized examples, repeated cyclically to the requested size


def _builder(data_dir: str, file_format: str | None = None):
  from glide_jax.data import image_folder

  kwargs = {"file_format": file_format} if file_format else {}
  return image_folder.ImageFolder(data_dir=data_dir, **kwargs)


def serialized_examples(n: int = DISTINCT) -> list[bytes]:
  """n distinct image_folder examples (8x8 PNG, caption, file), serialized by the features."""
  import numpy as np
  from PIL import Image

  with tempfile.TemporaryDirectory() as tmp:
    features = _builder(tmp).info.features
  rng = np.random.default_rng(0)
  out = []
  for i in range(n):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    out.append(features.serialize_example({"image": buf.getvalue(), "caption": f"example number {i}",
                                           "file": f"images/{i:07d}.png"}))
  return out


def write_dataset(data_dir: str, file_format: str, num_examples: int, records: list[bytes]) -> str:
  """A prepared image_folder 'train' split of num_examples records (record k = records[k % len]),
  in TFDS's layout; returns the dataset's directory."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module
  from tensorflow_datasets.core.utils import shard_utils

  builder = _builder(data_dir, file_format)
  if builder.is_prepared():
    raise FileExistsError(f"{builder.data_dir} already holds a dataset")
  out_dir = str(builder.data_dir)
  os.makedirs(out_dir, exist_ok=True)
  mean = sum(map(len, records)) / len(records)
  num_shards = shard_utils.ShardConfig.calculate_number_shards(int(mean * num_examples), num_examples)
  ends = shard_utils.get_shard_boundaries(num_examples, num_shards)
  template = tfds.core.ShardedFileTemplate(data_dir=out_dir, dataset_name=builder.name, split="train",
                                           filetype_suffix=builder.info.file_format.file_suffix)
  lengths, num_bytes, start = [], 0, 0
  for path, end in zip(template.sharded_filepaths(num_shards), ends):
    if file_format == "array_record":
      writer = array_record_module.ArrayRecordWriter(os.fspath(path), "group_size:1")  # as TFDS
    else:
      writer = tf.io.TFRecordWriter(os.fspath(path))
    for k in range(start, end):
      writer.write(records[k % len(records)])
    writer.close()
    lengths.append(end - start)
    num_bytes += os.path.getsize(path)
    start = end
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train", shard_lengths=lengths, num_bytes=num_bytes, filename_template=template)]))
  builder.info.write_to_directory(out_dir)
  return out_dir


def open_once(data_dir: str, distinct: int = DISTINCT) -> dict:
  """Runs in a child process: the timed open, after the imports; checks the record read back."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_data_source  # noqa: F401  (imports are not timed)

  import glide_jax.data  # noqa: F401  (registers image_folder)
  from glide_jax.data import pipeline

  t0 = time.perf_counter()
  builder = tfds.builder("image_folder", data_dir=data_dir)
  t1 = time.perf_counter()
  source = pipeline.RecordSource(builder, "train")
  t2 = time.perf_counter()
  index = source.num_examples // 2
  record = source.read([index])[0]
  t3 = time.perf_counter()
  example = builder.info.features.deserialize_example_np(record)
  want = f"example number {index % distinct}"
  caption = example["caption"].decode() if isinstance(example["caption"], bytes) else str(example["caption"])
  if caption != want or example["image"].shape != (8, 8, 3):
    raise RuntimeError(f"record {index} reads back as {caption!r}, want {want!r}")
  return {"file_format": source.file_format, "examples": source.num_examples,
          "shards": builder.info.splits["train"].num_shards, "builder_s": t1 - t0,
          "record_source_s": t2 - t1, "first_read_s": t3 - t2, "open_s": t3 - t0}


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--examples", type=int, default=1_000_000)
  p.add_argument("--repeats", type=int, default=5, help="fresh-process opens per format (median printed)")
  p.add_argument("--data-dir", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "glide_jax_bench_open"))
  p.add_argument("--keep", action="store_true", help="keep the written datasets (default: delete them)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print(json.dumps(open_once(args.child)))
    return 0
  print(f"machine: {os.cpu_count()} cores visible; {args.examples:,} examples per format; "
        f"{args.repeats} opens per format, each in a fresh process")
  import tensorflow as tf  # noqa: F401  (imported before the writes are timed)
  from array_record.python import array_record_module  # noqa: F401

  records = serialized_examples()
  dirs = {}
  try:
    for fmt in FORMATS:
      t = time.perf_counter()
      root = os.path.join(args.data_dir, fmt)
      if os.path.exists(root):
        shutil.rmtree(root)
      dirs[fmt] = root
      path = write_dataset(root, fmt, args.examples, records)
      size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
      print(f"wrote {fmt:12s} {args.examples:,} records, {size / 2 ** 20:.0f} MiB in "
            f"{time.perf_counter() - t:.1f} s", flush=True)
    results = {}
    for fmt in FORMATS:
      runs = []
      for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-m", "benchmarks.data_open", "--child", dirs[fmt]],
                             capture_output=True, text=True, check=False)
        if out.returncode:
          print(out.stderr[-3000:], file=sys.stderr)
          return out.returncode
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
      row = {k: statistics.median(r[k] for r in runs) for k in ("builder_s", "record_source_s", "first_read_s", "open_s")}
      row.update(file_format=fmt, examples=runs[0]["examples"], shards=runs[0]["shards"],
                 open_runs_s=[r["open_s"] for r in runs])
      results[fmt] = row
      print(f"open {fmt:12s} {row['open_s']:8.3f} s  (builder {row['builder_s']:.3f} s, RecordSource "
            f"{row['record_source_s']:.3f} s, first read {row['first_read_s']:.4f} s; {row['shards']} shards; "
            f"median of {len(runs)})", flush=True)
    ratio = results["tfrecord"]["open_s"] / results["array_record"]["open_s"]
    print(f"tfrecord / array_record open time: {ratio:.1f}x")
    print(json.dumps({"summary": True, "examples": args.examples, "results": list(results.values()),
                      "tfrecord_over_array_record": ratio}))
  finally:
    if not args.keep:
      for root in dirs.values():
        shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
