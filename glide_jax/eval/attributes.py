"""A deterministic attribute reader for the built-in `glide_shapes` dataset, and caption accuracy.

Written from the dataset's specification alone (one flat-coloured disk / square / up-pointing
equilateral triangle on a neutral grey background, 4x4-supersampled), never from its renderer, so
that it is an independent check of both the dataset and of the samples a model draws from it.

How one image is read:
  1. background = per-channel median of the border pixels (the spec's grey, or whatever a sample
     drew there);
  2. "core" foreground = pixels far from the background, cleaned to the largest connected blob
     (generated samples have speckle);
  3. colour = nearest palette entry to the median colour of the blob's most saturated pixels;
  4. per-pixel coverage = projection of (pixel - background) onto (colour - background): how much
     of each pixel the shape covers (anti-aliased edges count fractionally);
  5. shape and size jointly, by template fitting: for each of the 6 (shape, size) hypotheses the
     spec's ideal coverage is rendered (4x4 supersampled) at the measured centroid, blurred by
     each of a few Gaussians (a generated sample is softer than the dataset), scaled by a fitted
     amplitude, and compared with the measured coverage; the least squared error wins. Blurring is
     linear, so a soft sample is still explained by the right hypothesis, where area or
     bounding-box features drift (a blurred small square looks like a disk);
  6. position = nearest anchor to the coverage centroid (for an equilateral triangle the centroid
     coincides with the centre of its circumcircle, which is where the spec places it).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

COLOURS: tuple[str, ...] = ("red", "yellow", "green", "cyan", "blue", "purple")
PALETTE = np.array([(220, 40, 40), (225, 200, 30), (40, 170, 60), (30, 185, 200), (40, 70, 220),
                    (150, 60, 190)], np.float64)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS = (0.12, 0.22)  # r / canvas size
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
POSITION_ANCHORS = np.array([(0.25, 0.5), (0.75, 0.5), (0.5, 0.25), (0.5, 0.75), (0.5, 0.5)])
WHERE: tuple[str, ...] = ("on the left", "on the right", "at the top", "at the bottom", "in the center")
ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "size", "position")
NUM_CLASSES = {"colour": len(COLOURS), "shape": len(SHAPES), "size": len(SIZES),
               "position": len(POSITIONS)}

# Gaussian blurs (pixels at 64 px and below; scaled with the canvas above) a template may be
# smoothed by before it is compared: a generated sample is often softer than the dataset's crisp
# 4x4-supersampled edges. 0 = the dataset's own images.
_BLUR_SIGMAS = (0.0, 0.5, 0.8, 1.2, 1.7, 2.4, 3.4)
# Templates are compared inside the blob dilated by this many pixels (room for blurred edges).
_WINDOW_RIM = 4
# The fitted amplitude of a template may correct the estimated colour contrast by this much.
_AMPLITUDE_RANGE = (0.8, 1.25)

# A pixel is "core" foreground when its largest channel difference from the background exceeds
# this fraction of the largest difference in the image (and an absolute floor, in 8-bit levels).
_CORE_FRACTION = 0.5
_MIN_CONTRAST = 40.0

# Above this border noise (8-bit levels) an image is median-filtered before reading; the dataset's
# own images have none, so they are read unfiltered.
_NOISE_LEVEL = 4.0

UNREADABLE = -1


def _background(img: np.ndarray) -> np.ndarray:
  """Per-channel median of the one-pixel border: robust to a shape that touches an edge."""
  border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
  return np.median(border, axis=0)


def _border_noise(img: np.ndarray, bg: np.ndarray) -> float:
  """Robust noise level of the border (median absolute deviation, in 8-bit levels)."""
  border = np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]], axis=0)
  return float(np.median(np.abs(border - bg)) * 1.4826)


def _ideal_coverage(shape: str, r: float, cx: float, cy: float, h: int, w: int, ss: int = 4) -> np.ndarray:
  """Coverage [h, w] of the spec's shape centred at (cx, cy), by ss x ss supersampling."""
  ys = (np.arange(h * ss) + 0.5) / ss - cy
  xs = (np.arange(w * ss) + 0.5) / ss - cx
  y, x = ys[:, None], xs[None, :]
  if shape == "circle":
    inside = x * x + y * y <= r * r
  elif shape == "square":
    inside = (np.abs(x) <= r) & (np.abs(y) <= r)
  else:
    inside = (y <= r / 2) & (y >= np.sqrt(3.0) * np.abs(x) - r)
  return inside.reshape(h, ss, w, ss).mean(axis=(1, 3))


def _template_fit(lin: np.ndarray, window: np.ndarray, cx: float, cy: float, size: float) -> tuple[int, int]:
  """(shape, size) whose ideal coverage, blurred by the best of a few Gaussians and scaled by the
  best amplitude, explains the measured coverage inside `window` with the least squared error."""
  # Work on the window's bounding box plus the widest blur's reach: same result, less work at 256 px.
  sigmas = [sg * max(1.0, size / 64.0) for sg in _BLUR_SIGMAS]
  margin = int(np.ceil(4 * max(sigmas))) + 1
  rows, cols = np.nonzero(window.any(axis=1))[0], np.nonzero(window.any(axis=0))[0]
  y0, y1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, lin.shape[0])
  x0, x1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, lin.shape[1])
  lin, window = lin[y0:y1, x0:x1], window[y0:y1, x0:x1]
  cx, cy = cx - x0, cy - y0
  h, w = lin.shape
  target = lin[window]
  best, best_err = (0, 0), np.inf
  for s, shape_name in enumerate(SHAPES):
    for z, frac in enumerate(SIZE_RADIUS):
      ideal = _ideal_coverage(shape_name, frac * size, cx, cy, h, w)
      for sigma in sigmas:
        t = ndimage.gaussian_filter(ideal, sigma, mode="constant") if sigma else ideal
        tv = t[window]
        tt = float(tv @ tv)
        if tt <= 0:
          continue
        amp = min(max(float(tv @ target) / tt, _AMPLITUDE_RANGE[0]), _AMPLITUDE_RANGE[1])
        err = float(np.sum((target - amp * tv) ** 2))
        if err < best_err:
          best, best_err = (s, z), err
  return best


def read_attributes(image: np.ndarray) -> tuple[int, int, int, int]:
  """Reads (colour, shape, size, position) indices from one image.

  image: uint8 (or float in 0..255) [H, W, 3], square, any size 32..256. Returns indices in the
  spec's orders (COLOURS, SHAPES, SIZES, POSITIONS), or all `UNREADABLE` (-1) when no shape is found.
  """
  img = np.asarray(image)
  if img.ndim != 3 or img.shape[-1] != 3:
    raise ValueError(f"read_attributes expects an image [H, W, 3], got shape {img.shape}")
  img = img.astype(np.float64)
  h, w, _ = img.shape
  size = float(min(h, w))
  bg = _background(img)
  if _border_noise(img, bg) > _NOISE_LEVEL:
    # A noisy sample: a 3x3 median per channel removes speckle that would inflate the extents.
    img = ndimage.median_filter(img, size=(3, 3, 1), mode="nearest")
    bg = _background(img)
  diff = img - bg
  dist = np.max(np.abs(diff), axis=-1)
  peak = float(dist.max())
  if peak < _MIN_CONTRAST:
    return (UNREADABLE,) * 4
  core = dist > max(_CORE_FRACTION * peak, _MIN_CONTRAST)
  if not core.any():  # contrast right at the threshold: nothing to read, not a crash
    return (UNREADABLE,) * 4
  # Keep the largest 8-connected blob: a sample's stray speckles must not move the centroid.
  labels, count = ndimage.label(core, structure=np.ones((3, 3)))
  if count > 1:
    sizes = ndimage.sum(core, labels, index=np.arange(1, count + 1))
    core = labels == (1 + int(np.argmax(sizes)))
  # The colour from the blob's most saturated pixels: blurred edges are a mix with the background.
  strong = core & (dist >= 0.8 * float(dist[core].max()))
  colour_est = np.median(img[strong], axis=0)
  colour = int(np.argmin(np.sum((PALETTE - colour_est) ** 2, axis=-1)))

  # Coverage: where each pixel lies between the background and the shape's own colour.
  axis = colour_est - bg
  cov = np.clip(diff @ axis / max(float(axis @ axis), 1e-6), 0.0, 1.0)
  # Only the blob and its one-pixel rim (anti-aliased edge) count; the rest is background noise.
  support = ndimage.binary_dilation(core, structure=np.ones((3, 3)), iterations=1)
  cov = np.where(support, cov, 0.0)
  area = float(cov.sum())
  if area <= 0:
    return (UNREADABLE,) * 4

  ys, xs = np.mgrid[0:h, 0:w]
  cx = float((cov * (xs + 0.5)).sum() / area)
  cy = float((cov * (ys + 0.5)).sum() / area)
  # Shape and size: the hypothesis whose ideal rendering, blurred as the image is, fits best.
  lin = diff @ axis / max(float(axis @ axis), 1e-6)  # unclipped: background noise stays zero-mean
  window = ndimage.binary_dilation(core, structure=np.ones((3, 3)), iterations=_WINDOW_RIM)
  shape, size_idx = _template_fit(lin, window, cx, cy, size)

  centre = np.array([cx / w, cy / h])
  position = int(np.argmin(np.sum((POSITION_ANCHORS - centre) ** 2, axis=-1)))
  return colour, shape, size_idx, position


def read_attributes_batch(images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
  """images: [N, H, W, 3] uint8 (or a list of [H, W, 3]) -> {attribute: int64 [N]} (-1 = unreadable)."""
  rows = [read_attributes(im) for im in images]
  arr = np.array(rows, np.int64).reshape(-1, 4)
  return {name: arr[:, k] for k, name in enumerate(ATTRIBUTES)}


def caption_accuracy(images: np.ndarray | Sequence[np.ndarray],
                     attributes: Mapping[str, Sequence[int] | np.ndarray],
                     return_per_sample: bool = False) -> dict[str, float | int]:
  """Fraction of images whose read-back attributes match the ones their captions asked for.

  images: [N, H, W, 3] uint8; attributes: {'colour', 'shape', 'size', 'position'} -> int [N].
  Returns {'colour', 'shape', 'size', 'position': per-attribute accuracy in [0, 1],
  'all': fraction with all four right, 'n': N, 'unreadable': images with no shape found}; with
  return_per_sample also 'per_sample' (bool [N]: all four right), 'correct' ({attribute or
  'all': bool [N]}, what paired comparisons between two sample sets need) and 'confusion'
  (`confusion_matrices`).
  """
  missing = [a for a in ATTRIBUTES if a not in attributes]
  if missing:
    raise KeyError(f"caption_accuracy: attributes {missing} missing (need {list(ATTRIBUTES)})")
  n = len(images)
  expected = {a: np.asarray(attributes[a], np.int64).reshape(-1) for a in ATTRIBUTES}
  for a, v in expected.items():
    if v.shape[0] != n:
      raise ValueError(f"caption_accuracy: {n} images but {v.shape[0]} values of {a!r}")
  if n == 0:
    raise ValueError("caption_accuracy: no images")
  got = read_attributes_batch(images)
  correct = {a: got[a] == expected[a] for a in ATTRIBUTES}
  result: dict[str, float | int] = {a: float(np.mean(correct[a])) for a in ATTRIBUTES}
  result["all"] = float(np.mean(np.all([correct[a] for a in ATTRIBUTES], axis=0)))
  result["n"] = int(n)
  result["unreadable"] = int(np.sum(got["colour"] == UNREADABLE))
  if return_per_sample:
    all_right = np.all([correct[a] for a in ATTRIBUTES], axis=0)
    result["per_sample"] = all_right  # type: ignore[assignment]
    result["correct"] = {**correct, "all": all_right}  # type: ignore[assignment]
    result["confusion"] = confusion_matrices(got, expected)  # type: ignore[assignment]
  return result


def confusion_matrices(read: Mapping[str, np.ndarray],
                       expected: Mapping[str, Sequence[int] | np.ndarray]) -> dict[str, np.ndarray]:
  """{attribute: int [K, K + 1]}: row = the value the caption asked for, column = the value read back
  (the last column counts unreadable samples). Per-value recall is the diagonal over the row sums: a
  model that learned one position word and guesses the rest shows it here, not in the accuracy."""
  out = {}
  for a in ATTRIBUTES:
    k = NUM_CLASSES[a]
    want = np.asarray(expected[a], np.int64).reshape(-1)
    got = np.asarray(read[a], np.int64).reshape(-1)
    got = np.where(got == UNREADABLE, k, got)
    m = np.zeros((k, k + 1), np.int64)
    np.add.at(m, (want, got), 1)
    out[a] = m
  return out


def recall_by_value(confusion: Mapping[str, np.ndarray]) -> dict[str, dict[str, float | None]]:
  """{attribute: {value name: fraction of the samples asking for it read back as it (None: none asked)}}."""
  names = {"colour": COLOURS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}
  out = {}
  for a, m in confusion.items():
    rows = m.sum(1)
    out[a] = {names[a][i]: (float(m[i, i] / rows[i]) if rows[i] else None) for i in range(m.shape[0])}
  return out


def format_recall(recall: Mapping[str, Mapping[str, float | None]]) -> str:
  """`recall_by_value` as one line, e.g. 'position left 99% right 100% ...; size ...'."""
  return "; ".join(f"{a} " + " ".join(f"{v} {100 * r:.0f}%" for v, r in rec.items() if r is not None)
                   for a, rec in recall.items())


def chance_accuracy() -> dict[str, float]:
  """Accuracy of uniform guessing, the floor a random model sits at."""
  out = {a: 1.0 / NUM_CLASSES[a] for a in ATTRIBUTES}
  out["all"] = float(np.prod([1.0 / NUM_CLASSES[a] for a in ATTRIBUTES]))
  return out


# --- captions -> attributes -------------------------------------------------------------------

_SIZE_RE = "|".join(SIZES)
_COLOUR_RE = "|".join(COLOURS)
_SHAPE_RE = "|".join(SHAPES)
_WHERE_RE = "|".join(WHERE)
_TEMPLATE_RES = (
    re.compile(rf"^a (?P<size>{_SIZE_RE}) (?P<colour>{_COLOUR_RE}) (?P<shape>{_SHAPE_RE}) "
               rf"(?P<where>{_WHERE_RE})$"),
    re.compile(rf"^a (?P<colour>{_COLOUR_RE}) (?P<shape>{_SHAPE_RE}), (?P<size>{_SIZE_RE}), "
               rf"(?P<where>{_WHERE_RE})$"),
    re.compile(rf"^(?P<where>{_WHERE_RE}): a (?P<size>{_SIZE_RE}) (?P<colour>{_COLOUR_RE}) "
               rf"(?P<shape>{_SHAPE_RE})$"),
)


def parse_caption(caption: str) -> dict[str, int]:
  """Parses a caption in one of the three shapes templates into attribute indices.

  Raises ValueError naming the caption when it matches no template.
  """
  text = " ".join(caption.strip().lower().split())
  for pattern in _TEMPLATE_RES:
    m = pattern.match(text)
    if m:
      return {"colour": COLOURS.index(m["colour"]), "shape": SHAPES.index(m["shape"]),
              "size": SIZES.index(m["size"]), "position": WHERE.index(m["where"])}
  raise ValueError(f"caption {caption!r} matches none of the glide_shapes templates "
                   "('a {size} {colour} {shape} {where}', 'a {colour} {shape}, {size}, {where}', "
                   "'{where}: a {size} {colour} {shape}')")


def parse_captions(captions: Iterable[str]) -> dict[str, np.ndarray]:
  """Captions -> {attribute: int64 [N]}."""
  rows = [parse_caption(c) for c in captions]
  return {a: np.array([r[a] for r in rows], np.int64) for a in ATTRIBUTES}


def make_caption(colour: int, shape: int, size: int, position: int, template: int = 0) -> str:
  """The caption the dataset would write for these attributes with template 0, 1 or 2."""
  fields = {"size": SIZES[size], "colour": COLOURS[colour], "shape": SHAPES[shape], "where": WHERE[position]}
  return ("a {size} {colour} {shape} {where}", "a {colour} {shape}, {size}, {where}",
          "{where}: a {size} {colour} {shape}")[template].format(**fields)
