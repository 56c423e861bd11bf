"""Uncertainty of evaluation numbers: intervals for rates and means, paired comparisons, kappa.

Every rate an evaluator reports comes with a 95% interval, and two models measured on the same
items are compared item by item (a paired test), which is far more sensitive than comparing two
intervals. Only NumPy and the standard library are used.

- :func:`wilson_interval`: the Wilson score interval of a binomial proportion (Wilson 1927;
  method 3 of Newcombe 1998): well behaved at 0 and 1 and for small n, unlike rate +- 1.96 s.e.
- :func:`rate_summary`: rate, Wilson interval and n of a list of 0/1 outcomes.
- :func:`bootstrap_interval`: percentile bootstrap interval of a mean (or another statistic)
  of per-item values, e.g. a mean NLL; :func:`mean_of_rates_interval`: the same, stratified,
  for a mean of several sets' rates.
- :func:`mcnemar_exact`: exact McNemar test of two models' 0/1 outcomes on the same items (a
  two-sided binomial test on the discordant pairs).
- :func:`paired_bootstrap`: difference of means of paired per-item values with a percentile
  bootstrap interval and a two-sided bootstrap p-value.
- :func:`compare_paired`: the comparison the reports use: McNemar for 0/1 outcomes, the paired
  bootstrap for both kinds.
- :func:`cohen_kappa`: chance-corrected agreement of two binary raters.

Example:
    >>> lo, hi = wilson_interval(81, 263)  # Newcombe (1998): 0.2553 to 0.3662
    >>> round(lo, 4), round(hi, 4)
    (0.2553, 0.3662)
    >>> mcnemar_exact([1, 1, 1, 0, 0], [0, 0, 0, 0, 0])["p_value"]  # 3 vs 0 discordant: 2/8
    0.25
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    return statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion.

    Args:
      successes: number of successes (0 <= successes <= n).
      n: number of trials; n = 0 gives (0.0, 1.0), the interval that says nothing.
      confidence: coverage, e.g. 0.95.

    Returns:
      (low, high), within [0, 1].

    Example:
      >>> [round(x, 4) for x in wilson_interval(0, 20)]  # Newcombe (1998): 0 to 0.1611
      [0.0, 0.1611]
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _binary(values: Sequence[Any], name: str) -> np.ndarray:
    arr = np.asarray([float(v) for v in values])
    if arr.size and not np.all((arr == 0.0) | (arr == 1.0)):
        raise ValueError(f"{name} must hold 0/1 (or bool) outcomes")
    return arr


def rate_summary(outcomes: Sequence[Any], confidence: float = 0.95) -> dict[str, Any]:
    """Rate, Wilson interval and count of 0/1 outcomes.

    Args:
      outcomes: per-item 0/1 (or bool) results.
      confidence: interval coverage.

    Returns:
      dict(rate (nan when empty), ci = [low, high], n).

    Example:
      >>> rate_summary([True, False, True, True])["rate"]
      0.75
    """
    arr = _binary(outcomes, "outcomes")
    k, n = int(arr.sum()), int(arr.size)
    lo, hi = wilson_interval(k, n, confidence)
    return {"rate": k / n if n else float("nan"), "ci": [lo, hi], "n": n}


def bootstrap_interval(
    values: Sequence[Any],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over per-item values.

    Args:
      values: per-item numbers (at least one), or an [n, k] array whose rows are resampled
        together (e.g. per-prompt NLL sums and token counts, for a ratio of sums).
      statistic: maps a resampled array to a number (default: the mean).
      n_resamples: bootstrap resamples.
      confidence: interval coverage.
      seed: resampling seed (the interval is reproducible).

    Returns:
      (low, high).

    Example:
      >>> bootstrap_interval([1.0, 1.0, 1.0])
      (1.0, 1.0)
      >>> ratio = lambda a: a[:, 0].sum() / a[:, 1].sum()  # e.g. NLL per token
      >>> bootstrap_interval([[2.0, 1.0], [4.0, 2.0]], ratio)
      (2.0, 2.0)
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim not in (1, 2) or arr.shape[0] == 0:
        raise ValueError(f"values must be a non-empty 1-D or 2-D array, got shape {arr.shape}")
    _z(confidence)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, arr.shape[0], size=(n_resamples, arr.shape[0]))
    stats = np.array([statistic(arr[row]) for row in idx])
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(stats, alpha)), float(np.quantile(stats, 1.0 - alpha))


def mean_of_rates_interval(
    groups: Sequence[Sequence[Any]],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Stratified bootstrap interval of the mean of several sets' mean outcomes.

    Each set is resampled on its own (its size kept), e.g. "capability" = the mean of GSM8K and
    BBQ accuracy.

    Args:
      groups: per-item outcomes of each set (each non-empty).
      n_resamples: bootstrap resamples.
      confidence: interval coverage.
      seed: resampling seed.

    Returns:
      (low, high).

    Example:
      >>> mean_of_rates_interval([[1, 1], [0, 0, 0]])
      (0.5, 0.5)
    """
    arrays = [np.asarray(g, np.float64) for g in groups]
    if not arrays or any(a.ndim != 1 or a.size == 0 for a in arrays):
        raise ValueError("groups must be non-empty 1-D sequences")
    _z(confidence)
    rng = np.random.default_rng(seed)
    means = np.mean(
        [a[rng.integers(0, a.size, size=(n_resamples, a.size))].mean(axis=1) for a in arrays],
        axis=0,
    )
    alpha = (1.0 - confidence) / 2.0
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))


def mcnemar_exact(a: Sequence[Any], b: Sequence[Any]) -> dict[str, Any]:
    """Exact McNemar test: do two models' 0/1 outcomes on the same items differ?

    Only the discordant items count: ``n01`` (a = 0, b = 1) and ``n10`` (a = 1, b = 0). Under
    the null each discordant item goes either way with probability 1/2, so the two-sided p-value
    is ``min(1, 2 * P(Binomial(n01 + n10, 1/2) <= min(n01, n10)))``.

    Args:
      a, b: per-item 0/1 outcomes of the two models, same items in the same order.

    Returns:
      dict(n, n01, n10, p_value) -- p_value 1.0 when no item is discordant.

    Example:
      >>> mcnemar_exact([1, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1])["p_value"]  # 1 vs 5: 14/64
      0.21875
    """
    xa, xb = _binary(a, "a"), _binary(b, "b")
    if xa.shape != xb.shape:
        raise ValueError(f"paired outcomes need equal lengths, got {xa.size} and {xb.size}")
    n01 = int(np.sum((xa == 0) & (xb == 1)))
    n10 = int(np.sum((xa == 1) & (xb == 0)))
    m = n01 + n10
    if m == 0:
        p = 1.0
    else:
        tail = sum(math.comb(m, i) for i in range(min(n01, n10) + 1)) / 2.0**m
        p = min(1.0, 2.0 * tail)
    return {"n": int(xa.size), "n01": n01, "n10": n10, "p_value": p}


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean of ``b - a`` over paired items, its bootstrap interval and a two-sided p-value.

    Items are resampled together (the pairing is kept). The p-value is twice the share of
    resampled differences on the far side of zero (at least ``1 / n_resamples`` when the
    difference is not zero; 1.0 when every difference is zero).

    Args:
      a, b: per-item values of the two models (same items, same order).
      n_resamples: bootstrap resamples.
      confidence: interval coverage.
      seed: resampling seed.

    Returns:
      dict(n, diff = mean(b - a), ci = [low, high], p_value).

    Example:
      >>> paired_bootstrap([0, 0, 0, 0], [1, 1, 1, 1])["diff"]
      1.0
    """
    xa, xb = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if xa.shape != xb.shape or xa.ndim != 1 or xa.size == 0:
        raise ValueError(f"paired values need equal non-empty lengths: {xa.shape}, {xb.shape}")
    d = xb - xa
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_resamples, d.size))].mean(axis=1)
    _z(confidence)  # validates it
    alpha = (1.0 - confidence) / 2.0
    diff = float(d.mean())
    if np.all(d == 0):
        p = 1.0
    else:
        far = np.mean(means <= 0) if diff > 0 else np.mean(means >= 0)
        p = float(min(1.0, max(2.0 * far, 1.0 / n_resamples)))
    ci = [float(np.quantile(means, alpha)), float(np.quantile(means, 1.0 - alpha))]
    return {"n": int(d.size), "diff": diff, "ci": ci, "p_value": p}


def compare_paired(a: Sequence[Any], b: Sequence[Any], *, seed: int = 0) -> dict[str, Any]:
    """The paired comparison of two models' per-item results that the reports use.

    0/1 outcomes: the exact McNemar p-value with the paired-bootstrap interval of the rate
    difference; other values (e.g. per-prompt NLL): the paired bootstrap.

    Args:
      a: the first model's per-item results (e.g. the starting model's).
      b: the second model's, same items.
      seed: bootstrap seed.

    Returns:
      dict(n, diff = mean(b) - mean(a), ci, p_value, test: "mcnemar-exact" or
      "paired-bootstrap").

    Example:
      >>> compare_paired([1, 1, 0, 1], [0, 0, 0, 1])["test"]
      'mcnemar-exact'
    """
    boot = paired_bootstrap(a, b, seed=seed)
    values = np.concatenate([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    if np.all((values == 0.0) | (values == 1.0)):
        boot["p_value"] = mcnemar_exact(a, b)["p_value"]
        return {**boot, "test": "mcnemar-exact"}
    return {**boot, "test": "paired-bootstrap"}


def cohen_kappa(a: Sequence[Any], b: Sequence[Any]) -> float:
    """Cohen's kappa of two binary raters: (p_o - p_e) / (1 - p_e).

    Args:
      a, b: 0/1 labels of the same items.

    Returns:
      kappa (1.0 when both raters give every item the same single label, p_e = 1).

    Example:
      >>> # 50 items: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> p_o 0.7, p_e 0.5
      >>> cohen_kappa([1] * 25 + [0] * 25, [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15)
      0.4
    """
    xa, xb = _binary(a, "a"), _binary(b, "b")
    if xa.shape != xb.shape or xa.size == 0:
        raise ValueError(f"kappa needs equal non-empty label lists, got {xa.size} and {xb.size}")
    po = float(np.mean(xa == xb))
    pa, pb = float(xa.mean()), float(xb.mean())
    pe = pa * pb + (1 - pa) * (1 - pb)
    if pe == 1.0:
        return 1.0
    return round((po - pe) / (1.0 - pe), 12)
