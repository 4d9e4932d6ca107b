"""FID between two image sets (or an image set and stored reference statistics).

FID is always reported with its sample counts and the name of its reference set: numbers from
different sample counts or references are not comparable (FID is biased upward at small N).
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from glide_jax.eval import frechet, inception

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

ImagesOrPath = np.ndarray | str | os.PathLike


def load_image_dir(path: str | os.PathLike, limit: int | None = None) -> np.ndarray:
  """All images of a directory (sorted by name), as uint8 [N, H, W, 3]; they must share one size."""
  from PIL import Image

  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"image directory {path} does not exist")
  files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  if limit is not None:
    files = files[:limit]
  if not files:
    raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
  images = []
  for f in files:
    with Image.open(f) as im:
      arr = np.asarray(im.convert("RGB"))
    if images and arr.shape != images[0].shape:
      raise ValueError(f"{f} is {arr.shape[:2]}, but {files[0].name} is {images[0].shape[:2]}; "
                       "resize the set to one size first")
    images.append(arr)
  return np.stack(images)


def load_samples(path: str | os.PathLike) -> tuple[np.ndarray, list[str] | None]:
  """A samples directory -> (uint8 [N, H, W, 3], prompts or None).

  A directory written by `glide-jax sample` holds `prompts.json` ({file name: prompt}) next to its
  samples and a grid: exactly the files it names are read, in file-name order, with their prompts.
  Any other directory: every image in it, in file-name order, and no prompts.
  """
  import json

  from PIL import Image

  path = pathlib.Path(path)
  index = path / "prompts.json"
  if not index.is_file():
    return load_image_dir(path), None
  mapping = json.loads(index.read_text())
  if not isinstance(mapping, dict):
    raise TypeError(f"{index}: expected {{file name: prompt}}")
  names = sorted(mapping)
  images = []
  for name in names:
    if not (path / name).is_file():
      raise FileNotFoundError(f"{index} names {name}, which is not in {path}")
    with Image.open(path / name) as im:
      images.append(np.asarray(im.convert("RGB")))
  if len({im.shape for im in images}) > 1:
    raise ValueError(f"{path}: the samples named in prompts.json differ in size")
  return np.stack(images), [str(mapping[n]) for n in names]


def _as_images(x: ImagesOrPath, name: str) -> tuple[np.ndarray, str]:
  if isinstance(x, (str, os.PathLike)):
    return load_image_dir(x), os.fspath(x)
  arr = np.asarray(x)
  if arr.ndim != 4 or arr.shape[-1] != 3:
    raise ValueError(f"{name}: expected images [N, H, W, 3], got shape {arr.shape}")
  return arr, name


def inception_statistics(images: np.ndarray, feature_fn, batch_size: int = 50
                         ) -> tuple[np.ndarray, np.ndarray, int]:
  """uint8 images [N, H, W, 3] -> (mu [2048], sigma [2048, 2048], N) of FID Inception pool3 features."""
  return frechet.statistics_of(inception.batched_features(feature_fn, images, batch_size),
                               inception.FEATURE_DIM)


def inception_features(images: np.ndarray, feature_fn, batch_size: int = 50) -> np.ndarray:
  """uint8 images [N, H, W, 3] -> pool3 features [N, 2048] float32 (kept, for precision/recall)."""
  return np.concatenate([f.astype(np.float32) for f in
                         inception.batched_features(feature_fn, images, batch_size)])


def compute_fid(images_a: ImagesOrPath, images_b: ImagesOrPath, weights_path: str | os.PathLike,
                batch_size: int = 50, reference: str | None = None,
                params: Mapping[str, Any] | None = None, resize: bool = True,
                precision_recall_k: int | None = None) -> dict[str, Any]:
  """FID between `images_a` (e.g. samples) and `images_b` (the reference set).

  images_a: uint8 [N, H, W, 3] or a directory of images. images_b: the same, or an `.npz` of
  reference statistics written by `frechet.save_statistics` (whose stored name and N are used).
  weights_path: the FID Inception weights (see `inception.load_fid_inception_weights`).
  `params` skips reading the file (already loaded); `resize=False` is for tests only.
  `precision_recall_k`: also improved precision/recall with this k (needs reference images).
  Returns {'fid', 'n_a', 'n_b', 'reference', 'features'} (+ 'precision', 'recall', 'pr_k').
  """
  if params is None:
    params = inception.load_fid_inception_weights(weights_path)
  feature_fn = inception.make_feature_fn(params, resize=resize)
  a, _ = _as_images(images_a, "images_a")
  b_is_stats = isinstance(images_b, (str, os.PathLike)) and os.fspath(images_b).endswith(".npz")
  if precision_recall_k and b_is_stats:
    raise ValueError(f"precision/recall needs reference images, not stored statistics ({images_b})")
  feats_a = feats_b = None
  if precision_recall_k:
    feats_a = inception_features(a, feature_fn, batch_size)
    (mu_a, sigma_a), n_a = frechet.feature_statistics(feats_a), len(feats_a)
  else:
    mu_a, sigma_a, n_a = inception_statistics(a, feature_fn, batch_size)
  if b_is_stats:
    mu_b, sigma_b, n_b, ref_name = frechet.load_statistics(images_b)
  else:
    b, ref_name = _as_images(images_b, "images_b")
    if precision_recall_k:
      feats_b = inception_features(b, feature_fn, batch_size)
      (mu_b, sigma_b), n_b = frechet.feature_statistics(feats_b), len(feats_b)
    else:
      mu_b, sigma_b, n_b = inception_statistics(b, feature_fn, batch_size)
  # With N <= 2048 the covariances are rank-deficient (and FID strongly biased): offset at once.
  rank_deficient = min(n_a, n_b) <= inception.FEATURE_DIM
  value = frechet.frechet_distance(mu_a, sigma_a, mu_b, sigma_b, singular=rank_deficient)
  result = {"fid": value, "n_a": int(n_a), "n_b": int(n_b), "reference": reference or ref_name,
            "features": "FID Inception-v3 pool3 (2048-d), pt_inception-2015-12-05"}
  if precision_recall_k:
    from glide_jax.eval.precision_recall import precision_recall
    pr = precision_recall(feats_b, feats_a, k=precision_recall_k)
    result.update(precision=pr["precision"], recall=pr["recall"], pr_k=int(precision_recall_k))
  return result


def format_fid(result: Mapping[str, Any]) -> str:
  """'FID 12.34 (5000 samples vs 10000 reference images of <reference>; ...)': never a bare number."""
  text = (f"FID {result['fid']:.3f} ({result['n_a']} samples vs {result['n_b']} reference images "
          f"of {result['reference']}; {result.get('features', 'FID Inception-v3 pool3')})")
  if "precision" in result:
    text += (f"; precision {result['precision']:.3f}, recall {result['recall']:.3f} "
             f"(k={result['pr_k']} nearest neighbours, same features)")
  return text
