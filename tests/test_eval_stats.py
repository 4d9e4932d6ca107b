"""Intervals and paired tests for caption accuracies, against exact sums, closed forms and simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from glide_jax.eval import stats


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (57, 200), (1990, 2000)])
def test_wilson_interval_solves_its_defining_inequality(k, n):
  """The Wilson interval is {p : |k/n - p| <= z sqrt(p (1 - p) / n)}; find its ends by bisection."""
  z = 1.959963984540054
  lo, hi = stats.wilson_interval(k, n)
  phat = k / n

  def inside(p):
    return abs(phat - p) <= z * math.sqrt(p * (1 - p) / n)

  def edge(a, b):  # a inside, b outside
    for _ in range(100):
      m = (a + b) / 2
      a, b = (m, b) if inside(m) else (a, m)
    return a

  want_lo = 0.0 if inside(0.0) or phat == 0 else edge(phat, 0.0)
  want_hi = 1.0 if inside(1.0) or phat == 1 else edge(phat, 1.0)
  assert lo == pytest.approx(want_lo, abs=1e-9) and hi == pytest.approx(want_hi, abs=1e-9)
  assert lo <= phat <= hi


def test_wilson_interval_known_value_and_errors():
  # 0 of 10 at 95 %: upper end z^2 / (n + z^2) = 0.2775 (the textbook value).
  z2 = 1.959963984540054 ** 2
  assert stats.wilson_interval(0, 10)[1] == pytest.approx(z2 / (10 + z2))
  assert stats.wilson_interval(5, 10, confidence=0.99)[1] > stats.wilson_interval(5, 10)[1]
  with pytest.raises(ValueError, match="k=11, n=10"):
    stats.wilson_interval(11, 10)
  with pytest.raises(ValueError, match="confidence"):
    stats.wilson_interval(1, 10, confidence=1.5)


@pytest.mark.parametrize("k,n", [(0, 0), (0, 5), (2, 5), (3, 7), (40, 100), (61, 100), (480, 1000), (3, 2000)])
def test_binomial_p_value_is_the_exact_tail(k, n):
  """For a fair coin the two-sided p-value is 2 P(X <= min(k, n - k)), at most 1: summed here in
  exact rational arithmetic."""
  from fractions import Fraction

  m = min(k, n - k)
  want = min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(m + 1)), 2 ** n))
  assert stats.binomial_two_sided_p(k, n) == pytest.approx(float(want), rel=1e-9, abs=1e-300)


def test_paired_comparison_counts_and_mcnemar():
  a = np.array([1, 1, 1, 0, 0, 0, 1, 0, 1, 1], bool)
  b = np.array([1, 0, 1, 1, 1, 1, 1, 0, 1, 1], bool)
  c = stats.paired_comparison(a, b)
  assert (c["only_a"], c["only_b"], c["both"], c["neither"]) == (1, 3, 5, 1)
  assert c["diff"] == pytest.approx(0.2) and c["acc_b"] - c["acc_a"] == pytest.approx(0.2)
  assert c["p_value"] == pytest.approx(0.625)  # 2 P(X <= 1), X ~ Bin(4, 1/2) = 2 * 5/16
  assert c["ci"][0] < 0.2 < c["ci"][1]
  same = stats.paired_comparison(a, a)
  assert same["diff"] == 0 and same["p_value"] == 1.0
  with pytest.raises(ValueError, match="10 samples against 3"):
    stats.paired_comparison(a, b[:3])


def test_paired_interval_covers_the_true_difference_at_its_level():
  """Simulated paired samples with known cell probabilities: the 95 % interval must cover the true
  difference about 95 % of the time, and the McNemar test must reject a true null about 5 % or less."""
  rng = np.random.default_rng(0)
  n, reps = 200, 1500
  # P(right in a only) = 0.10, P(right in b only) = 0.14, both 0.5, neither 0.26 -> diff 0.04.
  probs = np.array([0.10, 0.14, 0.50, 0.26])
  covered = rejected_null = 0
  for _ in range(reps):
    cell = rng.choice(4, size=n, p=probs)
    a, b = np.isin(cell, (0, 2)), np.isin(cell, (1, 2))
    lo, hi = stats.paired_comparison(a, b)["ci"]
    covered += lo <= 0.04 <= hi
    cell0 = rng.choice(4, size=n, p=[0.12, 0.12, 0.5, 0.26])  # no difference
    rejected_null += stats.paired_comparison(np.isin(cell0, (0, 2)), np.isin(cell0, (1, 2)))["p_value"] < 0.05
  assert 0.93 <= covered / reps <= 0.97
  assert rejected_null / reps <= 0.065
