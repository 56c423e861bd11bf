"""Paired comparisons of evaluated models: which differences are larger than the noise.

Two models evaluated on the same items are compared item by item with
:func:`ogpsa_jax.eval.stats.compare_paired` (exact McNemar for 0/1 outcomes, a paired bootstrap
for per-prompt drift NLL). The per-item outcomes are ``evaluate_alignment(...)["outcomes"]``,
keyed here by a run label such as ``"naive:sft"``.

Example:
    >>> outcomes = {"start:none": {"safety": [0, 0, 0, 0]}, "naive:sft": {"safety": [1, 1, 1, 0]}}
    >>> [(r["metric"], r["diff"], r["p_value"]) for r in paired_comparisons(
    ...     outcomes, [("start:none", "naive:sft")])]
    [('safety', 0.75, 0.25)]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ogpsa_jax.eval.stats import compare_paired

START = "start:none"


def _metrics(outcomes: Mapping[str, Any]) -> dict[str, list]:
    """Flat metric -> per-item list; choice tasks as ``choice:<task>`` and pooled ``choice``."""
    flat = {k: list(v) for k, v in outcomes.items() if k != "choice" and v is not None}
    choice = outcomes.get("choice") or {}
    for task, values in choice.items():
        flat[f"choice:{task}"] = list(values)
    if choice:
        flat["choice"] = [x for task in sorted(choice) for x in choice[task]]
    return flat


def demo_pairs(labels: Sequence[str]) -> list[tuple[str, str]]:
    """Which runs to compare: every run against the start, and within each pipeline the naive
    run against every other trained method.

    Args:
      labels: run labels ``method:pipeline[:alpha]`` (the start is ``start:none``).

    Returns:
      (a, b) pairs; each comparison reports b - a.

    Example:
      >>> demo_pairs(["start:none", "naive:sft", "ogpsa:sft"])
      [('start:none', 'naive:sft'), ('start:none', 'ogpsa:sft'), ('naive:sft', 'ogpsa:sft')]
    """
    labels = list(labels)
    pairs = [(START, b) for b in labels if b != START and START in labels]
    for b in labels:
        method, _, rest = b.partition(":")
        if method in ("start", "naive", "weight-avg") or ":" in rest:
            continue
        naive = f"naive:{rest}"
        if naive in labels:
            pairs.append((naive, b))
    return pairs


def paired_comparisons(
    outcomes: Mapping[str, Mapping[str, Any]],
    pairs: Sequence[tuple[str, str]],
    *,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparisons of run pairs on every metric both have per-item outcomes for.

    Args:
      outcomes: run label -> ``evaluate_alignment(...)["outcomes"]``.
      pairs: (a, b) run labels.
      seed: bootstrap seed.

    Returns:
      Rows ``{a, b, metric, n, diff (= mean b - mean a), ci, p_value, test}``.
    """
    rows = []
    for a, b in pairs:
        if a not in outcomes or b not in outcomes:
            raise ValueError(f"no outcomes for {a if a not in outcomes else b!r}")
        ma, mb = _metrics(outcomes[a]), _metrics(outcomes[b])
        for metric in [m for m in ma if m in mb]:
            if len(ma[metric]) != len(mb[metric]):
                raise ValueError(
                    f"{metric}: {a} has {len(ma[metric])} items but {b} {len(mb[metric])}"
                )
            if not ma[metric]:
                continue
            res = compare_paired(ma[metric], mb[metric], seed=seed)
            rows.append({"a": a, "b": b, "metric": metric, **res})
    return rows
