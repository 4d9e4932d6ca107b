"""`image_folder`: a TFDS dataset of a user's captioned images (`glide-jax data build`).

Input: a directory (searched recursively) of images of any size and mode (RGB, grey, RGBA, palette,
CMYK, 16-bit, ...) with captions, either beside each image (`x.jpg` + `x.txt`) or in a mapping file
at the top of the directory: `captions.jsonl` (one {"file": ..., "caption": ...} per line; "file"
may also be "file_name"/"image"/"path", "caption" may be "text") or `captions.csv` (columns
file,caption, with or without that header; one record per line). Mapping entries name files by their
path relative to the directory, or by base name when that is unique; they win over `.txt` files.

Skipped (counted and listed in the build report, never fatal): zero-byte files, files that cannot be
decoded, images whose short side is under `min_size`, and captions that are missing, empty or not
valid UTF-8. Images are converted to 8-bit RGB (alpha composited on white, 16-bit scaled), EXIF
rotation applied, and scaled down so the short side is at most `max_size`. The split is a stable
hash of the relative path: sha256 < val_fraction -> validation, else train.

The build is a pure function of the directory's contents: TFDS writes into a temporary directory
and renames it only when complete, so an interrupted build leaves nothing under the final name, and
rerunning gives the same dataset. The report goes to `<dataset dir>/build_report.json`. The records
are ArrayRecord by default (random access with no pass over the records when a run opens them) or
TFRecord (`file_format='tfrecord'`); both hold the same serialized examples in the same order.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import pathlib
from concurrent import futures
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SKIP_REASONS = ("empty_file", "undecodable", "too_small", "missing_caption", "empty_caption",
                "caption_not_utf8")
_FILE_KEYS = ("file", "file_name", "filename", "image", "path")
_CAPTION_KEYS = ("caption", "text")
REPORT_NAME = "build_report.json"


@dataclasses.dataclass
class Candidate:
  rel: str  # posix path relative to the images directory
  path: str
  caption: str | None = None
  problem: str | None = None  # a SKIP_REASONS entry once known


def split_of(rel: str, val_fraction: float) -> str:
  """'validation' or 'train', from a stable hash of the relative path."""
  h = int.from_bytes(hashlib.sha256(rel.encode("utf-8")).digest()[:8], "big") / 2.0 ** 64
  return "validation" if h < val_fraction else "train"


def _decode_caption(raw: bytes) -> tuple[str | None, str | None]:
  try:
    text = raw.decode("utf-8-sig")
  except UnicodeDecodeError:
    return None, "caption_not_utf8"
  text = " ".join(text.split())  # one line, single spaces
  return (text, None) if text else (None, "empty_caption")


def _read_mapping(root: pathlib.Path) -> dict[str, tuple[str | None, str | None]]:
  """captions.jsonl / captions.csv -> {file name: (caption, problem)}."""
  mapping: dict[str, tuple[str | None, str | None]] = {}
  jsonl, csv_file = root / "captions.jsonl", root / "captions.csv"
  if jsonl.is_file():
    for n, raw in enumerate(jsonl.read_bytes().splitlines()):
      if not raw.strip():
        continue
      text, problem = (raw.decode("utf-8"), None) if _is_utf8(raw) else (raw.decode("latin-1"), "caption_not_utf8")
      try:
        record = json.loads(text)
      except json.JSONDecodeError as e:
        raise ValueError(f"{jsonl}:{n + 1}: not valid JSON: {e}") from None
      name = next((record[k] for k in _FILE_KEYS if k in record), None)
      if name is None:
        raise ValueError(f"{jsonl}:{n + 1}: no file key (one of {_FILE_KEYS})")
      caption = next((record[k] for k in _CAPTION_KEYS if k in record), None)
      if problem:
        mapping[str(name)] = (None, problem)
      elif caption is None:
        mapping[str(name)] = (None, "missing_caption")
      else:
        mapping[str(name)] = _decode_caption(str(caption).encode("utf-8"))
  if csv_file.is_file():
    for n, raw in enumerate(csv_file.read_bytes().splitlines()):
      if not raw.strip():
        continue
      ok = _is_utf8(raw)
      row = next(csv.reader([raw.decode("utf-8-sig" if ok else "latin-1")]))
      if n == 0 and [c.strip().lower() for c in row[:2]] in (["file", "caption"], ["file_name", "caption"],
                                                            ["image", "caption"], ["file", "text"]):
        continue
      if not row:
        continue
      name = row[0].strip()
      if not ok:
        mapping[name] = (None, "caption_not_utf8")
      elif len(row) < 2:
        mapping[name] = (None, "missing_caption")
      else:
        mapping[name] = _decode_caption(",".join(row[1:]).encode("utf-8"))
  return mapping


def _is_utf8(raw: bytes) -> bool:
  try:
    raw.decode("utf-8")
    return True
  except UnicodeDecodeError:
    return False


def scan(images_dir: str | os.PathLike) -> list[Candidate]:
  """Every image file under images_dir (sorted) with its caption or caption problem."""
  root = pathlib.Path(images_dir).expanduser()
  if not root.exists():
    raise FileNotFoundError(f"image directory {root} does not exist")
  if not root.is_dir():
    raise NotADirectoryError(f"{root} is not a directory")
  mapping = _read_mapping(root)
  files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
  base_count: dict[str, int] = {}
  for p in files:
    base_count[p.name] = base_count.get(p.name, 0) + 1
  out = []
  for p in files:
    rel = p.relative_to(root).as_posix()
    c = Candidate(rel=rel, path=str(p))
    entry = mapping.get(rel)
    if entry is None and base_count[p.name] == 1:
      entry = mapping.get(p.name)
    if entry is None:
      sidecar = p.with_suffix(".txt")
      entry = _decode_caption(sidecar.read_bytes()) if sidecar.is_file() else (None, "missing_caption")
    c.caption, c.problem = entry
    out.append(c)
  return out


def to_rgb(img) -> np.ndarray:
  """A PIL image of any mode -> uint8 [H, W, 3] (alpha on white, 16-bit scaled to 8)."""
  from PIL import Image

  mode = img.mode
  if mode.startswith("I;16") or mode == "I":
    a = np.asarray(img).astype(np.float64)
    if mode.startswith("I;16") or a.max(initial=0) > 255:
      a = a / 257.0  # 65535 -> 255
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  if mode == "F":
    a = np.asarray(img).astype(np.float64)
    a = a * 255.0 if a.max(initial=0) <= 1.0 else a
    g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=-1)
  has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
  if has_alpha:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"))
  return np.asarray(img.convert("RGB"))


def load_image(path: str | bytes, min_size: int, max_size: int) -> tuple[np.ndarray | None, str | None]:
  """(uint8 [H, W, 3], None) or (None, skip reason); `path` may also be the file's bytes (a tar
  member: webdataset.py)."""
  from PIL import Image, ImageOps

  if (len(path) if isinstance(path, bytes) else os.path.getsize(path)) == 0:
    return None, "empty_file"
  try:
    with Image.open(io.BytesIO(path) if isinstance(path, bytes) else path) as img:
      img.load()
      img = ImageOps.exif_transpose(img) or img
      if min(img.size) < min_size:
        return None, "too_small"
      rgb = to_rgb(img)
  except Exception:  # noqa: BLE001  (any decoder failure means "cannot be decoded")
    return None, "undecodable"
  h, w = rgb.shape[:2]
  if max_size and min(h, w) > max_size:
    scale = max_size / min(h, w)
    size = (max(max_size, round(w * scale)), max(max_size, round(h * scale)))
    rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.LANCZOS))
  return rgb, None


class ImageFolder(tfds.core.GeneratorBasedBuilder):
  """A user's captioned images; build with `glide-jax data build --images DIR --out DATA_DIR`."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}

  def __init__(self, *, images_dir: str | None = None, min_size: int = 64, max_size: int = 512,
               val_fraction: float = 0.05, image_format: str = "png", workers: int = 4, **kwargs):
    self.images_dir = images_dir
    self.min_size, self.max_size, self.val_fraction = int(min_size), int(max_size), float(val_fraction)
    self.image_format = image_format
    self.workers = workers
    self.report: dict[str, Any] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                         encoding_format=self.image_format),
            "caption": tfds.features.Text(),
            "file": tfds.features.Text(),
        }),
        supervised_keys=("image", "caption"),
        description="Captioned images from a local directory (glide-jax data build).",
    )

  def _check(self, c: Candidate) -> Candidate:
    if c.problem is None:
      _, c.problem = load_image(c.path, self.min_size, self.max_size)
    return c

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    if not self.images_dir:
      raise ValueError("image_folder needs images_dir to build (glide-jax data build --images DIR)")
    candidates = scan(self.images_dir)
    # Decode everything once up front, so empty splits and skips are known before writing.
    with futures.ThreadPoolExecutor(self.workers) as pool:
      checked = list(pool.map(self._check, candidates))
    good = [c for c in checked if c.problem is None]
    skipped = {r: sorted(c.rel for c in checked if c.problem == r) for r in SKIP_REASONS}
    splits = {"train": [], "validation": []}
    for c in good:
      splits[split_of(c.rel, self.val_fraction)].append(c)
    self.report = {
        "images_dir": str(pathlib.Path(self.images_dir).expanduser().resolve()),
        "image_files": len(checked), "kept": len(good),
        "examples": {k: len(v) for k, v in splits.items()},
        "skipped_counts": {r: len(v) for r, v in skipped.items()},
        "skipped": skipped,
        "min_size": self.min_size, "max_size": self.max_size, "val_fraction": self.val_fraction,
    }
    if not good:
      raise ValueError(f"no usable captioned images in {self.images_dir}: "
                       f"{sum(len(v) for v in skipped.values())} skipped {self.report['skipped_counts']}")
    return {name: self._generate_examples(items) for name, items in splits.items() if items}

  def _generate_examples(self, items: list[Candidate]):
    for c in items:
      image, problem = load_image(c.path, self.min_size, self.max_size)
      if problem:  # changed since the scan: fail loudly rather than write a different dataset
        raise RuntimeError(f"{c.path} changed during the build ({problem})")
      yield c.rel, {"image": self._encode(image), "caption": c.caption, "file": c.rel}

  def _encode(self, image: np.ndarray) -> bytes:
    """PNG (lossless) or JPEG (quality 95) bytes, with PIL (much faster than TFDS's TF encode)."""
    from PIL import Image

    buf = io.BytesIO()
    if self.image_format == "jpeg":
      Image.fromarray(image).save(buf, format="JPEG", quality=95)
    else:
      Image.fromarray(image).save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def build_image_folder(images_dir: str | os.PathLike, data_dir: str | os.PathLike, *,
                       min_size: int = 64, max_size: int = 512, val_fraction: float = 0.05,
                       image_format: str = "png", overwrite: bool = False,
                       file_format: str | None = None) -> dict[str, Any]:
  """Builds (or reuses) the image_folder dataset in data_dir; returns and writes the report.

  file_format: 'array_record' (default, `formats.DEFAULT_FILE_FORMAT`: opened with no pass over
  the records) or 'tfrecord'. A finished build is reused in whatever format it has; the report
  says which.
  """
  from glide_jax.data import formats

  file_format = file_format or formats.DEFAULT_FILE_FORMAT
  if file_format not in formats.FILE_FORMATS:
    raise ValueError(f"file format {file_format!r} is not one of {', '.join(formats.FILE_FORMATS)}")
  root = pathlib.Path(images_dir).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"image directory {root} does not exist" if not root.exists()
                            else f"{root} is not a directory")
  kwargs = {"images_dir": str(root), "min_size": min_size, "max_size": max_size, "val_fraction": val_fraction,
            "image_format": image_format, "data_dir": os.fspath(pathlib.Path(data_dir).expanduser())}
  builder = ImageFolder(**kwargs)
  report_path = pathlib.Path(builder.data_dir) / REPORT_NAME
  if builder.is_prepared() and not overwrite:
    if report_path.is_file():
      report = json.loads(report_path.read_text())
      if report.get("images_dir") != str(root.resolve()):
        raise FileExistsError(f"{builder.data_dir} already holds an image_folder built from "
                              f"{report.get('images_dir')}; use another --out or --overwrite")
      report.setdefault("file_format", builder.info.file_format.value)
      return report
    overwrite = True  # prepared without a report (not by this function): rebuild to get one
  if builder.is_prepared():
    # TFDS cannot change the format of a dataset whose info it has read (and deletes the old data
    # before saying so): remove the old build here, then prepare a fresh builder.
    tfds.core.Path(builder.data_dir).rmtree()
    builder = ImageFolder(**kwargs)
  builder.download_and_prepare(file_format=file_format)
  report = dict(builder.report)
  report["dataset_dir"] = str(builder.data_dir)
  report["file_format"] = builder.info.file_format.value
  tmp = report_path.with_suffix(".tmp")
  tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
  os.replace(tmp, report_path)
  return report


def format_report(report: dict[str, Any], max_files: int = 20) -> str:
  ex = report["examples"]
  fmt = f"; {report['file_format']}" if report.get("file_format") else ""
  lines = [(f"image_folder: {report['kept']} of {report['image_files']} images kept "
            f"(train {ex.get('train', 0)}, validation {ex.get('validation', 0)}{fmt})")]
  for reason, files in report["skipped"].items():
    if files:
      shown = ", ".join(files[:max_files]) + (" ..." if len(files) > max_files else "")
      lines.append(f"  skipped {len(files)} {reason}: {shown}")
  return "\n".join(lines)

