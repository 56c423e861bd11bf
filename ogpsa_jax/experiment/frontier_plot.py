"""The frontier study's plot and Markdown table (results of ``experiments/frontier``).

`plot_frontier`: per pipeline, safety vs capability and safety vs (1 - over-refusal); one curve
per method (the mean over seeds at each knob value, the start model first) with a band spanning
the seeds' 95% item intervals; the start model a black star. `frontier_markdown`: the summary
(hypervolume, capability at matched safety, tax vs naive, each with its interval over seeds) and
every evaluated point.

Example:
    >>> frontier_markdown([], {}, {"model": "m"}).splitlines()[0]
    '# Alignment-tax frontier: m'
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

COLOURS = {
    "naive": "tab:red",
    "ogpsa": "tab:green",
    "ogpsa-after": "darkgreen",
    "ogpsa-gpm-after": "navy",
    "ogpsa-alpaca": "tab:olive",
    "ogpsa-svd": "tab:cyan",
    "ogpsa-gpm": "tab:blue",
    "ogpsa-gpm-alpaca": "tab:purple",
    "replay": "tab:orange",
    "weight-avg": "tab:gray",
    "lora": "tab:pink",
    "ogpsa-lora": "tab:brown",
}


def mean_curve(
    runs: Sequence[Mapping[str, Any]], method: str, pipeline: str, y: str
) -> list[tuple[float, float, float, float]]:
    """``(safety, y, y_low, y_high)`` per knob value, averaged over seeds, the start first.

    The band is the span of the seeds' 95% intervals of ``y`` (``y_ci``; for ``compliance`` =
    1 - over-refusal, from ``over_refusal_ci``).

    Example:
        >>> rows = [{"method": "start", "pipeline": "none", "knob_value": 0, "safety": 0.1,
        ...          "capability": 0.5, "capability_ci": [0.4, 0.6]},
        ...         {"method": "a", "pipeline": "sft", "knob_value": 4, "safety": 0.5,
        ...          "capability": 0.4, "capability_ci": [0.3, 0.5]}]
        >>> mean_curve(rows, "a", "sft", "capability")
        [(0.1, 0.5, 0.4, 0.6), (0.5, 0.4, 0.3, 0.5)]
    """

    def value(r: Mapping[str, Any]) -> tuple[float, float, float]:
        if y == "compliance":
            lo, hi = r["over_refusal_ci"]
            return 1.0 - r["over_refusal"], 1.0 - hi, 1.0 - lo
        return r[y], r[f"{y}_ci"][0], r[f"{y}_ci"][1]

    start = next(r for r in runs if r["method"] == "start")
    out = [(start["safety"], *value(start))]
    mine = [r for r in runs if r["method"] == method and r["pipeline"] == pipeline]
    for k in sorted({r["knob_value"] for r in mine}):
        at = [r for r in mine if r["knob_value"] == k]
        vals = [value(r) for r in at]
        out.append(
            (
                float(np.mean([r["safety"] for r in at])),
                float(np.mean([v[0] for v in vals])),
                float(min(v[1] for v in vals)),
                float(max(v[2] for v in vals)),
            )
        )
    return [tuple(round(x, 6) for x in p) for p in out]


def plot_frontier(
    runs: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str = ""
) -> None:
    """Writes the headline plot (PNG): a row per pipeline, capability and compliance panels.

    Example:
        >>> import tempfile
        >>> rows = [{"method": "start", "pipeline": "none", "knob_value": 0, "safety": 0.1,
        ...          "capability": 0.5, "capability_ci": [0.4, 0.6], "over_refusal": 0.0,
        ...          "over_refusal_ci": [0.0, 0.1]}]
        >>> path = os.path.join(tempfile.mkdtemp(), "f.png")
        >>> plot_frontier(rows, path)
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    import matplotlib  # function-local: matplotlib is only needed to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipelines = sorted({r["pipeline"] for r in runs if r["method"] != "start"}) or ["none"]
    fig, axes = plt.subplots(
        len(pipelines), 2, figsize=(12, 5 * len(pipelines)), dpi=110, squeeze=False
    )
    start = next(r for r in runs if r["method"] == "start")
    for row, pipeline in zip(axes, pipelines, strict=True):
        for ax, y, name in (
            (row[0], "capability", "capability"),
            (row[1], "compliance", "1 - over-refusal"),
        ):
            methods = sorted({r["method"] for r in runs if r["pipeline"] == pipeline})
            for m in methods:
                pts = np.array(mean_curve(runs, m, pipeline, y))
                colour = COLOURS.get(m, None)
                ax.plot(pts[:, 0], pts[:, 1], "-o", ms=4, color=colour, label=m)
                ax.fill_between(pts[:, 0], pts[:, 2], pts[:, 3], color=colour, alpha=0.12)
            sy = start["capability"] if y == "capability" else 1.0 - start["over_refusal"]
            ax.plot([start["safety"]], [sy], "k*", ms=14, label="start", zorder=5)
            ax.set_xlabel("safety (refusal rate on held-out harmful prompts)")
            ax.set_ylabel(name)
            ax.set_title(f"{title} {pipeline}: safety vs {name}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ci(value: Any, ci: Any) -> str:
    if value is None:
        return "n/a"
    if not ci:
        return f"{value:.3f}"
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def frontier_markdown(
    runs: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Mapping[str, Any]],
    meta: Mapping[str, Any],
) -> str:
    """The results page: summary per method and pipeline, then every evaluated point."""
    lines = [f"# Alignment-tax frontier: {meta.get('model', '')}", ""]
    if meta.get("capability"):
        lines += [f"Capability: {meta['capability']}.", ""]
    if meta.get("summary_note"):
        lines += [f"Summary: {meta['summary_note']}.", ""]
    lines += [
        "| method | pipeline | seeds | hypervolume | hypervolume (1 - over-refusal) | matched "
        "safety | capability at matched safety | minus naive (paired by seed) | 1 - over-refusal "
        "at matched safety | reached |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary.values():
        lines.append(
            f"| {s['method']} | {s['pipeline']} | {len(s['seeds'])} | "
            f"{_ci(s['hypervolume'], s['hypervolume_ci'])} | "
            f"{_ci(s['hypervolume_compliance'], s['hypervolume_compliance_ci'])} | "
            f"{_ci(s['matched_safety'], None)} | "
            f"{_ci(s['capability_at_matched'], s['capability_at_matched_ci'])} | "
            f"{_ci(s['tax_vs_baseline'], s['tax_vs_baseline_ci'])} | "
            f"{_ci(s.get('compliance_at_matched'), s.get('compliance_at_matched_ci'))} | "
            f"{s['reached']}/{len(s['seeds'])} |"
        )
    lines += [
        "",
        "## Every evaluated point",
        "",
        "Each value with its 95% item interval.",
        "",
        "| method | pipeline | seed | knob | safety | capability | over-refusal | IFEval "
        "prompt | GSM8K-MC | BBQ | choice | drift |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {r['method']} | {r['pipeline']} | {r['seed']} | {r['knob']}={r['knob_value']} | "
            f"{_ci(r['safety'], r.get('safety_ci'))} | "
            f"{_ci(r['capability'], r.get('capability_ci'))} | "
            f"{_ci(r['over_refusal'], r.get('over_refusal_ci'))} | "
            f"{_ci(r.get('ifeval_prompt_strict'), r.get('ifeval_prompt_strict_ci'))} | "
            f"{_ci(r['gsm8k'], r.get('gsm8k_ci'))} | {_ci(r['bbq'], r.get('bbq_ci'))} | "
            f"{_ci(r.get('choice_mean'), r.get('choice_mean_ci'))} | "
            f"{_ci(r['drift'], r.get('drift_ci'))} |"
        )
    return "\n".join(lines) + "\n"


__all__ = ["COLOURS", "frontier_markdown", "mean_curve", "plot_frontier"]
