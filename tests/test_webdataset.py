"""WebDataset import (`glide-jax data build --webdataset`): every skip rule on hand-made broken
samples, pixels against the source arrays and against image_folder's build of the same files, an
interrupted conversion resumed to the uninterrupted result, two parts forming one dataset, a
training batch from it, and one-line errors for bad patterns."""
import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from glide_jax import cli
from glide_jax.data import image_folder, pipeline, webdataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = {"min_size": 32, "max_size": 100, "val_fraction": 0.3}
FLAGS = ["--min-size", "32", "--max-size", "100", "--val-fraction", "0.3"]
RNG = np.random.default_rng(0)


def encode(array, fmt="PNG", **kw):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format=fmt, **kw)
  return buf.getvalue()


def noise(h, w, c=3):
  return RNG.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)


# Sources of the good samples: key -> (image extension, array, caption), and how each caption is
# stored in the tar ('txt', 'json', or 'both': the .txt wins over the .json).
GOOD_ARRAYS = {
    "a0": ("png", noise(40, 48), "a noisy picture", "txt"),
    "a1": ("jpg", noise(50, 60), "a jpeg from the json", "json"),
    "a2": ("png", noise(200, 300), "a large picture", "txt"),  # scaled to 100 x 150
    "b0": ("png", noise(36, 44), "from the json field", "json"),
    "b1": ("png", noise(40, 40, 1), "a grey picture", "txt"),
    "sub/b2": ("png", noise(33, 35), "in a sub directory", "txt"),
    "b3": ("webp", noise(48, 32), "the text file wins", "both"),
    **{f"c{i}": ("png", noise(34 + i, 40), f"picture number {i}", "txt") for i in range(8)},
}
BROKEN = {  # reason -> the "tar:key" entries the report must list
    "empty_file": ["00000.tar:z1"],
    "undecodable": ["00000.tar:z0"],
    "too_small": ["00000.tar:z2"],
    "missing_caption": ["00000.tar:z3"],
    "empty_caption": ["00000.tar:z4"],
    "caption_not_utf8": ["00001.tar:y0"],
    "missing_image": ["00001.tar:y3"],
    "caption_json_invalid": ["00001.tar:y2"],
    "caption_field_missing": ["00001.tar:y1"],
    "duplicate_key": ["00001.tar:b0"],
}


def members_of(key):
  ext, array, caption, how = GOOD_ARRAYS[key]
  image = encode(array, {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}[ext],
                 **({"quality": 90} if ext == "jpg" else {"lossless": True} if ext == "webp" else {}))
  out = [(f"{key}.{ext}", image)]
  if how in ("txt", "both"):
    out.append((f"{key}.txt", caption.encode()))
  if how in ("json", "both"):
    out.append((f"{key}.json", json.dumps({"caption": caption if how == "json" else "the json loses",
                                           "url": "http://x"}).encode()))
  return out


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def make_corpus(root):
  """Three tars: 00000 and 00001 hold the broken samples among good ones, 00002 only good ones."""
  root.mkdir(parents=True, exist_ok=True)
  txt = lambda k, s: (f"{k}.txt", s)
  ok = encode(noise(40, 40))
  tar0 = members_of("a0") + [("z0.jpg", b"\xff\xd8\xff\xe0 not a jpeg at all" * 4), txt("z0", b"garbage")]
  tar0 += members_of("a1") + [("z1.jpg", b""), txt("z1", b"zero bytes")]
  tar0 += [("z2.png", encode(noise(10, 40))), txt("z2", b"too small"), ("z3.png", ok)]
  tar0 += [("z4.png", ok), txt("z4", b"  \n\t ")] + members_of("a2")
  tar0 += [("README", b"no dot: not a sample"), (".hidden.txt", b"ignored as webdataset does")]
  tar1 = members_of("b0") + [("y0.png", ok), txt("y0", b"caf\xe9 \xff")] + members_of("b1")
  tar1 += [("y1.png", ok), ("y1.json", b'{"url": "http://x", "text": "not the field"}')]
  tar1 += [("y2.png", ok), ("y2.json", b'{"caption": "unterminated')] + members_of("sub/b2")
  tar1 += [txt("y3", b"a caption without an image")] + members_of("b3") + members_of("b0")
  tar2 = [m for i in range(8) for m in members_of(f"c{i}")]
  for i, members in enumerate((tar0, tar1, tar2)):
    write_tar(root / f"{i:05d}.tar", members)
  return str(root / "{00000..00002}.tar")


def expected_image(key):
  """The stored pixels, from the source array: RGB (grey repeated), short side scaled to 100."""
  _, array, _, _ = GOOD_ARRAYS[key]
  rgb = np.repeat(array[..., None], 3, -1) if array.ndim == 2 else array
  return None if min(rgb.shape[:2]) > 100 else rgb


def read(data_dir):
  """{split: {file: (caption, image)}} and the record count, through TFDS's own reader."""
  builder = tfds.builder("image_folder", data_dir=str(data_dir))
  out, count = {}, 0
  for split in builder.info.splits:
    rows = list(builder.as_data_source(split=split))
    count += len(rows)
    out[split] = {e["file"].decode(): (e["caption"].decode(), e["image"]) for e in rows}
  return out, count


def shard_files(data_dir):
  """{file name: bytes} of the dataset's record files, and its dataset_info.json splits."""
  d = os.path.join(str(data_dir), "image_folder", "1.0.0")
  files = {f: pathlib.Path(d, f).read_bytes() for f in sorted(os.listdir(d)) if ".array_record-" in f}
  return files, json.loads(pathlib.Path(d, "dataset_info.json").read_text())["splits"]


# Converts with load_image killing its own process (SIGKILL) on its third call.
KILLED_MID_TAR = """
import os, signal, sys
from glide_jax.data import image_folder, webdataset
real, calls = image_folder.load_image, []
def load_image(*a, **kw):
  calls.append(1)
  if len(calls) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*a, **kw)
image_folder.load_image = load_image
webdataset.build_webdataset(sys.argv[1], sys.argv[2], workers=1, min_size=32, max_size=100, val_fraction=0.3)
"""


def run_cli(argv):
  try:
    return cli.main(argv)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return make_corpus(tmp_path_factory.mktemp("wds"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
  """One uninterrupted conversion in this process."""
  out = tmp_path_factory.mktemp("reference")
  result = webdataset.build_webdataset(corpus, out, workers=1, **SETTINGS)
  return out, result


def test_skip_rules_captions_and_pixels(corpus, reference, tmp_path):
  out, result = reference
  report = result["dataset"]
  assert report["skipped"] == {r: BROKEN.get(r, []) for r in webdataset.SKIP_REASONS}
  assert report["skipped_counts"] == {r: len(BROKEN.get(r, [])) for r in webdataset.SKIP_REASONS}
  assert report["kept"] == len(GOOD_ARRAYS) and report["input_shards"] == 3
  assert report["samples"] == len(GOOD_ARRAYS) + sum(map(len, BROKEN.values()))
  saved = json.loads((out / "image_folder" / "1.0.0" / image_folder.REPORT_NAME).read_text())
  assert saved["skipped"] == report["skipped"] and saved["examples"] == report["examples"]
  text = webdataset.format_report(result)
  assert "skipped 1 duplicate_key: 00001.tar:b0" in text and "dataset complete: 15 of 25 samples" in text

  data, count = read(out)
  examples = {k: v for split in data.values() for k, v in split.items()}
  assert count == len(examples) == len(GOOD_ARRAYS)
  assert {k: c for k, (c, _) in examples.items()} == {k: v[2] for k, v in GOOD_ARRAYS.items()}
  for split, rows in data.items():  # the split is image_folder's stable hash of the key
    assert all(image_folder.split_of(k, 0.3) == split for k in rows)
  assert set(data) == {"train", "validation"} and len(data["validation"]) >= 2
  for key, (_, image) in examples.items():
    want = expected_image(key)
    if want is not None and GOOD_ARRAYS[key][0] != "jpg":  # lossless sources: exact pixels
      np.testing.assert_array_equal(image, want, err_msg=key)
  assert examples["a2"][1].shape == (100, 150, 3)

  # Independently: image_folder's build of the same files as a folder gives the same examples.
  folder = tmp_path / "folder"
  for key, (ext, _, caption, _) in GOOD_ARRAYS.items():
    path = folder / f"{key}.{ext}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(members_of(key)[0][1])
    path.with_suffix(".txt").write_text(caption)
  image_folder.build_image_folder(folder, tmp_path / "if", **SETTINGS)
  theirs, _ = read(tmp_path / "if")
  by_key = {rel.rsplit(".", 1)[0]: v for split in theirs.values() for rel, v in split.items()}
  assert set(by_key) == set(examples)
  for key, (caption, image) in by_key.items():
    assert examples[key][0] == caption
    np.testing.assert_array_equal(examples[key][1], image, err_msg=key)


def test_interrupted_conversion_resumes_to_the_same_dataset(corpus, reference, tmp_path, monkeypatch):
  src = os.path.dirname(corpus)
  inputs = tmp_path / "in"
  shutil.copytree(src, inputs)
  pattern = str(inputs / "{00000..00002}.tar")
  whole = (inputs / "00001.tar").read_bytes()
  (inputs / "00001.tar").write_bytes(whole[:len(whole) // 2])  # cut mid-member
  out = tmp_path / "out"
  version = out / "image_folder" / "1.0.0"

  def no_output_of_tar_1():
    assert not [f for f in os.listdir(version) if "-00001-of-" in f]
    assert os.listdir(version / "webdataset" / "tmp") == []
    assert not (version / "dataset_info.json").exists()
    assert not tfds.builder("image_folder", data_dir=str(out)).is_prepared()

  with pytest.raises(ValueError, match=r"1 of 3 input tars failed, first .*00001\.tar: ReadError"):
    webdataset.build_webdataset(pattern, out, workers=1, **SETTINGS)
  no_output_of_tar_1()
  done = sorted(os.listdir(version / "webdataset" / "done"))
  assert done == ["00000.json", "00002.json"]
  finished = {f: os.stat(version / f) for f in os.listdir(version) if ".array_record-" in f}
  assert finished and all("-00001-of-" not in f for f in finished)

  # Ctrl-C in the middle of the (now whole) tar 1: still nothing of it under its final names.
  (inputs / "00001.tar").write_bytes(whole)
  calls = []
  real = image_folder.load_image

  def interrupted(*a, **kw):
    calls.append(1)
    if len(calls) == 3:
      raise KeyboardInterrupt
    return real(*a, **kw)

  monkeypatch.setattr(image_folder, "load_image", interrupted)
  with pytest.raises(KeyboardInterrupt):
    webdataset.build_webdataset(pattern, out, workers=1, **SETTINGS)
  no_output_of_tar_1()
  monkeypatch.setattr(image_folder, "load_image", real)

  # SIGKILL in the middle of tar 1 (no cleanup runs): its records so far lie in a temporary file only.
  killed = subprocess.run([sys.executable, "-c", KILLED_MID_TAR, pattern, str(out)], cwd=ROOT, check=False,
                          capture_output=True, text=True, timeout=300)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert [f for f in os.listdir(version / "webdataset" / "tmp") if "-00001-of-" in f]
  assert not [f for f in os.listdir(version) if "-00001-of-" in f]
  assert not (version / "dataset_info.json").exists()

  result = webdataset.build_webdataset(pattern, out, workers=1, **SETTINGS)
  assert os.listdir(version / "webdataset" / "tmp") == []  # the killed run's temporary file is gone
  assert result["part"]["converted"] == [1] and result["part"]["reused"] == [0, 2]
  for f, st in finished.items():  # the finished tars' shards were not written again
    now = os.stat(version / f)
    assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), f
  assert shard_files(out) == shard_files(reference[0])
  assert result["dataset"]["skipped"] == reference[1]["dataset"]["skipped"]


def test_two_parts_form_one_dataset(corpus, reference, tmp_path, capsys):
  out = tmp_path / "out"
  base = ["data", "build", "--webdataset", corpus, "--out", str(out), *FLAGS]
  # Part 0 (tars 0 and 2) in two spawned worker processes.
  assert run_cli(base + ["--shard-index", "0", "--num-shards", "2", "--workers", "2"]) == 0
  printed = capsys.readouterr().out
  assert "part 0 of 2: 2 tars (2 converted now" in printed and "1 tars of other parts" in printed
  assert not tfds.builder("image_folder", data_dir=str(out)).is_prepared()
  part0_only = tmp_path / "merged"
  shutil.copytree(out, part0_only)
  assert run_cli(base + ["--finalize"]) == 2
  assert "1 tars not converted yet, first" in capsys.readouterr().err
  assert run_cli(base + ["--shard-index", "1", "--num-shards", "2", "--workers", "1"]) == 0
  assert "dataset complete: 15 of 25 samples from 3 tars" in capsys.readouterr().out

  data, count = read(out)
  keys = [k for split in data.values() for k in split]
  assert count == len(keys) == len(set(keys))  # every good key exactly once, in one split
  assert set(keys) == set(GOOD_ARRAYS)
  assert shard_files(out) == shard_files(reference[0])  # the same files as one conversion
  manifests = sorted(f for f in os.listdir(out / "image_folder" / "1.0.0" / "webdataset") if f.startswith("part-"))
  assert manifests == ["part-00000-of-00002.json", "part-00001-of-00002.json"]

  # Part 1 converted into a directory of its own (a machine's local disk), then its shard files and
  # done markers copied beside part 0's: --finalize there gives the same dataset.
  alone = tmp_path / "alone"
  webdataset.build_webdataset(corpus, alone, workers=1, shard_index=1, num_shards=2, **SETTINGS)
  src, dst = alone / "image_folder" / "1.0.0", part0_only / "image_folder" / "1.0.0"
  for f in os.listdir(src):
    if ".array_record-" in f:
      shutil.copy(src / f, dst / f)
  for f in os.listdir(src / "webdataset" / "done"):
    shutil.copy(src / "webdataset" / "done" / f, dst / "webdataset" / "done" / f)
  os.rename(os.path.dirname(corpus), os.path.dirname(corpus) + ".away")  # --finalize needs no tar
  try:  # nor the options: they come from plan.json
    assert run_cli(["data", "build", "--webdataset", corpus, "--out", str(part0_only), "--finalize"]) == 0
  finally:
    os.rename(os.path.dirname(corpus) + ".away", os.path.dirname(corpus))
  assert shard_files(part0_only) == shard_files(reference[0])

  # A finalize that did not happen (both parts died after their last tar): --finalize writes it.
  for name in ("dataset_info.json", "features.json"):
    os.remove(out / "image_folder" / "1.0.0" / name)
  assert not tfds.builder("image_folder", data_dir=str(out)).is_prepared()
  assert run_cli(base + ["--finalize"]) == 0
  assert shard_files(out) == shard_files(reference[0])


def test_the_converted_dataset_trains(reference):
  cfg = {"name": "image_folder", "data_dir": str(reference[0]), "split": "train",
         "tokenizer": {"type": "words", "text_ctx": 8}}
  it = pipeline.make_train_iterator(cfg, "base", 4, 32, seed=0, process_index=0, process_count=1)
  batch = next(it)
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0 and batch["image"].std() > 0.1
  assert batch["tokens"].shape == (4, 8) and batch["tokens"].dtype == np.int32
  assert batch["mask"].shape == (4, 8) and batch["mask"].dtype == bool and batch["mask"].any(1).all()


def test_bad_patterns_and_options_are_one_line(corpus, tmp_path, capsys):
  d = os.path.dirname(corpus)
  out = str(tmp_path / "out")
  cases = [
      ([os.path.join(d, "{00000..00002.tar")], "unbalanced braces"),
      ([os.path.join(d, "{00000..00004}.tar")], f"2 of 5 tar files do not exist, first {d}/00003.tar"),
      ([d], "is a directory; name the tars"),
      ([corpus, "--shard-index", "2", "--num-shards", "2"], "--shard-index 2 --num-shards 2"),
      ([corpus, "--file-format", "tfrecord"], "--webdataset writes array_record only"),
  ]
  for args, says in cases:
    assert run_cli(["data", "build", "--out", out, "--webdataset", *args]) == 2, args
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("glide-jax data build: ") and says in err, err
  assert run_cli(["data", "build", "--out", out, "--webdataset", corpus, *FLAGS, "--workers", "1"]) == 0
  capsys.readouterr()
  assert run_cli(["data", "build", "--out", out, "--webdataset", corpus, "--min-size", "32",
                  "--max-size", "100", "--val-fraction", "0.1"]) == 2
  err = capsys.readouterr().err.strip()
  assert "with val_fraction=0.3, not 0.1" in err and len(err.splitlines()) == 1, err


def test_benchmark_converts_what_it_wrote(capsys):
  from benchmarks import webdataset as bench

  assert bench.main(["--tars", "2", "--samples-per-tar", "3", "--size", "40", "--max-size", "32",
                     "--workers", "1"]) == 0
  line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert (line["samples"], line["kept"], line["tars"]) == (6, 6, 2) and line["samples_per_s"] > 0


def test_gzipped_tars_read_the_same(corpus, reference, tmp_path):
  import gzip

  (tmp_path / "in").mkdir()
  raw = pathlib.Path(os.path.dirname(corpus), "00002.tar").read_bytes()
  (tmp_path / "in" / "00002.tar.gz").write_bytes(gzip.compress(raw))
  webdataset.build_webdataset(str(tmp_path / "in" / "00002.tar.gz"), tmp_path / "out", workers=1, **SETTINGS)
  ours, _ = read(tmp_path / "out")
  theirs, _ = read(reference[0])
  got = {(split, k): v for split, rows in ours.items() for k, v in rows.items()}
  want = {(split, k): v for split, rows in theirs.items() for k, v in rows.items() if k.startswith("c")}
  assert got.keys() == want.keys() and len(got) == 8
  for k, (caption, image) in got.items():
    assert caption == want[k][0]
    np.testing.assert_array_equal(image, want[k][1])
