"""How close an upsampler comes to the high-res originals, near the edges and over the whole image.

  mask = edge_mask(truth)                          # [B, H, W] bool, from the ORIGINAL images
  report = upsample_errors(upsampled, low_res, truth)
  # {'n', 'edge_mae', 'mae', 'bicubic_edge_mae', 'bicubic_mae', 'edge_fraction', ...} in /255 units

The edge mask: a pixel is "near an edge" when the (2r + 1) x (2r + 1) window centred on it (cut at
the image border) is not constant in the 8-bit original, in any channel; with r = 3 (a 7x7 window)
these are the pixels within 3 px (Chebyshev distance) of a pixel of another colour. On flat-coloured
images (glide_shapes) the other pixels lie inside flat regions, where bicubic interpolation of the
low-res input is nearly exact; the edge pixels are where an upsampler has to add detail.

Errors are mean absolute differences of the 8-bit images (0..255 per channel), averaged over every
channel of every selected pixel of the batch (not per image). The bicubic baseline is
`jax.image.resize(low_res, ..., 'cubic')` of the same low-res input (Keys' a = -0.5, as PIL and
torch), rounded to 8 bits - the `bicubic` base of `diffusion.upsample_residual`.
"""
from __future__ import annotations

import numpy as np

from glide_jax import images

EDGE_RADIUS = 3


def _window_extreme(x: np.ndarray, radius: int, fn) -> np.ndarray:
  """max or min of x [B, H, W, C] over the (2 radius + 1)^2 window, cut at the border (separable)."""
  for axis in (1, 2):
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    edge = np.pad(x, pad, mode="edge")  # repeating the border pixel leaves max and min unchanged
    stacked = np.stack([np.take(edge, np.arange(k, k + n), axis=axis) for k in range(2 * radius + 1)])
    x = fn(stacked, axis=0)
  return x


def edge_mask(truth: np.ndarray, radius: int = EDGE_RADIUS) -> np.ndarray:
  """[B, H, W] (or [H, W] for one image) bool: True where the window of side 2 radius + 1 around the
  pixel is not constant in the 8-bit image `truth` ([B, H, W, C] or [H, W, C]; uint8, or float in
  [-1, 1], converted with images.to_uint8)."""
  x = np.asarray(truth)
  single = x.ndim == 3
  if single:
    x = x[None]
  if x.dtype != np.uint8:
    x = images.to_uint8(x)
  x = x.astype(np.int16)
  varies = _window_extreme(x, radius, np.max) != _window_extreme(x, radius, np.min)
  mask = np.any(varies, axis=-1)
  return mask[0] if single else mask


def mean_abs_error(pred: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> float:
  """Mean |pred - truth| over the channels of the pixels where `mask` [B, H, W] is True (all if None),
  in 8-bit units; pred and truth uint8 or float in [-1, 1]. NaN if the mask is empty."""
  p, t = (np.asarray(a) if np.asarray(a).dtype == np.uint8 else images.to_uint8(np.asarray(a))
          for a in (pred, truth))
  err = np.abs(p.astype(np.float64) - t.astype(np.float64))
  if mask is None:
    return float(err.mean())
  mask = np.asarray(mask, bool)
  if not mask.any():
    return float("nan")
  return float(err[mask].mean())


def bicubic(low_res: np.ndarray, size: int) -> np.ndarray:
  """Bicubic upsampling of low_res [B, h, w, 3] in [-1, 1] to [B, size, size, 3], clipped to [-1, 1]."""
  import jax

  low = np.asarray(low_res, np.float32)
  out = jax.image.resize(low, (low.shape[0], size, size, low.shape[-1]), "cubic")
  return np.clip(np.asarray(out), -1.0, 1.0)


def upsample_errors(upsampled: np.ndarray, low_res: np.ndarray, truth: np.ndarray,
                    radius: int = EDGE_RADIUS) -> dict:
  """The upsampler's and bicubic interpolation's errors against the originals `truth`.

  upsampled, truth: [B, H, W, 3]; low_res: [B, h, w, 3] (the input both start from); floats in
  [-1, 1] or uint8. Returns n, edge_radius, edge_fraction (of the pixels), edge_mae and mae (the
  upsampler), bicubic_edge_mae and bicubic_mae, and the ratios edge_vs_bicubic, mae_vs_bicubic.
  """
  truth8 = images.to_uint8(np.asarray(truth)) if np.asarray(truth).dtype != np.uint8 else np.asarray(truth)
  low = np.asarray(low_res)
  if low.dtype == np.uint8:
    low = low.astype(np.float32) / 127.5 - 1.0
  cubic = bicubic(low, truth8.shape[1])
  mask = edge_mask(truth8, radius)
  out = {"n": int(truth8.shape[0]), "edge_radius": radius, "edge_fraction": float(mask.mean()),
         "edge_mae": mean_abs_error(upsampled, truth8, mask), "mae": mean_abs_error(upsampled, truth8),
         "bicubic_edge_mae": mean_abs_error(cubic, truth8, mask), "bicubic_mae": mean_abs_error(cubic, truth8)}
  out["edge_vs_bicubic"] = out["edge_mae"] / out["bicubic_edge_mae"]
  out["mae_vs_bicubic"] = out["mae"] / out["bicubic_mae"]
  return out
