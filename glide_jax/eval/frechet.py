"""The Frechet distance between two Gaussians, and the feature statistics FID is built from.

d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), computed in float64 as the reference FID code
does: `scipy.linalg.sqrtm` of the product, a small diagonal offset when the product is singular,
and the (numerically spurious) imaginary part dropped after checking it is small.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import numpy as np
from scipy import linalg


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """features: [N, D] -> (mean [D], covariance [D, D]) in float64, unbiased (N - 1) covariance."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2:
    raise ValueError(f"feature_statistics expects [N, D] features, got shape {f.shape}")
  if f.shape[0] < 2:
    raise ValueError(f"feature_statistics needs at least 2 samples, got {f.shape[0]}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


class RunningStatistics:
  """Accumulates mean and covariance over batches of features without keeping them (float64)."""

  def __init__(self, dim: int):
    self.n = 0
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)

  def update(self, features: np.ndarray) -> None:
    """features: [B, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self._sum.shape[0]:
      raise ValueError(f"expected features [B, {self._sum.shape[0]}], got {f.shape}")
    self.n += f.shape[0]
    self._sum += f.sum(axis=0)
    self._outer += f.T @ f

  def finalize(self) -> tuple[np.ndarray, np.ndarray]:
    if self.n < 2:
      raise ValueError(f"need at least 2 samples for a covariance, have {self.n}")
    mu = self._sum / self.n
    sigma = (self._outer - self.n * np.outer(mu, mu)) / (self.n - 1)
    return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6, singular: bool = False) -> float:
  """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  mu: [D]; sigma: [D, D]. `eps` is the diagonal offset added to both covariances when their product
  is singular (few samples, or degenerate features), as in the reference FID implementation;
  `singular=True` (the caller knows N <= D) skips the first, wasted square root.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
  d = mu1.shape[0]
  for name, s in (("sigma1", s1), ("sigma2", s2)):
    if s.shape != (d, d):
      raise ValueError(f"{name} has shape {s.shape}, expected ({d}, {d}) to match the means")
  diff = mu1 - mu2
  if not singular:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", linalg.LinAlgWarning)
      covmean = linalg.sqrtm(s1 @ s2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    singular = singular or not np.isfinite(covmean).all()
    if singular:
      warnings.warn(f"frechet_distance: singular product of covariances; adding {eps} to the diagonals")
  if singular:
    offset = np.eye(d) * eps
    covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
  if np.iscomplexobj(covmean):
    # The product of two PSD matrices has a real square root; an imaginary part is round-off.
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"frechet_distance: sqrtm has a large imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def save_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, n: int,
                    reference: str) -> None:
  """Writes reference statistics to an .npz (mu, sigma, n, reference name): no pickles."""
  np.savez(path, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           n=np.int64(n), reference=np.array(str(reference)))


def load_statistics(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int, str]:
  """Reads statistics written by `save_statistics` (allow_pickle=False). Returns (mu, sigma, n, name)."""
  with np.load(path, allow_pickle=False) as data:
    missing = [k for k in ("mu", "sigma") if k not in data.files]
    if missing:
      raise KeyError(f"{path}: not a statistics file, keys {missing} missing (has {data.files})")
    n = int(data["n"]) if "n" in data.files else -1
    name = str(data["reference"]) if "reference" in data.files else os.fspath(path)
    return data["mu"], data["sigma"], n, name


def statistics_of(batches: Iterable[np.ndarray], dim: int) -> tuple[np.ndarray, np.ndarray, int]:
  """Streams [B, D] feature batches -> (mu, sigma, n)."""
  stats = RunningStatistics(dim)
  for b in batches:
    stats.update(b)
  mu, sigma = stats.finalize()
  return mu, sigma, stats.n
