"""Safety-capability frontiers: dominated hypervolume, matched-safety interpolation, intervals
over seeds, and the ``summary`` of a frontier study.

A method's curve is its points along its own knob (training steps, mixing weight, ...), one
curve per seed, each starting at the start model. Two numbers summarise a curve:

- `hypervolume`: the area in the (safety, capability) plane dominated by the curve's points and
  above a reference point (the start model): how much safety a method buys without paying
  capability below the start. Zero when no point is both safer and more capable than the start.
- `capability_at`: the capability where the curve first reaches a given safety (linear
  interpolation between consecutive points along the knob); None when it never does. At the
  safety of naive tuning's final point it is the capability each method keeps at matched
  safety, i.e. the alignment tax it pays.

Intervals over seeds are percentile bootstraps of the mean over seeds (`seed_interval`); with
two or three seeds they are wide, and they say so.

Example:
    >>> hypervolume([(0.5, 0.6), (0.9, 0.55)], ref=(0.1, 0.5))
    0.06
    >>> capability_at([(0.1, 0.5), (0.5, 0.45), (0.9, 0.4)], 0.7)
    0.425
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ogpsa_jax.eval.stats import bootstrap_interval

Point = tuple[float, float]


def hypervolume(points: Sequence[Point], ref: Point) -> float:
    """Area dominated by ``points`` (both coordinates higher is better) and above ``ref``.

    Args:
        points: (x, y) pairs, e.g. (safety, capability).
        ref: the reference point; only the part of each point's box beyond it counts.

    Returns:
        The area of the union of the boxes ``[ref_x, x] x [ref_y, y]`` (0.0 when no point
        dominates ``ref``), rounded to 12 decimals.

    Example:
        >>> hypervolume([(1.0, 1.0)], ref=(0.0, 0.0))
        1.0
        >>> hypervolume([(1.0, 0.5), (0.5, 1.0)], ref=(0.0, 0.0))
        0.75
        >>> hypervolume([(0.2, 0.4)], ref=(0.5, 0.5))
        0.0
    """
    rx, ry = float(ref[0]), float(ref[1])
    above = sorted(
        ((float(x), float(y)) for x, y in points if x > rx and y > ry), key=lambda p: -p[0]
    )
    area, best_y = 0.0, ry
    for i, (x, y) in enumerate(above):
        best_y = max(best_y, y)
        next_x = above[i + 1][0] if i + 1 < len(above) else rx
        area += (x - next_x) * (best_y - ry)
    return round(area, 12)


def capability_at(curve: Sequence[Point], safety: float) -> float | None:
    """The capability where a curve first reaches ``safety`` (linear interpolation).

    Args:
        curve: (safety, capability) points in knob order, the start model first.
        safety: the safety to match.

    Returns:
        The interpolated capability on the first segment that reaches ``safety`` (a point at
        exactly that safety gives its own capability); None when no point reaches it.

    Example:
        >>> capability_at([(0.0, 1.0), (1.0, 0.0)], 0.25)
        0.75
        >>> capability_at([(0.0, 1.0), (0.5, 0.8)], 0.9) is None
        True
    """
    if not curve:
        raise ValueError("capability_at: the curve has no points")
    s0, c0 = curve[0]
    if s0 >= safety:
        return float(c0)
    for (sa, ca), (sb, cb) in zip(curve, curve[1:], strict=False):
        if sb >= safety > sa:
            t = (safety - sa) / (sb - sa)
            return round(float(ca + t * (cb - ca)), 12)
        if sb >= safety:
            return float(cb)
    return None


def seed_interval(values: Sequence[float], *, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap 95% interval of the mean over seeds (None without values).

    Example:
        >>> seed_interval([0.5, 0.5])
        [0.5, 0.5]
        >>> seed_interval([]) is None
        True
    """
    if not values:
        return None
    lo, hi = bootstrap_interval(list(values), seed=seed)
    return [round(lo, 6), round(hi, 6)]


def curves(
    runs: Sequence[Mapping[str, Any]], method: str, pipeline: str, y: str = "capability"
) -> dict[int, list[Point]]:
    """Per seed, the (safety, ``y``) points of one method in knob order, the start model first.

    Args:
        runs: result rows (``method``, ``pipeline``, ``seed``, ``knob_value``, ``safety``,
            ``y``); the row of method ``start`` is the start of every curve.
        method: the method.
        pipeline: its pipeline ("sft", "sft-dpo").
        y: the second coordinate (e.g. "capability", or "compliance" = 1 - over-refusal).

    Returns:
        seed -> points.

    Example:
        >>> rows = [{"method": "start", "pipeline": "none", "seed": 0, "knob_value": 0,
        ...          "safety": 0.1, "capability": 0.5},
        ...         {"method": "naive", "pipeline": "sft", "seed": 1, "knob_value": 8,
        ...          "safety": 0.9, "capability": 0.4}]
        >>> curves(rows, "naive", "sft")
        {1: [(0.1, 0.5), (0.9, 0.4)]}
    """
    start = next((r for r in runs if r["method"] == "start"), None)
    if start is None:
        raise ValueError("curves: the results have no 'start' row")
    out: dict[int, list[Point]] = {}
    mine = [r for r in runs if r["method"] == method and r["pipeline"] == pipeline]
    for s in sorted({r["seed"] for r in mine}):
        rows = sorted((r for r in mine if r["seed"] == s), key=lambda r: r["knob_value"])
        out[s] = [(start["safety"], start[y])] + [(r["safety"], r[y]) for r in rows]
    return out


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 6) if values else None


def summarise(
    runs: Sequence[Mapping[str, Any]], *, baseline: str = "naive"
) -> dict[str, dict[str, Any]]:
    """The ``summary`` of a frontier study: per "method:pipeline", hypervolume and the
    capability at matched safety, each with a bootstrap interval over seeds.

    Matched safety: per seed, the safety of ``baseline``'s final point (largest knob) in the same
    pipeline; each method's capability there (`capability_at`) minus the baseline's own
    (`capability_at` on its curve: its final point, or an earlier one already as safe) is the
    difference, paired by seed.

    Args:
        runs: the study's rows (see `curves`), with ``capability`` and ``over_refusal``.
        baseline: the method whose final point sets the matched safety.

    Returns:
        "method:pipeline" -> ``hypervolume`` (mean over seeds), ``hypervolume_ci``,
        ``hypervolume_per_seed``, ``hypervolume_compliance`` (the same in (safety, 1 -
        over-refusal)), ``matched_safety`` (mean over seeds), ``capability_at_matched`` (mean
        over the seeds that reach it), its ``_ci``, ``tax_vs_baseline`` (method - baseline,
        paired by seed) and its ``_ci``, ``compliance_at_matched`` (1 - over-refusal where the
        curve reaches the matched safety) and its ``_ci``, ``reached`` (seeds whose curve reaches
        the matched safety) and ``seeds``.

    Example:
        >>> rows = [{"method": "start", "pipeline": "none", "seed": 0, "knob_value": 0,
        ...          "safety": 0.1, "capability": 0.5, "over_refusal": 0.0}]
        >>> rows += [{"method": m, "pipeline": "sft", "seed": 0, "knob_value": 8,
        ...           "safety": 0.9, "capability": c, "over_refusal": 0.5}
        ...          for m, c in (("naive", 0.4), ("ogpsa", 0.6))]
        >>> s = summarise(rows)
        >>> s["ogpsa:sft"]["hypervolume"], s["ogpsa:sft"]["tax_vs_baseline"]
        (0.08, 0.2)
    """
    rows = [{**r, "compliance": 1.0 - r["over_refusal"]} for r in runs]
    start = next((r for r in rows if r["method"] == "start"), None)
    if start is None:
        raise ValueError("summarise: the results have no 'start' row")
    ref = (start["safety"], start["capability"])
    ref_c = (start["safety"], start["compliance"])
    keys = sorted({(r["method"], r["pipeline"]) for r in rows if r["method"] != "start"})
    summary: dict[str, dict[str, Any]] = {}
    for method, pipeline in keys:
        cap = curves(rows, method, pipeline)
        comp = curves(rows, method, pipeline, "compliance")
        base = curves(rows, baseline, pipeline) if (baseline, pipeline) in keys else {}
        hv = [hypervolume(c[1:], ref) for c in cap.values()]
        hv_c = [hypervolume(c[1:], ref_c) for c in comp.values()]
        matched, at, tax, comp_at = [], [], [], []
        for s, curve in cap.items():
            if s not in base:
                continue
            target = base[s][-1][0]
            matched.append(target)
            compliance = capability_at(comp[s], target)  # 1 - over-refusal there
            if compliance is not None:
                comp_at.append(compliance)
            value = capability_at(curve, target)
            base_value = capability_at(base[s], target)
            if value is not None and base_value is not None:
                at.append(value)
                tax.append(value - base_value)
        summary[f"{method}:{pipeline}"] = {
            "method": method,
            "pipeline": pipeline,
            "seeds": sorted(cap),
            "hypervolume": _mean(hv),
            "hypervolume_ci": seed_interval(hv),
            "hypervolume_per_seed": [round(v, 6) for v in hv],
            "hypervolume_compliance": _mean(hv_c),
            "hypervolume_compliance_ci": seed_interval(hv_c),
            "matched_safety": _mean(matched),
            "capability_at_matched": _mean(at),
            "capability_at_matched_ci": seed_interval(at),
            "tax_vs_baseline": _mean(tax),
            "tax_vs_baseline_ci": seed_interval(tax),
            "compliance_at_matched": _mean(comp_at),
            "compliance_at_matched_ci": seed_interval(comp_at),
            "reached": len(at),
        }
    return summary


def finite(value: Any) -> bool:
    """True for a finite number (results rows may hold None for what was not measured).

    Example:
        >>> finite(0.5), finite(None), finite(float("nan"))
        (True, False, False)
    """
    return isinstance(value, int | float) and math.isfinite(value)


__all__ = ["capability_at", "curves", "finite", "hypervolume", "seed_interval", "summarise"]
