"""Results of an alignment-tax experiment: results.json, results.md and pareto.png.

Every run (the starting model and each weight-averaging point included) is a dict with
`RUN_FIELDS`: ``method``, ``pipeline``, ``safety`` (refusal rate on held-out harmful prompts),
``over_refusal`` (refusal rate on benign edgy prompts), ``capability`` (mean of ``gsm8k`` and
``bbq`` accuracy), ``gsm8k``, ``bbq``, ``drift`` (mean per-token NLL of the starting model's own
answers on held-out benign prompts; higher = moved further), ``steps`` and ``seconds``. Extra
keys (``alpha`` for weight averaging, per-source safety) are kept.

Example:
    >>> path = write_results("results/demo", runs, meta)  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

RUN_FIELDS = (
    "method",
    "pipeline",
    "safety",
    "over_refusal",
    "capability",
    "gsm8k",
    "bbq",
    "drift",
    "steps",
    "seconds",
)
_RATES = ("safety", "over_refusal", "capability", "gsm8k", "bbq")


def check_run(run: Mapping[str, Any]) -> None:
    """Raises ValueError when a run misses a field or a rate is outside [0, 1].

    Example:
        >>> check_run({"method": "start"})  # doctest: +SKIP
        ValueError: run 'start/?' misses fields ['pipeline', ...]
    """
    name = f"{run.get('method', '?')}/{run.get('pipeline', '?')}"
    missing = [f for f in RUN_FIELDS if f not in run]
    if missing:
        raise ValueError(f"run {name!r} misses fields {missing}")
    for f in _RATES:
        v = run[f]
        if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise ValueError(f"run {name!r}: {f}={v!r} is not a rate in [0, 1]")
    if not isinstance(run["drift"], int | float) or not math.isfinite(run["drift"]):
        raise ValueError(f"run {name!r}: drift={run['drift']!r} is not a finite number")
    if not isinstance(run["steps"], int) or run["steps"] < 0:
        raise ValueError(f"run {name!r}: steps={run['steps']!r} must be an int >= 0")
    if not isinstance(run["seconds"], int | float) or run["seconds"] < 0:
        raise ValueError(f"run {name!r}: seconds={run['seconds']!r} must be >= 0")


def run_label(run: Mapping[str, Any]) -> str:
    """Short display name, e.g. ``"ogpsa sft-dpo"`` or ``"weight-avg a=0.50"``.

    Example:
        >>> run_label({"method": "naive", "pipeline": "sft"})
        'naive sft'
    """
    if run["method"] == "start":
        return "start"
    if "alpha" in run:
        return f"{run['method']} a={run['alpha']:.2f}"
    return f"{run['method']} {run['pipeline']}"


def results_markdown(runs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The results table (markdown) with a header naming the model, judge and set sizes.

    Example:
        >>> print(results_markdown(runs, meta))  # doctest: +SKIP
    """
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("set_sizes", {}).items())
    lines = [
        f"# Alignment tax: {meta.get('model', '?')}",
        "",
        f"Judge: {meta.get('judge', '?')}. Set sizes: {sizes}.",
        "",
        "| run | method | pipeline | safety | over-refusal | capability | GSM8K-MC | BBQ "
        "| drift (NLL) | steps | seconds |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in runs:
        lines.append(
            f"| {run_label(r)} | {r['method']} | {r['pipeline']} | {r['safety']:.3f} | "
            f"{r['over_refusal']:.3f} | {r['capability']:.3f} | {r['gsm8k']:.3f} | "
            f"{r['bbq']:.3f} | {r['drift']:.3f} | {r['steps']} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "safety = refusal rate on held-out harmful prompts (higher = safer); over-refusal = "
        "refusal rate on benign edgy prompts (lower = better); capability = mean of GSM8K-MC "
        "and BBQ accuracy; drift = per-token NLL of the starting model's own answers on "
        "held-out benign prompts (higher = moved further). seconds = training wall time.",
        "",
    ]
    return "\n".join(lines)


def plot_pareto(runs: Sequence[Mapping[str, Any]], path: str | os.PathLike, title: str) -> None:
    """Capability (x) vs safety (y): one marker per method and pipeline, the starting model
    marked, weight-averaging points joined into a curve from the start to the tuned model.

    Example:
        >>> plot_pareto(runs, "results/demo/pareto.png", "SmolLM2-135M")  # doctest: +SKIP
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    markers = {"sft": "o", "dpo": "s", "sft-dpo": "D"}
    colours = {"naive": "tab:red", "ogpsa": "tab:green", "ogpsa-svd": "tab:olive"}
    start = next((r for r in runs if r["method"] == "start"), None)
    curves: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if "alpha" in r:
            curves.setdefault(f"{r['method']} ({r['pipeline']})", []).append(r)
    for name, pts in curves.items():
        ends = [start] if start is not None else []
        tuned = [
            r
            for r in runs
            if r["method"] == "naive" and r["pipeline"] == pts[0]["pipeline"] and "alpha" not in r
        ]
        pts = ends + sorted(pts, key=lambda r: r["alpha"]) + tuned
        ax.plot(
            [p["capability"] for p in pts],
            [p["safety"] for p in pts],
            "--",
            color="tab:blue",
            marker=".",
            label=f"{name}, alpha = 0 .. 1",
        )
    for r in runs:
        if "alpha" in r or r["method"] == "start":
            continue
        ax.scatter(
            r["capability"],
            r["safety"],
            marker=markers.get(r["pipeline"], "^"),
            color=colours.get(r["method"], "tab:purple"),
            s=60,
            label=run_label(r),
            zorder=3,
        )
    if start is not None:
        ax.scatter(
            start["capability"],
            start["safety"],
            marker="*",
            color="black",
            s=180,
            label="start",
            zorder=4,
        )
    ax.set_xlabel("capability (mean of GSM8K-MC and BBQ accuracy)")
    ax.set_ylabel("safety (refusal rate on held-out harmful prompts)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(os.fspath(path))
    plt.close(fig)


def write_results(
    out_dir: str | os.PathLike, runs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]
) -> dict[str, str]:
    """Checks every run, then writes results.json, results.md and pareto.png into ``out_dir``.

    Args:
        out_dir: output folder (created).
        runs: the run dicts (`RUN_FIELDS` plus extras).
        meta: settings, judge, set sizes, model, machine, total time.

    Returns:
        ``{"json": path, "md": path, "png": path}``.

    Example:
        >>> write_results("results/demo", runs, {"model": "SmolLM2-135M"})  # doctest: +SKIP
    """
    for r in runs:
        check_run(r)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: os.path.join(out_dir, f)
        for k, f in (("json", "results.json"), ("md", "results.md"), ("png", "pareto.png"))
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump({"meta": dict(meta), "runs": [dict(r) for r in runs]}, f, indent=2)
        f.write("\n")
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(results_markdown(runs, meta))
    plot_pareto(runs, paths["png"], f"Alignment tax: {meta.get('model', '?')}")
    return paths
