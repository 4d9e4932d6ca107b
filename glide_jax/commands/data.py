"""`glide-jax data`: build datasets and train tokenizers.

  glide-jax data prepare --name glide_shapes/size64 [--data-dir D] [--file-format array_record|tfrecord]
  glide-jax data build --images DIR --out DATA_DIR [--min-size 64 --max-size 512 --val-fraction 0.05]
      [--file-format array_record|tfrecord]
  glide-jax data build --webdataset 'DIR/{00000..00099}.tar' --out DATA_DIR [--caption-field caption]
      [--workers 4] [--shard-index i --num-shards n] [--finalize] [--min-size ... as for --images]
  glide-jax data train-tokenizer --dataset glide_shapes/size32 --vocab-size 256 --out tok.model
"""
from __future__ import annotations

import argparse
import os

from glide_jax import errors


def add_arguments(parser: argparse.ArgumentParser) -> None:
  sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

  p = sub.add_parser("prepare", help="Prepare a TFDS dataset (glide_shapes is procedural: no download).")
  p.add_argument("--name", default="glide_shapes/size32", help="TFDS name, e.g. glide_shapes/size64")
  p.add_argument("--data-dir", default=None, help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--train-examples", type=int, default=None,
                 help="glide_shapes only: train size (use a data dir of its own for non-default sizes)")
  p.add_argument("--validation-examples", type=int, default=None, help="glide_shapes only: validation size")
  _file_format_argument(p)

  b = sub.add_parser("build", help="Build the image_folder dataset from a directory of captioned images "
                                   "or WebDataset tar shards.")
  source = b.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="directory of images with x.txt captions or captions.jsonl/.csv")
  source.add_argument("--webdataset", metavar="PATTERN",
                      help="WebDataset tar shards, a brace pattern: 'DIR/{00000..00099}.tar' (docs/data.md)")
  b.add_argument("--out", required=True, help="TFDS data dir to write (use it as data.data_dir)")
  b.add_argument("--min-size", type=int, default=64, help="skip images whose short side is smaller")
  b.add_argument("--max-size", type=int, default=512, help="scale images down to this short side (0: keep)")
  b.add_argument("--val-fraction", type=float, default=0.05, help="fraction of files (by path hash) for validation")
  b.add_argument("--format", choices=("png", "jpeg"), default="png", help="how images are stored")
  b.add_argument("--overwrite", action="store_true", help="rebuild even if --out already holds a dataset")
  _file_format_argument(b)
  w = b.add_argument_group("--webdataset only")
  w.add_argument("--caption-field", default="caption", help="caption field of KEY.json (used when there is no KEY.txt)")
  w.add_argument("--workers", type=int, default=4, help="tars converted in parallel processes (1: in this process)")
  w.add_argument("--shard-index", type=int, default=0, help="this machine's part: tars whose position is i mod n")
  w.add_argument("--num-shards", type=int, default=1, help="number of machines converting the pattern's tars")
  w.add_argument("--finalize", action="store_true",
                 help="convert nothing: write the dataset info if every tar is converted (else exit 2)")

  t = sub.add_parser("train-tokenizer", help="Train a sentencepiece tokenizer on a dataset's captions.")
  t.add_argument("--dataset", required=True, help="TFDS name (glide_shapes/size32, image_folder, coco_captions ...)")
  t.add_argument("--data-dir", default=None)
  t.add_argument("--split", default="train")
  t.add_argument("--caption-key", default="caption", help="feature holding captions ('/' for nested: captions/text)")
  t.add_argument("--vocab-size", type=int, required=True)
  t.add_argument("--out", required=True, help="the .model file to write")
  t.add_argument("--max-captions", type=int, default=1_000_000)
  t.add_argument("--model-type", choices=("unigram", "bpe", "word", "char"), default="unigram")


def _file_format_argument(parser: argparse.ArgumentParser) -> None:
  from glide_jax.data.pipeline import DEFAULT_FILE_FORMAT, FILE_FORMATS

  parser.add_argument("--file-format", choices=FILE_FORMATS, default=DEFAULT_FILE_FORMAT,
                      help="record files to write: array_record (default; opened with no pass over the "
                           "records) or tfrecord")


def run(args: argparse.Namespace) -> int:
  try:
    if args.action == "prepare":
      return _prepare(args)
    if args.action == "build":
      return _build(args)
    return _train_tokenizer(args)
  except (ValueError, KeyError) as e:
    # TFDS refuses a dataset, split or feature it does not know with these from its own code; the
    # CLI prints user errors in one line (glide_jax/errors.py), file errors included.
    raise errors.UserError(_short(e)) from e


def _short(error: Exception) -> str:
  """The message without TFDS's list of every dataset it knows (hundreds of lines): its first line
  and its 'Did you mean' line."""
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  lines = text.splitlines() or [""]
  if len(lines) <= 3:
    return text
  return " ".join([lines[0]] + [ln.strip() for ln in lines[1:] if ln.startswith("Did you mean")])


def _prepare(args) -> int:
  import tensorflow_datasets as tfds

  import glide_jax.data  # noqa: F401  (registers the builders)

  kwargs = {}
  if args.name.split("/")[0] == "glide_shapes":
    kwargs = {"train_examples": args.train_examples, "validation_examples": args.validation_examples}
  elif args.train_examples or args.validation_examples:
    raise ValueError("--train-examples/--validation-examples apply to glide_shapes only")
  builder = tfds.builder(args.name, data_dir=args.data_dir, **kwargs)
  existed = builder.is_prepared()
  builder.download_and_prepare(file_format=args.file_format)  # a prepared dataset is reused as it is
  stored = builder.info.file_format.value
  print(f"{args.name}: {'already ' if existed else ''}prepared in {builder.data_dir} ({stored}): "
        + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))
  if stored != args.file_format:
    print(f"  kept its {stored} files; delete {builder.data_dir} and rerun to write {args.file_format}")
  return 0


def _build(args) -> int:
  from glide_jax.data import image_folder

  if args.webdataset is not None:
    return _build_webdataset(args)
  report = image_folder.build_image_folder(args.images, args.out, min_size=args.min_size,
                                           max_size=args.max_size, val_fraction=args.val_fraction,
                                           image_format=args.format, overwrite=args.overwrite,
                                           file_format=args.file_format)
  print(image_folder.format_report(report))
  print(f"dataset: {report['dataset_dir']}; report: {os.path.join(report['dataset_dir'], image_folder.REPORT_NAME)}")
  print(f"use it with data.name='image_folder', data.data_dir='{args.out}'")
  return 0


def _build_webdataset(args) -> int:
  from glide_jax.data import webdataset

  if args.overwrite:
    raise errors.UserError("--overwrite does not apply to --webdataset (a rerun resumes per tar); use a new --out")
  if args.file_format != webdataset.FILE_SUFFIX:
    raise errors.UserError(f"--webdataset writes {webdataset.FILE_SUFFIX} only, not --file-format {args.file_format}")
  result = webdataset.build_webdataset(
      args.webdataset, args.out, caption_field=args.caption_field, min_size=args.min_size,
      max_size=args.max_size, val_fraction=args.val_fraction, image_format=args.format,
      workers=args.workers, shard_index=args.shard_index, num_shards=args.num_shards,
      finalize_only=args.finalize, progress=True)
  print(webdataset.format_report(result))
  if result["dataset"] is None:
    if args.finalize:
      raise errors.UserError(f"{len(result['pending'])} tars not converted yet, first {result['pending'][0]}")
    return 0
  print(f"use it with data.name='image_folder', data.data_dir='{args.out}'")
  return 0


def iter_captions(name: str, data_dir: str | None, split: str, caption_key: str, limit: int):
  """Caption strings of a TFDS split, in record order.

  Read through pipeline.RecordSource, so ArrayRecord splits (which TFDS's `as_dataset` cannot
  read) and TFRecord ones work alike; each record is parsed with TFDS's NumPy example parser for
  the caption feature alone (nothing else is parsed or decoded: about 40 us a record here, where a
  full TensorFlow deserialize per record took 3 ms).
  """
  import numpy as np
  from tensorflow_datasets.core import example_parser
  from tqdm import tqdm

  from glide_jax.data import pipeline

  builder = pipeline.load_builder({"name": name, "data_dir": data_dir})
  top = caption_key.split("/")[0]
  features = builder.info.features
  names = set(features.keys())
  if top not in names:
    raise KeyError(f"{name} has no feature {top!r} (features: {sorted(names)})")
  feature = features[top]
  parser = example_parser.ExampleParserNp({top: feature.get_serialized_info()})
  source = pipeline.RecordSource(builder, split)
  total = min(limit, source.num_examples)
  chunk = 1024
  with tqdm(total=total, desc="captions", unit="ex") as bar:
    for start in range(0, total, chunk):
      records = source.read(np.arange(start, min(start + chunk, total)))
      for record in records:
        value = {top: feature.decode_example_np(parser.parse_example(record)[top])}
        for part in caption_key.split("/"):
          value = value[part]
        for c in ([value] if isinstance(value, (bytes, str)) else list(value)):
          yield c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
      bar.update(len(records))


def _train_tokenizer(args) -> int:
  from glide_jax.data import tokenizers

  captions = list(iter_captions(args.dataset, args.data_dir, args.split, args.caption_key, args.max_captions))
  path = tokenizers.train_sentencepiece(captions, args.vocab_size, args.out, model_type=args.model_type)
  tok = tokenizers.SentencePieceTokenizer(path)
  print(f"trained a {args.model_type} sentencepiece model on {len(captions)} captions: {path} "
        f"({tok.vocab_size} pieces; pad id {tok.pad_id})")
  print(f"use it with data.tokenizer = {{'type': 'sentencepiece', 'path': '{path}', 'text_ctx': 128}}")
  return 0
