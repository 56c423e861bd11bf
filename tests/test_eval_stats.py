"""ogpsa_jax.eval.stats against published values and hand computations, and the paired
comparisons built on it (ogpsa_jax.experiment.compare)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from ogpsa_jax.eval import stats
from ogpsa_jax.experiment.compare import demo_pairs, paired_comparisons


@pytest.mark.parametrize(
    "k, n, low, high",
    [  # Newcombe (1998), Statistics in Medicine 17:857, method 3 (Wilson score)
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_published_values(k, n, low, high):
    lo, hi = stats.wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=5e-5) and hi == pytest.approx(high, abs=5e-5)


def test_wilson_interval_formula_and_edges():
    # the closed form by hand at z = 1.959964 (k = 3, n = 10)
    z, p, n = 1.959963984540054, 0.3, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert stats.wilson_interval(3, 10) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert stats.wilson_interval(10, 10)[1] == 1.0 and stats.wilson_interval(0, 0) == (0.0, 1.0)
    lo90, hi90 = stats.wilson_interval(3, 10, confidence=0.90)
    lo95, hi95 = stats.wilson_interval(3, 10)
    assert lo95 < lo90 < 0.3 < hi90 < hi95  # narrower at lower confidence
    with pytest.raises(ValueError, match="successes <= n"):
        stats.wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        stats.wilson_interval(1, 10, confidence=1.0)


def test_rate_summary_and_binary_check():
    s = stats.rate_summary([True, False, True, True])
    assert s["rate"] == 0.75 and s["n"] == 4 and s["ci"] == list(stats.wilson_interval(3, 4))
    assert math.isnan(stats.rate_summary([])["rate"])
    with pytest.raises(ValueError, match="0/1"):
        stats.rate_summary([0.5, 1.0])


def test_cohen_kappa_known_values():
    # Wikipedia's worked example: 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no -> 0.4
    a = [1] * 25 + [0] * 25
    b = [1] * 20 + [0] * 5 + [1] * 10 + [0] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert stats.cohen_kappa(a, a) == 1.0
    assert stats.cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equal non-empty"):
        stats.cohen_kappa([1, 0], [1])


def test_mcnemar_exact_hand_values():
    # discordant 1 vs 5: p = 2 * (C(6,0) + C(6,1)) / 2^6 = 14/64
    a = [1, 0, 0, 0, 0, 0, 1, 0]
    b = [0, 1, 1, 1, 1, 1, 1, 0]
    res = stats.mcnemar_exact(a, b)
    assert (res["n01"], res["n10"], res["n"]) == (5, 1, 8)
    assert res["p_value"] == pytest.approx(14 / 64, abs=1e-15)
    # 0 vs 10 discordant: 2 / 2^10; symmetric in the order of the models
    res = stats.mcnemar_exact([0] * 10, [1] * 10)
    assert (
        res["p_value"]
        == pytest.approx(2 / 1024)
        == stats.mcnemar_exact([1] * 10, [0] * 10)["p_value"]
    )
    assert stats.mcnemar_exact([1, 0], [1, 0])["p_value"] == 1.0  # no discordant pair
    assert stats.mcnemar_exact([1, 0, 1], [0, 1, 1])["p_value"] == 1.0  # capped at 1
    with pytest.raises(ValueError, match="equal lengths"):
        stats.mcnemar_exact([1], [1, 0])


def test_bootstrap_intervals_reproducible_and_sane():
    rng = np.random.default_rng(7)
    x = rng.normal(2.0, 1.0, size=400)
    lo, hi = stats.bootstrap_interval(x, seed=3)
    assert (lo, hi) == stats.bootstrap_interval(x, seed=3)  # seeded
    se = x.std(ddof=1) / math.sqrt(x.size)
    # the percentile interval of a mean is close to mean +- 1.96 s.e. for a normal sample
    assert lo == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert hi == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)
    ratio = lambda a: a[:, 0].sum() / a[:, 1].sum()
    pairs = np.stack([rng.uniform(1, 3, 50) * 10, np.full(50, 10.0)], axis=1)
    rlo, rhi = stats.bootstrap_interval(pairs, ratio)
    assert rlo <= ratio(pairs) <= rhi
    glo, ghi = stats.mean_of_rates_interval([[1] * 30 + [0] * 10, [0] * 30 + [1] * 10])
    assert glo < 0.5 < ghi and ghi - glo < 0.3
    with pytest.raises(ValueError, match="non-empty"):
        stats.bootstrap_interval([])


def test_paired_bootstrap_and_compare():
    a = np.array([0.0] * 30 + [1.0] * 10)
    b = np.array([1.0] * 30 + [1.0] * 10)  # b better on 30 items
    res = stats.paired_bootstrap(a, b)
    assert res["diff"] == pytest.approx(0.75) and res["ci"][0] > 0.5
    assert res["p_value"] == pytest.approx(1 / 2000)  # no resample crosses zero
    cmp = stats.compare_paired(a, b)
    assert cmp["test"] == "mcnemar-exact" and cmp["p_value"] == pytest.approx(2 / 2**30)
    cont = stats.compare_paired([1.2, 0.8, 1.0], [1.3, 0.9, 1.0])
    assert cont["test"] == "paired-bootstrap" and cont["diff"] == pytest.approx(0.2 / 3)
    assert stats.paired_bootstrap([1.0, 2.0], [1.0, 2.0])["p_value"] == 1.0


def test_paired_comparisons_of_runs():
    outcomes = {
        "start:none": {"safety": [0] * 20, "drift": [0.6] * 5, "choice": {"piqa": [1, 0, 1]}},
        "naive:sft": {
            "safety": [1] * 15 + [0] * 5,
            "drift": [0.9] * 5,
            "choice": {"piqa": [1] * 3},
        },
        "ogpsa:sft": {
            "safety": [1] * 14 + [0] * 6,
            "drift": [0.8] * 5,
            "choice": {"piqa": [1] * 3},
        },
    }
    pairs = demo_pairs(outcomes)
    assert pairs == [
        ("start:none", "naive:sft"),
        ("start:none", "ogpsa:sft"),
        ("naive:sft", "ogpsa:sft"),
    ]
    rows = {(r["a"], r["b"], r["metric"]): r for r in paired_comparisons(outcomes, pairs)}
    s = rows[("start:none", "naive:sft", "safety")]
    assert s["diff"] == pytest.approx(0.75) and s["p_value"] == pytest.approx(2 / 2**15)
    d = rows[("naive:sft", "ogpsa:sft", "drift")]
    assert d["test"] == "paired-bootstrap" and d["diff"] == pytest.approx(-0.1)
    assert rows[("start:none", "naive:sft", "choice")]["diff"] == pytest.approx(1 / 3)
    assert ("start:none", "naive:sft", "choice:piqa") in rows
    with pytest.raises(ValueError, match="items"):
        paired_comparisons({"a": {"safety": [1]}, "b": {"safety": [1, 0]}}, [("a", "b")])
