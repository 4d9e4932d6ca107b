"""Sampling uncertainty of caption accuracies: intervals for one accuracy and paired comparisons.

A guidance sweep samples the same prompts with the same noise at every scale, so two scales'
per-sample results are paired: the comparison uses only the prompts where they disagree (McNemar),
which resolves a difference of a few points far better than two independent intervals would.

  wilson_interval      95 % (or any level) score interval of one accuracy k / n (scipy)
  wilson_intervals     the same for each of several per-sample correctness arrays
  paired_comparison    b vs a on the same samples: difference, its interval (Agresti-Min) and the
                       exact McNemar two-sided p-value (scipy's binomial test)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import NormalDist
from typing import Any

import numpy as np
from scipy import stats as scipy_stats


def _z(confidence: float) -> float:
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a binomial proportion k / n (stays inside [0, 1], sane at k = 0 or n),
  from `scipy.stats.binomtest(k, n).proportion_ci(method='wilson')`."""
  if n <= 0 or not 0 <= k <= n:
    raise ValueError(f"wilson_interval: need 0 <= k <= n and n > 0, got k={k}, n={n}")
  _z(confidence)  # the same check of the level as the paired interval's
  ci = scipy_stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
  p = k / n
  # It always contains p exactly; clamp so rounding (e.g. 3e-17 at k = 0) cannot say otherwise.
  return max(0.0, min(p, float(ci.low))), min(1.0, max(p, float(ci.high)))


def wilson_intervals(correct: Mapping[str, np.ndarray], confidence: float = 0.95) -> dict[str, tuple[float, float]]:
  """{name: bool [N] per-sample correctness} -> {name: Wilson interval of its accuracy}."""
  return {k: wilson_interval(int(np.sum(v)), len(v), confidence) for k, v in correct.items()}


def binomial_two_sided_p(k: int, n: int) -> float:
  """Exact two-sided p-value of k successes in n fair coin flips (`scipy.stats.binomtest`); 1 for n = 0."""
  if n == 0:
    return 1.0
  if not 0 <= k <= n:
    raise ValueError(f"binomial_two_sided_p: need 0 <= k <= n, got k={k}, n={n}")
  return float(scipy_stats.binomtest(int(k), int(n), 0.5, alternative="two-sided").pvalue)


def paired_comparison(a: Sequence[bool] | np.ndarray, b: Sequence[bool] | np.ndarray,
                      confidence: float = 0.95) -> dict[str, Any]:
  """Compares per-sample correctness b against a on the same N samples.

  Returns {'n', 'acc_a', 'acc_b', 'diff' (acc_b - acc_a), 'ci' (interval of diff), 'only_a' (right in
  a only), 'only_b' (right in b only), 'p_value' (exact McNemar: only_b ~ Binomial(only_a + only_b,
  1/2) under no difference)}. The interval is Agresti and Min's (2005): the Wald interval of the
  paired difference after adding 1/2 to each of the four cells, which keeps its coverage near the
  nominal level for small counts.
  """
  a = np.asarray(a, bool).reshape(-1)
  b = np.asarray(b, bool).reshape(-1)
  if a.shape != b.shape:
    raise ValueError(f"paired_comparison: {a.shape[0]} samples against {b.shape[0]}; pairs need equal counts")
  n = int(a.shape[0])
  if n == 0:
    raise ValueError("paired_comparison: no samples")
  only_a = int(np.sum(a & ~b))
  only_b = int(np.sum(b & ~a))
  both = int(np.sum(a & b))
  neither = n - only_a - only_b - both
  # Agresti-Min: +1/2 per cell, so n grows by 2.
  n_adj = n + 2.0
  p12, p21 = (only_a + 0.5) / n_adj, (only_b + 0.5) / n_adj
  d_adj = p21 - p12
  se = math.sqrt(max(0.0, (p12 + p21 - d_adj * d_adj) / n_adj))
  z = _z(confidence)
  return {"n": n, "acc_a": float(np.mean(a)), "acc_b": float(np.mean(b)),
          "diff": (only_b - only_a) / n, "ci": (max(-1.0, d_adj - z * se), min(1.0, d_adj + z * se)),
          "only_a": only_a, "only_b": only_b, "both": both, "neither": neither,
          "p_value": binomial_two_sided_p(only_b, only_a + only_b), "confidence": confidence}


def format_points(x: float) -> str:
  """A fraction as signed percentage points, e.g. +3.5."""
  return f"{100.0 * x:+.1f}"
