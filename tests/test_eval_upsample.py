"""The upsampler's error metrics (glide_jax/eval/upsample.py) on hand-made images counted by hand."""
from __future__ import annotations

import numpy as np

from glide_jax.eval import upsample


def _square(size: int, lo: int, hi: int, colour=(200, 30, 30), background=(240, 240, 240)) -> np.ndarray:
  img = np.empty((size, size, 3), np.uint8)
  img[:] = background
  img[lo:hi, lo:hi] = colour
  return img


def test_edge_mask_counts_the_pixels_within_3px_of_a_colour_change():
  # An 8x8 square (rows and columns 4..11) on a 16x16 background. A pixel's 7x7 window holds a
  # square pixel iff the pixel is within 3 px of the square: rows and columns 1..14, 14 x 14 = 196
  # pixels; it holds a background pixel unless the window lies inside the square: rows and columns
  # 7..8, 4 pixels. So 196 - 4 = 192 pixels are near an edge.
  img = _square(16, 4, 12)
  mask = upsample.edge_mask(img)
  assert mask.shape == (16, 16) and mask.sum() == 192
  assert mask[1, 1] and not mask[0, 5] and not mask[7, 8] and mask[6, 8]
  # A 4x4 square (rows and columns 6..9): every window that holds it also holds background:
  # rows and columns 3..12, 10 x 10 = 100 pixels.
  assert upsample.edge_mask(_square(16, 6, 10)).sum() == 100
  # A change in one channel only counts; radius 1 is the 3x3 window (rows and columns 5..10 minus
  # the square's 2x2 interior 7..8: 36 - 4 = 32).
  one = _square(16, 6, 10, colour=(240, 240, 239))
  assert upsample.edge_mask(one).sum() == 100
  assert upsample.edge_mask(one, radius=1).sum() == 32
  # A flat image has no edges; a batch gives one mask per image; floats in [-1, 1] are read as 8 bits.
  assert not upsample.edge_mask(np.full((8, 8, 3), 7, np.uint8)).any()
  both = upsample.edge_mask(np.stack([img, _square(16, 6, 10)]))
  assert both.shape == (2, 16, 16) and both.sum() == 292
  assert upsample.edge_mask(img.astype(np.float32) / 127.5 - 1).sum() == 192


def test_errors_near_the_edges_and_overall():
  truth = _square(16, 4, 12)
  pred = truth.copy()
  pred[4:12, 4] = pred[4:12, 4] + np.uint8(10)   # 8 edge pixels off by 10 in each channel
  pred[0, 0] = pred[0, 0] - np.uint8(30)         # one flat pixel (outside the mask) off by 30
  mask = upsample.edge_mask(truth)
  assert upsample.mean_abs_error(pred, truth, mask) == 8 * 10 / 192
  assert upsample.mean_abs_error(pred, truth) == (8 * 10 + 30) / 256
  assert np.isnan(upsample.mean_abs_error(pred, truth, np.zeros((16, 16), bool)))


def test_upsample_errors_against_bicubic():
  """An upsampler that returns the originals has no error; bicubic's figures are the same whichever
  upsampler is measured, and equal to measuring the bicubic images as the upsampler's."""
  big = np.stack([_square(16, 4, 12), _square(16, 6, 10, colour=(20, 90, 250))])
  low = big.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4))  # 4x4 block means: the 4 px input
  low = np.round(low).astype(np.float32) / 127.5 - 1
  exact = upsample.upsample_errors(big, low, big)
  assert exact["edge_mae"] == 0 and exact["mae"] == 0 and exact["n"] == 2
  assert exact["edge_fraction"] == 292 / 512
  assert exact["bicubic_edge_mae"] > 5 and exact["bicubic_mae"] > 1
  cubic = upsample.bicubic(low, 16)
  same = upsample.upsample_errors(cubic, low, big)
  assert same["edge_mae"] == exact["bicubic_edge_mae"] and same["mae"] == exact["bicubic_mae"]
  assert same["edge_vs_bicubic"] == 1.0 and same["mae_vs_bicubic"] == 1.0
