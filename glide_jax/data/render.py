"""Pure-numpy renderer of the built-in shapes dataset (docs/data.md, "glide_shapes").

Example `i` of a split is a pure function of `(split seed, i)`: its attributes come from a Philox
generator keyed by exactly that pair, never from a global RNG, so every machine, process and run
agrees. Rendering is vectorised over a chunk of examples: each shape is drawn at 4x resolution
inside a small window around it (the rest of the canvas is plain background) and box-averaged
4x4, which is the same image as supersampling the whole canvas, only cheaper.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
PALETTE = np.array([(220, 40, 40), (225, 200, 30), (40, 170, 60), (30, 185, 200),
                    (40, 70, 220), (150, 60, 190)], np.float64)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
RADIUS_FRACTION = (0.12, 0.22)  # r / canvas size, for small and large
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_CENTRES = np.array([(0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75), (0.5, 0.5)])
WHERE: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
TEMPLATES: tuple[str, ...] = ("a {size} {colour} {shape} {where}",
                              "a {colour} {shape}, {size}, {where}",
                              "{where}: a {size} {colour} {shape}")
JITTER_FRACTION = 0.04
GREY_RANGE = (190, 235)  # inclusive
SUPERSAMPLE = 4

# Split seeds (part of the dataset's definition: changing one changes the dataset).
SPLIT_SEEDS = {"train": 20240601, "validation": 20240602}


def caption(colour: int, shape: int, size: int, position: int, template: int) -> str:
  return TEMPLATES[template].format(size=SIZES[size], colour=COLOURS[colour], shape=SHAPES[shape],
                                    where=WHERE[position])


def sample_attributes(seed: int, start: int, count: int) -> dict[str, np.ndarray]:
  """Attributes of examples start..start+count-1; each from Philox keyed by (seed, i).

  Returns arrays [count]: colour, shape, size, position, template (int64), jitter_x, jitter_y
  (in [-1, 1], to be scaled by 0.04 * size) and grey (int64 in [190, 235]).
  """
  names = ("colour", "shape", "size", "position", "template", "jitter_x", "jitter_y", "grey")
  out = {n: np.empty(count, np.float64 if n.startswith("jitter") else np.int64) for n in names}
  for k in range(count):
    i = start + k
    rng = np.random.Generator(np.random.Philox(key=np.array([seed, i], np.uint64)))
    out["colour"][k] = rng.integers(len(COLOURS))
    out["shape"][k] = rng.integers(len(SHAPES))
    out["size"][k] = rng.integers(len(SIZES))
    out["position"][k] = rng.integers(len(POSITIONS))
    out["template"][k] = rng.integers(len(TEMPLATES))
    out["jitter_x"][k], out["jitter_y"][k] = rng.uniform(-1.0, 1.0, size=2)
    out["grey"][k] = rng.integers(GREY_RANGE[0], GREY_RANGE[1] + 1)
  return out


def _coverage(shape: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, x0: np.ndarray,
              y0: np.ndarray, window: int) -> np.ndarray:
  """Fraction (k/16) of the 4x4 subsamples inside the shape, per pixel of each window.

  shape, cx, cy, r, x0, y0: [B]; returns [B, window, window] float32.
  """
  s = SUPERSAMPLE
  sub = (np.arange(window * s, dtype=np.float64) + 0.5) / s  # subsample centres, window pixel units
  xs = (x0[:, None] + sub[None, :] - cx[:, None])[:, None, :]  # [B, 1, W*s]
  ys = (y0[:, None] + sub[None, :] - cy[:, None])[:, :, None]  # [B, W*s, 1]
  rr = r[:, None, None]
  inside = np.zeros((len(shape), window * s, window * s), bool)
  for kind in range(len(SHAPES)):
    sel = np.nonzero(shape == kind)[0]
    if sel.size == 0:
      continue
    x, y, rk = xs[sel], ys[sel], rr[sel]
    if SHAPES[kind] == "circle":
      inside[sel] = x * x + y * y <= rk * rk
    elif SHAPES[kind] == "square":
      inside[sel] = (np.abs(x) <= rk) & (np.abs(y) <= rk)
    else:  # equilateral triangle pointing up, vertices on the circle of radius r
      # Apex (0, -r), base corners (+-r*sqrt(3)/2, r/2): below the apex edges, above the base.
      sqrt3 = np.sqrt(3.0)
      inside[sel] = (y <= rk / 2) & (y >= sqrt3 * np.abs(x) - rk)
  counts = inside.reshape(len(shape), window, s, window, s).sum(axis=(2, 4))
  return counts.astype(np.float32) / (s * s)


def render(attrs: dict[str, np.ndarray], size: int) -> np.ndarray:
  """Renders attributes (see `sample_attributes`) into uint8 images [B, size, size, 3]."""
  n = len(attrs["colour"])
  centre = POSITION_CENTRES[attrs["position"]] * size
  jitter = JITTER_FRACTION * size
  cx = centre[:, 0] + attrs["jitter_x"] * jitter
  cy = centre[:, 1] + attrs["jitter_y"] * jitter
  r = np.asarray(RADIUS_FRACTION)[attrs["size"]] * size
  x0 = np.floor(cx - r).astype(np.int64) - 1  # window origin, in canvas pixels
  y0 = np.floor(cy - r).astype(np.int64) - 1
  pad = int(np.ceil(2 * max(RADIUS_FRACTION) * size)) + 2
  canvas = np.zeros((n, size + 2 * pad, size + 2 * pad), np.float32)
  for size_class, fraction in enumerate(RADIUS_FRACTION):
    # One window size per size class, just large enough to hold the shape.
    sel = np.nonzero(attrs["size"] == size_class)[0]
    if sel.size == 0:
      continue
    window = int(np.ceil(2 * fraction * size)) + 2
    cov = _coverage(attrs["shape"][sel], cx[sel], cy[sel], r[sel], x0[sel].astype(np.float64),
                    y0[sel].astype(np.float64), window)
    # Paste each window into a padded coverage canvas (windows may poke past the canvas edge).
    rows = (y0[sel] + pad)[:, None] + np.arange(window)[None, :]  # [b, W]
    cols = (x0[sel] + pad)[:, None] + np.arange(window)[None, :]
    canvas[sel[:, None, None], rows[:, :, None], cols[:, None, :]] = cov
  cov = canvas[:, pad:pad + size, pad:pad + size, None]
  grey = attrs["grey"].astype(np.float32)[:, None, None, None]
  colour = PALETTE[attrs["colour"]].astype(np.float32)[:, None, None, :]
  image = grey * (1.0 - cov) + colour * cov  # = the 4x4 box average of the supersampled image
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def generate(seed: int, start: int, count: int, size: int, chunk: int = 512) -> Iterator[dict]:
  """Yields examples start..start+count-1 as dicts (index, image, caption, attributes)."""
  for lo in range(start, start + count, chunk):
    k = min(chunk, start + count - lo)
    attrs = sample_attributes(seed, lo, k)
    images = render(attrs, size)
    for j in range(k):
      yield {
          "index": lo + j,
          "image": images[j],
          "caption": caption(attrs["colour"][j], attrs["shape"][j], attrs["size"][j],
                             attrs["position"][j], attrs["template"][j]),
          "colour": int(attrs["colour"][j]),
          "shape": int(attrs["shape"][j]),
          "size": int(attrs["size"][j]),
          "position": int(attrs["position"][j]),
      }
