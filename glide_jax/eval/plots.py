"""Pictures a person can look at: sample grids (PNG), sweep plots (PNG), and the same in TensorBoard.

matplotlib runs on the Agg backend (no display); TensorBoard goes through tensorboardX.
"""
from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GOOD = (40, 170, 60)  # frame of a sample whose caption was read back right
BAD = (220, 40, 40)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2, pad_value: int = 255,
               frames: Sequence[bool] | np.ndarray | None = None) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] grid, row-major.

  frames: optional [N] bools; each cell gets a `pad`-wide green (True) or red (False) frame, e.g.
  whether the attribute reader found the sample's caption.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"image_grid expects [N, H, W, 3], got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"image_grid expects uint8 images, got {images.dtype}")
  n, h, w, _ = images.shape
  ncols = ncols or max(1, math.ceil(math.sqrt(n)))
  nrows = math.ceil(n / ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), pad_value, np.uint8)
  if frames is not None and len(frames) != n:
    raise ValueError(f"image_grid: {len(frames)} frames for {n} images")
  for i in range(n):
    r, c = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    if frames is not None and pad > 0:
      grid[y - pad:y + h + pad, x - pad:x + w + pad] = GOOD if frames[i] else BAD
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_grid(path: str | os.PathLike, images: np.ndarray, ncols: int | None = None,
              scale: int = 1, frames: Sequence[bool] | np.ndarray | None = None) -> pathlib.Path:
  """Writes `image_grid(images)` as a PNG, optionally upscaled by `scale` (nearest) for small images."""
  from PIL import Image

  grid = image_grid(images, ncols, frames=frames)
  if scale > 1:
    grid = np.repeat(np.repeat(grid, scale, axis=0), scale, axis=1)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(grid).save(path)
  return path


def plot_sweep(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = "") -> pathlib.Path:
  """The guidance sweep as one PNG: accuracy vs scale, CLIP score vs scale, and accuracy vs CLIP
  score (the Pareto view of GLIDE's figures, each point labelled with its guidance scale).

  rows: dicts with 'guidance_scale', 'n' and optionally 'acc_all', 'acc_colour', ...,
  'clip_score_mean', 'clip_score_std' (as written by sweep.py), and 'ci95' ({attribute or 'all':
  (lo, hi)}, drawn as error bars). Missing metrics leave panels out.
  """
  import matplotlib
  matplotlib.use("Agg", force=True)
  import matplotlib.pyplot as plt

  rows = sorted(rows, key=lambda r: float(r["guidance_scale"]))
  scales = np.array([float(r["guidance_scale"]) for r in rows])
  has_acc = all(r.get("acc_all") is not None for r in rows)
  has_clip = all(r.get("clip_score_mean") is not None for r in rows)
  panels = (["acc"] if has_acc else []) + (["clip"] if has_clip else []) + (
      ["pareto"] if has_acc and has_clip else [])
  if not panels:
    raise ValueError("plot_sweep: rows carry neither accuracy ('acc_all') nor CLIP score "
                     "('clip_score_mean'); nothing to plot")
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  n_text = f"n={rows[0].get('n', '?')} per scale"
  for ax, panel in zip(axes[0], panels):
    if panel == "acc":
      for key, style in (("acc_all", "k-o"), ("acc_colour", "--"), ("acc_shape", "--"),
                         ("acc_size", "--"), ("acc_position", "--")):
        if all(r.get(key) is not None for r in rows):
          y = np.array([float(r[key]) for r in rows])
          name = key.removeprefix("acc_")
          if all(name in (r.get("ci95") or {}) for r in rows):  # 95 % intervals as error bars
            lo = np.array([float(r["ci95"][name][0]) for r in rows])
            hi = np.array([float(r["ci95"][name][1]) for r in rows])
            ax.errorbar(scales, y, yerr=np.maximum(0.0, np.stack([y - lo, hi - y])), fmt=style, capsize=3, label=name)
          else:
            ax.plot(scales, y, style, label=name)
      ax.set_xlabel("guidance scale")
      ax.set_ylabel("caption accuracy (attribute reader)")
      ax.set_ylim(0, 1.02)
      ax.legend(fontsize=8)
      ax.set_title(f"accuracy vs guidance ({n_text})")
    elif panel == "clip":
      mean = np.array([float(r["clip_score_mean"]) for r in rows])
      std = np.array([float(r.get("clip_score_std") or 0.0) for r in rows])
      n = np.array([max(int(r.get("n") or 1), 1) for r in rows])
      ax.errorbar(scales, mean, yerr=std / np.sqrt(n), fmt="b-o", capsize=3)
      ax.set_xlabel("guidance scale")
      ax.set_ylabel("CLIP score (100 x cosine, noised CLIP at t=0)")
      ax.set_title(f"CLIP score vs guidance (mean +- s.e., {n_text})")
    else:
      acc = np.array([float(r["acc_all"]) for r in rows])
      clip = np.array([float(r["clip_score_mean"]) for r in rows])
      ax.plot(clip, acc, "r-o")
      for s, x, y in zip(scales, clip, acc):
        ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
      ax.set_xlabel("CLIP score (100 x cosine)")
      ax.set_ylabel("caption accuracy (all four attributes)")
      ax.set_title("trade-off (labels: guidance scale)")
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


class TensorBoard:
  """A thin tensorboardX writer for scalars, image grids and PNG figures; `None` logdir = no-op."""

  def __init__(self, logdir: str | os.PathLike | None):
    self.writer = None
    if logdir:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(logdir))

  def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
    if self.writer is None:
      return
    for k, v in values.items():
      if isinstance(v, (int, float, np.floating, np.integer)) and np.isfinite(v):
        self.writer.add_scalar(f"{prefix}{k}", float(v), int(step))

  def image(self, tag: str, image: np.ndarray, step: int) -> None:
    """image: uint8 [H, W, 3]."""
    if self.writer is not None:
      self.writer.add_image(tag, np.asarray(image), int(step), dataformats="HWC")

  def png(self, tag: str, path: str | os.PathLike, step: int) -> None:
    """Logs a PNG file (e.g. a plot) as an image."""
    if self.writer is None:
      return
    from PIL import Image
    with Image.open(path) as im:
      self.image(tag, np.asarray(im.convert("RGB")), step)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()
