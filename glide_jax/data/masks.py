"""Random inpainting masks, as TensorFlow ops for the tf.data pipeline (1 = known, 0 = to fill).

Three kinds, chosen per example (`rect_prob`, `ellipse_prob`, the rest strokes):
  - rectangle: an axis-aligned box; its area is the target area exactly (up to pixel rounding
    and the aspect ratio, drawn log-uniformly in [1/max_aspect, max_aspect], being clipped).
  - ellipse: axis-aligned, area the target area (less what falls outside the image).
  - strokes: free-form brush strokes (polylines of `stroke_segments` segments, random width in
    `stroke_width` as a fraction of the image side); strokes are added one by one until the hole
    covers the target area (at most `max_strokes`).
The target hole area is a fraction of the image drawn uniformly in [min_area, max_area], so the
area distribution is set by those two numbers (the config's `min_known`/`max_known` are 1 - them).
Everything is stateless: a mask is a pure function of its seed, which the pipeline derives from
(seed, epoch, example index). Work is batched, and masks are drawn on a grid of at most 32x32 cells, upsampled (nearest) to the image size.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class MaskConfig:
  kind: str = "random"  # 'random' (rectangles, ellipses, strokes) or 'none'
  rect_prob: float = 0.4
  ellipse_prob: float = 0.2  # the rest are strokes
  min_area: float = 0.1  # hole area as a fraction of the image, drawn uniformly in [min, max]
  max_area: float = 0.7
  max_aspect: float = 3.0
  max_strokes: int = 6
  stroke_segments: int = 4
  stroke_width: tuple[float, float] = (0.05, 0.15)

  @classmethod
  def from_config(cls, cfg: Mapping[str, Any] | None) -> MaskConfig:
    """data.masks -> MaskConfig. `min_known`/`max_known` (known fraction) set max/min_area."""
    cfg = dict(cfg.items()) if cfg else {}
    if "min_known" in cfg:
      cfg["max_area"] = 1.0 - float(cfg.pop("min_known"))
    if "max_known" in cfg:
      cfg["min_area"] = 1.0 - float(cfg.pop("max_known"))
    unknown = set(cfg) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ValueError(f"unknown data.masks keys {sorted(unknown)}; known: min_known, max_known, "
                       f"{[f.name for f in dataclasses.fields(cls)]}")
    if "stroke_width" in cfg:
      cfg["stroke_width"] = tuple(float(v) for v in cfg["stroke_width"])
    out = cls(**cfg)
    if out.kind not in ("random", "none"):
      raise ValueError(f"data.masks.kind must be 'random' or 'none', got {out.kind!r}")
    if not 0.0 <= out.min_area <= out.max_area <= 1.0:
      raise ValueError(f"data.masks needs 0 <= min_area <= max_area <= 1 (known fractions "
                       f"0 <= min_known <= max_known <= 1), got areas {out.min_area}, {out.max_area}")
    if out.rect_prob < 0 or out.ellipse_prob < 0 or out.rect_prob + out.ellipse_prob > 1:
      raise ValueError("data.masks: rect_prob + ellipse_prob must be within [0, 1]")
    return out


MAX_RESOLUTION = 32  # masks are drawn at most this fine, then upsampled (nearest)


def random_masks(seeds: tf.Tensor, size: int, cfg: MaskConfig) -> tf.Tensor:
  """Inpainting masks [B, size, size, 1] float32: 1 = known pixel, 0 = hole.

  seeds: int64 [B, 2], one per example; mask b is a pure function of seeds[b] (and cfg, size).
  Drawn on a grid of min(size, 32)^2 cells (so large masks cost what small ones do).
  """
  res = min(size, MAX_RESOLUTION)
  k, v = cfg.max_strokes, cfg.stroke_segments

  def params(seed):
    s = tf.random.experimental.stateless_split(seed, 9)
    u = lambda i, shape=(), lo=0.0, hi=1.0: tf.random.stateless_uniform(shape, s[i], lo, hi)
    log_aspect = tf.math.log(float(cfg.max_aspect))
    return {
        "target": u(0, (), cfg.min_area, cfg.max_area),
        "kind": u(1),  # < rect_prob: rectangle; < rect_prob + ellipse_prob: ellipse; else strokes
        "aspect": tf.exp(u(2, (), -log_aspect, log_aspect)),
        "corner": u(3, (2,)),
        "start": u(4, (k, 1, 2)) * res,
        "angle": u(5, (k, v, 1), 0.0, 2 * np.pi),
        "length": u(6, (k, v, 1), 0.1, 0.3) * res,
        "width": u(7, (k, 1), cfg.stroke_width[0], cfg.stroke_width[1]) * res,
    }

  spec = {"target": tf.TensorSpec([], tf.float32), "kind": tf.TensorSpec([], tf.float32),
          "aspect": tf.TensorSpec([], tf.float32), "corner": tf.TensorSpec([2], tf.float32),
          "start": tf.TensorSpec([k, 1, 2], tf.float32), "angle": tf.TensorSpec([k, v, 1], tf.float32),
          "length": tf.TensorSpec([k, v, 1], tf.float32), "width": tf.TensorSpec([k, 1], tf.float32)}
  p = tf.map_fn(params, tf.cast(seeds, tf.int64), fn_output_signature=spec)
  cells = tf.range(res, dtype=tf.float32)

  # Rectangles: area = target * res^2 (up to rounding and clipping of the sides).
  area = p["target"] * res * res
  h = tf.clip_by_value(tf.round(tf.sqrt(area * p["aspect"])), 1.0, float(res))
  w = tf.clip_by_value(tf.round(area / h), 1.0, float(res))
  top = tf.floor(p["corner"][:, 0] * (res - h + 1))
  left = tf.floor(p["corner"][:, 1] * (res - w + 1))
  rows = tf.cast((cells[None] >= top[:, None]) & (cells[None] < (top + h)[:, None]), tf.float32)
  cols = tf.cast((cells[None] >= left[:, None]) & (cells[None] < (left + w)[:, None]), tf.float32)
  rect = rows[:, :, None] * cols[:, None, :]  # [B, res, res]

  # Ellipses: semi-axes with pi * a * b = target * res^2, centre inside the image.
  semi_y = tf.sqrt(area * p["aspect"] / np.pi)
  semi_x = area / (np.pi * semi_y)
  cy = p["corner"][:, 0] * res
  cx = p["corner"][:, 1] * res
  ey = ((cells[None] + 0.5 - cy[:, None]) / semi_y[:, None]) ** 2  # [B, res]
  ex = ((cells[None] + 0.5 - cx[:, None]) / semi_x[:, None]) ** 2
  ellipse = tf.cast(ey[:, :, None] + ex[:, None, :] <= 1.0, tf.float32)

  # Strokes: polylines of v segments; added one by one until the hole reaches the target area.
  steps = tf.concat([tf.cos(p["angle"]), tf.sin(p["angle"])], -1) * p["length"]
  points = tf.concat([p["start"], p["start"] + tf.cumsum(steps, axis=2)], axis=2)  # [B, k, v+1, 2]
  ax, ay = points[:, :, :-1, 0:1], points[:, :, :-1, 1:2]  # segment starts [B, k, v, 1]
  dx, dy = points[:, :, 1:, 0:1] - ax, points[:, :, 1:, 1:2] - ay
  px = tf.reshape(tf.tile(cells[None, :] + 0.5, [res, 1]), [1, 1, 1, -1])  # cell centres (x, y)
  py = tf.reshape(tf.tile(cells[:, None] + 0.5, [1, res]), [1, 1, 1, -1])
  ux, uy = px - ax, py - ay  # [B, k, v, res*res]
  t = tf.clip_by_value((ux * dx + uy * dy) / (dx * dx + dy * dy + 1e-6), 0.0, 1.0)
  ex, ey = ux - t * dx, uy - t * dy
  dist2 = tf.reduce_min(ex * ex + ey * ey, axis=2)  # squared distance to each stroke [B, k, res*res]
  stroke = tf.cast(dist2 <= (p["width"] / 2) ** 2, tf.float32)
  union = tf.minimum(tf.cumsum(stroke, axis=1), 1.0)  # hole after 1, 2, ..., k strokes
  reached = tf.cast(tf.reduce_mean(union, -1) >= p["target"][:, None], tf.int32)  # [B, k]
  n = tf.where(tf.reduce_any(reached > 0, -1), tf.argmax(reached, -1, output_type=tf.int32), k - 1)
  strokes = tf.reshape(tf.gather(union, n, axis=1, batch_dims=1), [-1, res, res])

  u = p["kind"][:, None, None]
  hole = tf.where(u < cfg.rect_prob, rect, tf.where(u < cfg.rect_prob + cfg.ellipse_prob, ellipse, strokes))
  known = (1.0 - hole)[..., None]
  if res != size:
    known = tf.image.resize(known, [size, size], method="nearest")
  return known
