"""The Frechet distance against independent computations."""
from __future__ import annotations

import numpy as np
import pytest

from glide_jax.eval import frechet


def _random_spd(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d)


def _psd_sqrt(m):
  w, v = np.linalg.eigh((m + m.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _frechet_by_eigen(mu1, s1, mu2, s2):
  """Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)): a symmetric route, no sqrtm of S1 S2."""
  r1 = _psd_sqrt(s1)
  inner = r1 @ s2 @ r1
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)))
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def test_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = frechet.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_one_dimensional_closed_form():
  # d^2 between N(1, 4) and N(-2, 9) = 9 + (2 - 3)^2 = 10
  assert frechet.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]),
                                  np.array([[9.0]])) == pytest.approx(10.0)


@pytest.mark.parametrize("d", [5, 64])
def test_general_covariances_against_eigen_route(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  got = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(_frechet_by_eigen(mu1, s1, mu2, s2), rel=1e-7, abs=1e-8)
  # A metric's square: zero on itself, symmetric.
  assert frechet.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-7)
  assert got == pytest.approx(frechet.frechet_distance(mu2, s2, mu1, s1), rel=1e-7)


def test_singular_covariances_use_offset():
  rng = np.random.default_rng(3)
  d = 32
  s1, s2 = _random_spd(rng, d, rank=4), _random_spd(rng, d, rank=4)  # rank-deficient, as with few samples
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = frechet.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  assert got == pytest.approx(_frechet_by_eigen(mu1, s1, mu2, s2), rel=1e-4, abs=1e-4)


def test_statistics_and_running_statistics():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(300, 7)) @ rng.normal(size=(7, 7)) + 3.0
  mu, sigma = frechet.feature_statistics(x)
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  centred = x - x.mean(0)
  np.testing.assert_allclose(sigma, centred.T @ centred / (len(x) - 1), rtol=1e-10)
  mu2, sigma2, n = frechet.statistics_of(np.array_split(x, 7), 7)
  assert n == 300
  np.testing.assert_allclose(mu2, mu, rtol=1e-12)
  np.testing.assert_allclose(sigma2, sigma, rtol=1e-8, atol=1e-10)


def test_statistics_file_round_trip_and_errors(tmp_path):
  rng = np.random.default_rng(5)
  mu, sigma = rng.normal(size=4), _random_spd(rng, 4)
  frechet.save_statistics(tmp_path / "ref.npz", mu, sigma, 123, "glide_shapes/size64 validation")
  mu2, sigma2, n, name = frechet.load_statistics(tmp_path / "ref.npz")
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  assert (n, name) == (123, "glide_shapes/size64 validation")
  np.savez(tmp_path / "bad.npz", mean=mu)
  with pytest.raises(KeyError, match="bad.npz"):
    frechet.load_statistics(tmp_path / "bad.npz")
  with pytest.raises(ValueError, match="sigma2"):
    frechet.frechet_distance(mu, sigma, mu, sigma[:3, :3])
  with pytest.raises(ValueError, match="at least 2"):
    frechet.feature_statistics(np.zeros((1, 4)))


def _pr_brute_force(real, fake, k):
  def radii(x):
    out = []
    for i in range(len(x)):
      d = sorted(float(np.sum((x[i] - x[j]) ** 2)) for j in range(len(x)) if j != i)
      out.append(d[k - 1])
    return out

  def cover(points, centres, r):
    return np.mean([any(np.sum((p - c) ** 2) <= rc for c, rc in zip(centres, r)) for p in points])
  return cover(fake, real, radii(real)), cover(real, fake, radii(fake))


def test_precision_recall_against_brute_force():
  from glide_jax.eval.precision_recall import precision_recall

  rng = np.random.default_rng(6)
  real = rng.normal(size=(40, 3))
  fake = rng.normal(size=(30, 3)) * 0.5 + np.array([1.0, 0, 0])  # narrower, shifted: precise, low recall
  got = precision_recall(real, fake, k=3, batch=7)
  p, r = _pr_brute_force(real, fake, 3)
  assert got["precision"] == pytest.approx(p) and got["recall"] == pytest.approx(r)
  assert got["precision"] > got["recall"]
  assert (got["k"], got["n_real"], got["n_fake"]) == (3, 40, 30)
  same = precision_recall(real, real.copy(), k=3)
  assert same["precision"] == 1.0 and same["recall"] == 1.0
  far = precision_recall(real, fake + 100.0, k=3)
  assert far["precision"] == 0.0 and far["recall"] == 0.0
  with pytest.raises(ValueError, match="k=40"):
    precision_recall(real, fake, k=40)
