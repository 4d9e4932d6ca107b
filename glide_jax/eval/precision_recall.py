"""Improved precision and recall (Kynkaanniemi et al. 2019) on feature vectors.

Each set's manifold is the union of balls around its points, each ball reaching the point's k-th
nearest neighbour within the set. precision = fraction of generated points inside the real
manifold (fidelity); recall = fraction of real points inside the generated manifold (coverage).
Reported with k and both sample counts; like FID, both depend on N.
"""
from __future__ import annotations

import numpy as np


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[n, D], [m, D] -> [n, m] squared Euclidean distances (float64, clipped at 0)."""
  d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d, 0.0)


def knn_radii(x: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
  """[N, D] -> [N] squared distance from each point to its k-th nearest OTHER point of x."""
  n = len(x)
  if not 1 <= k < n:
    raise ValueError(f"k={k} needs 1 <= k < N={n}")
  out = np.empty(n, np.float64)
  for lo in range(0, n, batch):
    d = _sq_dists(x[lo:lo + batch], x)
    # Index k, not k-1: the point itself sits at distance 0 in position 0 of the sorted row.
    out[lo:lo + batch] = np.partition(d, k, axis=1)[:, k]
  return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, batch: int) -> float:
  inside = np.zeros(len(points), bool)
  for lo in range(0, len(points), batch):
    d = _sq_dists(points[lo:lo + batch], centres)
    inside[lo:lo + batch] = (d <= radii[None, :]).any(axis=1)
  return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, batch: int = 1024) -> dict:
  """real: [N, D], fake: [M, D] features -> {'precision', 'recall', 'k', 'n_real', 'n_fake'}."""
  real = np.asarray(real, np.float64)
  fake = np.asarray(fake, np.float64)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise ValueError(f"expected [N, D] and [M, D] features, got {real.shape} and {fake.shape}")
  real_r = knn_radii(real, k, batch)
  fake_r = knn_radii(fake, k, batch)
  return {"precision": _coverage(fake, real, real_r, batch), "recall": _coverage(real, fake, fake_r, batch),
          "k": int(k), "n_real": len(real), "n_fake": len(fake)}
