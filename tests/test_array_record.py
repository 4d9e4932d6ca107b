"""ArrayRecord, the default prepared format: opened without reading the records, the same examples
in the same order as TFRecord, read by every reader of prepared data; TFRecord data keeps working."""
import json

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from PIL import Image

from glide_jax import cli
from glide_jax.commands import data as data_cmd
from glide_jax.data import image_folder, pipeline, render, shapes

N = 2000
NAME = "glide_shapes/size32"
TOK = {"type": "words", "text_ctx": 12}


@pytest.fixture(scope="module")
def shapes_dirs(tmp_path_factory):
  """glide_shapes/size32 with 2,000 train examples: prepared by `glide-jax data prepare` with the
  default format, and prepared the way every earlier version did (the builder's own default)."""
  ar = tmp_path_factory.mktemp("default_format")
  assert cli.main(["data", "prepare", "--name", NAME, "--data-dir", str(ar), "--train-examples", str(N),
                   "--validation-examples", "16"]) == 0
  old = tmp_path_factory.mktemp("old_tfrecord")
  shapes.GlideShapes(config="size32", train_examples=N, validation_examples=16,
                     data_dir=str(old)).download_and_prepare()
  return {"array_record": str(ar), "tfrecord": str(old)}


def builder_of(data_dir):
  return pipeline.load_builder({"name": NAME, "data_dir": data_dir})


REAL_READER, REAL_INDEX = pipeline._open_array_record, pipeline._index_tfrecord


class ReaderCount:
  """Counts ArrayRecord readers opened and TFRecord shards indexed."""

  def __init__(self, monkeypatch, index_raises=False):
    self.readers, self.indexed = 0, 0
    real_reader, real_index = REAL_READER, REAL_INDEX

    def reader(*args, **kwargs):
      self.readers += 1
      return real_reader(*args, **kwargs)

    def index(path):
      if index_raises:
        raise AssertionError(f"_index_tfrecord({path}) called")
      self.indexed += 1
      return real_index(path)

    monkeypatch.setattr(pipeline, "_open_array_record", reader)
    monkeypatch.setattr(pipeline, "_index_tfrecord", index)


def test_default_format_opens_without_reading_the_records(shapes_dirs, monkeypatch):
  builder = builder_of(shapes_dirs["array_record"])
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert all(".array_record-" in ins.filename for ins in builder.info.splits["train"].file_instructions)
  count = ReaderCount(monkeypatch, index_raises=True)
  source = pipeline.RecordSource(builder, "train")
  assert (source.num_examples, source.file_format) == (N, "array_record")
  assert count.readers == 0  # nothing opened, let alone read: the shard lengths come from dataset_info
  record = source.read(np.array([1234]))[0]
  assert count.readers == 1  # the one shard holding record 1234
  ex = builder.info.features.deserialize_example_np(record)
  want = next(render.generate(render.SPLIT_SEEDS["train"], 1234, 1, 32))
  assert int(ex["index"]) == 1234 and ex["caption"].decode() == want["caption"]
  np.testing.assert_array_equal(ex["image"], want["image"])
  # The same open of a TFRecord split does index every shard (so the check above means something).
  old = builder_of(shapes_dirs["tfrecord"])
  count = ReaderCount(monkeypatch)
  assert pipeline.RecordSource(old, "train").file_format == "tfrecord"
  assert count.indexed == len(old.info.splits["train"].file_instructions) >= 1


def test_both_formats_hold_the_same_records_in_the_same_order(shapes_dirs):
  ar, old = builder_of(shapes_dirs["array_record"]), builder_of(shapes_dirs["tfrecord"])
  for split, n in (("train", N), ("validation", 16), ("train[1500:1700]", 200)):
    a, t = pipeline.RecordSource(ar, split), pipeline.RecordSource(old, split)
    assert a.num_examples == t.num_examples == n
    idx = np.arange(n)
    assert list(a.read(idx)) == list(t.read(idx)), split
  # TFDS's own readers (not RecordSource) agree too, decoded.
  via_tfds = list(old.as_dataset(split="validation").as_numpy_iterator())
  via_source = ar.as_data_source(split="validation")
  assert len(via_tfds) == len(via_source) == 16
  for k, e in enumerate(via_tfds):
    f = via_source[k]
    assert int(e["index"]) == int(f["index"]) == k
    np.testing.assert_array_equal(e["image"], f["image"])
    assert e["caption"] == f["caption"]
  # And the training pipeline gives the same batches from either.
  make = lambda d: pipeline.make_train_iterator({"name": NAME, "data_dir": d, "split": "train", "tokenizer": TOK},
                                                "base", 8, 32, seed=4, process_index=0, process_count=1)
  ita, itt = make(shapes_dirs["array_record"]), make(shapes_dirs["tfrecord"])
  for _ in range(3):
    ba, bt = next(ita), next(itt)
    assert ba.keys() == bt.keys()
    for key in ba:
      np.testing.assert_array_equal(ba[key], bt[key], err_msg=key)
  ev = lambda d: list(pipeline.make_eval_iterator({"name": NAME, "data_dir": d, "tokenizer": TOK}, "base", 8, 32,
                                                  process_index=0, process_count=1))
  for ea, et in zip(ev(shapes_dirs["array_record"]), ev(shapes_dirs["tfrecord"]), strict=True):
    np.testing.assert_array_equal(ea["image"], et["image"])
    assert list(ea["caption"]) == list(et["caption"])


def test_caption_iterator_reads_either_format(shapes_dirs):
  """`data train-tokenizer`'s caption reader (TFDS's as_dataset cannot read ArrayRecord)."""
  want = [c["caption"] for c in render.generate(render.SPLIT_SEEDS["train"], 0, 1100, 32)]
  for fmt, d in shapes_dirs.items():
    assert list(data_cmd.iter_captions(NAME, d, "train", "caption", 1100)) == want, fmt
  assert len(list(data_cmd.iter_captions(NAME, shapes_dirs["array_record"], "validation", "caption", 10**6))) == 16


def test_an_existing_tfrecord_dataset_is_read_as_it_is(shapes_dirs, monkeypatch):
  monkeypatch.setattr(shapes.GlideShapes, "download_and_prepare",
                      lambda *a, **k: pytest.fail("a prepared dataset was prepared again"))
  it = pipeline.make_train_iterator({"name": NAME, "data_dir": shapes_dirs["tfrecord"], "split": "train",
                                     "tokenizer": TOK}, "base", 8, 32, seed=0, process_index=0,
                                    process_count=1, keep_captions=True)
  assert it.source.file_format == "tfrecord" and it.num_examples == N
  b = next(it)
  for row, i in enumerate(b["index"]):
    assert b["caption"][row].decode() == next(render.generate(render.SPLIT_SEEDS["train"], int(i), 1, 32))["caption"]


def test_first_use_preparation_writes_array_record(tmp_path, monkeypatch):
  counts = {"train": 40, "validation": 8}
  monkeypatch.setattr(shapes.GlideShapes, "split_count", lambda self, split: counts[split])
  builder = pipeline.load_builder({"name": NAME, "data_dir": str(tmp_path)})
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert pipeline.RecordSource(builder, "train").num_examples == 40


class TinyCaptioned(tfds.core.GeneratorBasedBuilder):
  """Any TFDS builder: `glide-jax data prepare --name tiny_captioned` writes it in the chosen format."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text(),
        "captions": tfds.features.Sequence({"text": tfds.features.Text(), "id": np.int64})}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    for i in range(12):
      yield i, {"image": np.full((6, 4 + i, 3), i, np.uint8), "caption": f"picture {i}",
                "captions": [{"text": f"picture {i}, caption {j}", "id": j} for j in range(i % 3)]}


def test_prepare_command_file_format(tmp_path, capsys):
  base = ["data", "prepare", "--name", "tiny_captioned"]
  for fmt in ("tfrecord", "array_record"):
    d = tmp_path / fmt
    assert cli.main(base + ["--data-dir", str(d), "--file-format", fmt]) == 0
    assert f"({fmt}): train 12" in capsys.readouterr().out
    builder = tfds.builder("tiny_captioned", data_dir=str(d))
    assert builder.info.file_format.value == fmt
    captions = sorted(data_cmd.iter_captions("tiny_captioned", str(d), "train", "caption", 100))
    assert captions == sorted(f"picture {i}" for i in range(12))
    nested = sorted(data_cmd.iter_captions("tiny_captioned", str(d), "train", "captions/text", 100))
    assert nested == sorted(f"picture {i}, caption {j}" for i in range(12) for j in range(i % 3))
  # A prepared dataset is reused in its own format, and the command says so.
  assert cli.main(base + ["--data-dir", str(tmp_path / "tfrecord")]) == 0
  out = capsys.readouterr().out
  assert "already prepared" in out and "kept its tfrecord files" in out
  assert tfds.builder("tiny_captioned", data_dir=str(tmp_path / "tfrecord")).info.file_format.value == "tfrecord"
  with pytest.raises(SystemExit):
    cli.main(base + ["--data-dir", str(tmp_path / "x"), "--file-format", "parquet"])
  assert "invalid choice: 'parquet'" in capsys.readouterr().err


def make_images(root, n=30):
  root.mkdir()
  rng = np.random.default_rng(0)
  for i in range(n):
    h, w = 32 + i % 5, 40 + 3 * (i % 4)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    (root / f"img{i:02d}.txt").write_text(f"image number {i}")
  return root


def test_image_folder_builds_match_across_formats(tmp_path):
  images = make_images(tmp_path / "images")
  kw = {"min_size": 16, "max_size": 64, "val_fraction": 0.3}
  rep_t = image_folder.build_image_folder(images, tmp_path / "t", file_format="tfrecord", **kw)
  rep_a = image_folder.build_image_folder(images, tmp_path / "a", **kw)
  assert (rep_t["file_format"], rep_a["file_format"]) == ("tfrecord", "array_record")
  assert "array_record" in image_folder.format_report(rep_a)
  bt, ba = (tfds.builder("image_folder", data_dir=str(tmp_path / d)) for d in "ta")
  assert (bt.info.file_format.value, ba.info.file_format.value) == ("tfrecord", "array_record")
  assert rep_t["examples"] == rep_a["examples"] and min(rep_a["examples"].values()) > 0

  def records(builder):
    return {s: list(pipeline.RecordSource(builder, s).read(np.arange(builder.info.splits[s].num_examples)))
            for s in builder.info.splits}

  want = records(bt)
  assert records(ba) == want  # byte for byte, same order
  for split in want:  # decoded by TFDS's own readers: the files the build recorded, in TFDS's order
    files_t = [e["file"] for e in bt.as_dataset(split=split).as_numpy_iterator()]
    files_a = [ba.as_data_source(split=split)[k]["file"] for k in range(len(files_t))]
    assert files_t == files_a and len(files_t) == rep_a["examples"][split]
    assert files_t != sorted(files_t) or len(files_t) < 3  # TFDS's order, not the scan's
  # A TFRecord build is reused as it is; --overwrite rebuilds it in the requested format.
  again = image_folder.build_image_folder(images, tmp_path / "t", **kw)
  assert again["file_format"] == "tfrecord"
  rebuilt = image_folder.build_image_folder(images, tmp_path / "t", overwrite=True, **kw)
  assert rebuilt["file_format"] == "array_record"
  assert records(tfds.builder("image_folder", data_dir=str(tmp_path / "t"))) == want
  saved = json.loads((tmp_path / "t" / "image_folder" / "1.0.0" / image_folder.REPORT_NAME).read_text())
  assert saved["file_format"] == "array_record"
  with pytest.raises(ValueError, match="parquet"):
    image_folder.build_image_folder(images, tmp_path / "p", file_format="parquet", **kw)


def test_open_benchmark_writes_a_readable_tfds_layout(tmp_path):
  """benchmarks/data_open.py at 3,000 examples, in-process: both layouts open with TFDS and read back."""
  from benchmarks import data_open
  records = data_open.serialized_examples(50)
  for fmt in data_open.FORMATS:
    path = data_open.write_dataset(str(tmp_path / fmt), fmt, 3000, records)
    out = data_open.open_once(str(tmp_path / fmt), distinct=50)
    assert (out["file_format"], out["examples"]) == (fmt, 3000) and out["open_s"] > 0
    builder = tfds.builder("image_folder", data_dir=str(tmp_path / fmt))
    assert str(builder.data_dir) == path
    k = 2345
    assert pipeline.RecordSource(builder, "train").read([k])[0] == records[k % 50]
  ar = tfds.builder("image_folder", data_dir=str(tmp_path / "array_record")).as_data_source(split="train")
  assert len(ar) == 3000


def test_host_demand_is_the_plans_bound_per_host():
  """benchmarks/data.py: images/s one host eats = batch / (3 x forward x batch / (peak x chips)) / hosts."""
  from benchmarks import data as data_bench
  # By hand: 1 GFLOP forward, batch 2048, 32 chips at 400 TFLOP/s, 8 hosts:
  # step = 3e9 * 2048 / 1.28e16 = 0.00048 s; 2048 / 0.00048 / 8 = 533,333 images/s per host.
  assert data_bench.images_per_host(1e9, 2048, 400e12, 32, 8) == pytest.approx(533_333.33, rel=1e-6)
  assert data_bench.hosts_per_slice("v5p", (2, 4, 4)) == (8, 4)  # v5p-64: 32 chips, 4 per host
  d = data_bench.host_demand("configs/base.py:variant=tiny", "v5p:2x4x4", 2048)
  from glide_jax import plan
  assert (d["chips"], d["hosts"], d["peak_flops"]) == (32, 8, plan.CHIPS["v5p"].peak_flops)
  assert d["images_per_s_per_host"] == pytest.approx(4 * d["peak_flops"] / (3 * d["forward_flops"]), rel=1e-9)


@pytest.mark.slow
def test_pipeline_benchmark_prints_the_per_host_ratio(tmp_path, capsys):
  """benchmarks/data.py end to end at a tiny size: one pipeline process, its rate, the demand, the ratio."""
  from benchmarks import data as data_bench
  assert data_bench.main(["--data-dir", str(tmp_path), "--train-examples", "128", "--seconds", "1", "--cores", "1",
                          "--pipelines", "64px base", "--batch", "16"]) == 0
  out = capsys.readouterr().out
  summary = json.loads(out.strip().splitlines()[-1])
  (row,) = summary["results"]
  (demand,) = summary["demand"]
  assert row["file_format"] == "array_record" and row["images"] > 0
  assert demand["config"] == "configs/base.py:variant=released" and demand["hosts"] == 8
  assert row["ratio"] == pytest.approx(row["images_per_s"] / demand["images_per_s_per_host"])
  assert "images/s per host process" in out and "ratio" in out


def test_multi_shard_slices_read_the_right_records(tmp_path):
  """Four shards, a slice across them, records in random order: ArrayRecord equals TFRecord."""
  for fmt in ("array_record", "tfrecord"):
    shapes.GlideShapes(config="size32", train_examples=300, validation_examples=8,
                       data_dir=str(tmp_path / fmt)).download_and_prepare(
        file_format=fmt, download_config=tfds.download.DownloadConfig(num_shards=4))
  a, t = (pipeline.RecordSource(tfds.builder(NAME, data_dir=str(tmp_path / fmt)), "train[37:290]")
          for fmt in ("array_record", "tfrecord"))
  assert len(tfds.builder(NAME, data_dir=str(tmp_path / "array_record")).info.splits["train"].file_instructions) == 4
  idx = np.random.default_rng(0).permutation(a.num_examples)
  assert a.num_examples == t.num_examples == 253
  assert list(a.read(idx)) == list(t.read(idx))
  with pytest.raises(IndexError, match="out of range"):
    a.read([253])
