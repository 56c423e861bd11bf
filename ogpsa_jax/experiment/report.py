"""Results of an alignment-tax experiment: results.json, results.md and pareto.png.

Every run (the starting model and each weight-averaging point included) is a dict with
`RUN_FIELDS`: ``method``, ``pipeline``, ``safety`` (refusal rate on held-out harmful prompts),
``over_refusal`` (refusal rate on benign edgy prompts), ``capability`` (mean of ``gsm8k`` and
``bbq`` accuracy), ``gsm8k``, ``bbq``, ``drift`` (mean per-token NLL of the starting model's own
answers on held-out benign prompts; higher = moved further), ``steps`` and ``seconds``. Extra
keys (``alpha`` for weight averaging, per-source safety) are kept.

Example:
    >>> import tempfile
    >>> run = dict(method="naive", pipeline="sft", safety=0.9, over_refusal=0.1, capability=0.4,
    ...            gsm8k=0.5, bbq=0.3, drift=1.2, steps=24, seconds=130.0)
    >>> paths = write_results(tempfile.mkdtemp(), [run], {"model": "SmolLM2-135M"})
    >>> sorted(paths)
    ['json', 'md', 'png']
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
IFEVAL_FIELDS = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_inst_strict",
    "ifeval_inst_loose",
)
# rates a run may carry as None (not measured: no IFEval rows, no choice task, no TruthfulQA)
_OPTIONAL_RATES = (*IFEVAL_FIELDS, "choice_mean", "truthfulqa_mc1")


def check_run(run: Mapping[str, Any]) -> None:
    """Raises ValueError when a run misses a field or a rate is outside [0, 1].

    Example:
        >>> check_run({"method": "start", "pipeline": "none"})
        Traceback (most recent call last):
        ...
        ValueError: run 'start/none' misses fields ['safety', 'over_refusal', 'capability', \
'gsm8k', 'bbq', 'drift', 'steps', 'seconds']
    """
    name = f"{run.get('method', '?')}/{run.get('pipeline', '?')}"
    missing = [f for f in RUN_FIELDS if f not in run]
    if missing:
        raise ValueError(f"run {name!r} misses fields {missing}")
    for f in _RATES:
        v = run[f]
        if not isinstance(v, int | float) or not 0.0 <= v <= 1.0:
            raise ValueError(f"run {name!r}: {f}={v!r} is not a rate in [0, 1]")
    for f in _OPTIONAL_RATES:
        v = run.get(f)
        if v is not None and (not isinstance(v, int | float) or not 0.0 <= v <= 1.0):
            raise ValueError(f"run {name!r}: {f}={v!r} is not a rate in [0, 1] or None")
    for f in [k for k in run if k.endswith("_ci") and run[k] is not None]:
        ci = run[f]
        intervals = ci.values() if isinstance(ci, Mapping) else [ci]
        for lo_hi in intervals:
            ok = isinstance(lo_hi, Sequence) and len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1]
            if not ok:
                raise ValueError(f"run {name!r}: {f}={ci!r} is not an interval [low, high]")
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


def _cell(run: Mapping[str, Any], field: str) -> str:
    """``0.083 (0.03-0.19)``: a value with its 95% interval; ``n/a`` when not measured."""
    v = run.get(field)
    if v is None:
        return "n/a"
    ci = run.get(f"{field}_ci")
    return f"{v:.3f}" if not ci else f"{v:.3f} ({ci[0]:.2f}-{ci[1]:.2f})"


_COMPARED = (  # metric of a comparison row -> column of the comparison table
    ("safety", "safety"),
    ("over_refusal", "over-refusal"),
    ("gsm8k", "GSM8K-MC"),
    ("bbq", "BBQ"),
    ("ifeval_prompt_strict", "IFEval prompt"),
    ("ifeval_inst_strict", "IFEval inst."),
    ("choice", "choice tasks"),
    ("drift", "drift (NLL)"),
)


def comparisons_markdown(comparisons: Sequence[Mapping[str, Any]]) -> list[str]:
    """Lines of the paired-comparison table: per pair of runs, ``diff [ci] p`` per metric.

    Example:
        >>> rows = [dict(a="start:none", b="naive:sft", metric="safety", diff=0.5,
        ...              ci=[0.3, 0.7], p_value=0.001)]
        >>> comparisons_markdown(rows)[-1]
        '| naive:sft - start:none | +0.500 [+0.30, +0.70] p=0.001 |  |  |  |  |  |  |  |'
    """
    if not comparisons:
        return []
    by_pair: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for c in comparisons:
        by_pair.setdefault((c["a"], c["b"]), {})[c["metric"]] = c
    lines = [
        "| b - a | " + " | ".join(label for _, label in _COMPARED) + " |",
        "| --- |" + " ---: |" * len(_COMPARED),
    ]
    for (a, b), metrics in by_pair.items():
        cells = []
        for metric, _ in _COMPARED:
            c = metrics.get(metric)
            cells.append(
                ""
                if c is None
                else f"{c['diff']:+.3f} [{c['ci'][0]:+.2f}, {c['ci'][1]:+.2f}] p={c['p_value']:.3g}"
            )
        lines.append(f"| {b} - {a} | " + " | ".join(cells) + " |")
    return lines


def results_markdown(runs: Sequence[Mapping[str, Any]], meta: Mapping[str, Any]) -> str:
    """The results tables (markdown): every rate with its 95% interval, then the paired
    comparisons of ``meta["comparisons"]`` when present.

    Example:
        >>> run = dict(method="start", pipeline="none", safety=0.1, over_refusal=0.0,
        ...            capability=0.5, gsm8k=0.6, bbq=0.4, drift=0.6, steps=0, seconds=0.0)
        >>> print(results_markdown([run], {"model": "SmolLM2-135M"}).splitlines()[0])
        # Alignment tax: SmolLM2-135M
    """
    sizes = ", ".join(f"{k} {v}" for k, v in meta.get("set_sizes", {}).items())
    lines = [
        f"# Alignment tax: {meta.get('model', '?')}",
        "",
        f"Judge: {meta.get('judge', '?')}. Set sizes: {sizes}.",
        "",
        "| run | safety | over-refusal | capability | GSM8K-MC | BBQ | IFEval prompt "
        "(strict) | IFEval inst. (strict) | choice tasks | TruthfulQA MC1 | drift (NLL) "
        "| steps | seconds |",
        "| --- |" + " ---: |" * 12,
    ]
    for r in runs:
        cells = [
            _cell(r, f)
            for f in (
                "safety",
                "over_refusal",
                "capability",
                "gsm8k",
                "bbq",
                "ifeval_prompt_strict",
                "ifeval_inst_strict",
                "choice_mean",
                "truthfulqa_mc1",
                "drift",
            )
        ]
        lines.append(
            f"| {run_label(r)} | " + " | ".join(cells) + f" | {r['steps']} | {r['seconds']:.0f} |"
        )
    lines += [
        "",
        "Each value with its 95% interval in parentheses (Wilson for rates, bootstrap for the "
        "capability and choice means and for drift). safety = refusal rate on held-out harmful "
        "prompts (higher = safer); over-refusal = refusal rate on benign edgy prompts (lower = "
        "better); capability = mean of GSM8K-MC and BBQ accuracy; IFEval = share of prompts "
        "(instructions) followed, official checker; choice tasks = mean zero-shot accuracy over "
        f"{', '.join(meta.get('choice_tasks', [])) or 'the choice tasks'}; drift = per-token NLL "
        "of the starting model's own answers on held-out benign prompts (higher = moved "
        "further). seconds = training wall time.",
        "",
    ]
    if meta.get("truthfulqa_mc1"):
        lines += [f"TruthfulQA MC1: n/a. {meta['truthfulqa_mc1']}.", ""]
    table = comparisons_markdown(meta.get("comparisons", []))
    if table:
        lines += [
            "## Paired comparisons",
            "",
            "Difference b - a on the same items, its paired-bootstrap 95% interval and p-value "
            "(exact McNemar for rates, paired bootstrap for drift). With this many items and "
            "this many comparisons, a p-value above 0.01 is no evidence of a difference.",
            "",
            *table,
            "",
        ]
    return "\n".join(lines)


def _stderr(rate: float, n: int) -> float:
    return math.sqrt(max(rate * (1.0 - rate), 0.0) / n) if n > 0 else 0.0


def plot_pareto(
    runs: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    title: str,
    set_sizes: Mapping[str, int] | None = None,
) -> None:
    """Two panels sharing the safety axis: capability (left) and drift (right) vs safety.

    One marker per method (colour) and pipeline (shape); the starting model is a black star;
    weight-averaging points are joined into a line from the start (alpha = 0) to the tuned model
    (alpha = 1), each labelled with its alpha. A run with ``safety_ci`` / ``capability_ci`` /
    ``drift_ci`` gets its 95% interval as error bars; without them, ``set_sizes``
    (``meta["set_sizes"]``) gives +-1 binomial standard-error bars, so differences smaller than
    the noise show.

    Example:
        >>> import os, tempfile
        >>> run = dict(method="start", pipeline="none", safety=0.1, capability=0.5, gsm8k=0.6,
        ...            bbq=0.4, drift=0.6)
        >>> path = os.path.join(tempfile.mkdtemp(), "pareto.png")
        >>> plot_pareto([run], path, "SmolLM2-135M")
        >>> open(path, "rb").read(4)
        b'\\x89PNG'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = dict(set_sizes or {})
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), dpi=120, sharey=True)
    markers = {"sft": "o", "dpo": "s", "sft-dpo": "D"}
    colours = {
        "naive": "tab:red",
        "ogpsa": "tab:green",
        "ogpsa-svd": "tab:olive",
        "ogpsa-gpm": "tab:cyan",
        "replay": "tab:purple",
    }
    start = next((r for r in runs if r["method"] == "start"), None)

    def bar(r: Mapping[str, Any], field: str) -> Any:
        """[[below], [above]] from the run's 95% interval, else +-1 binomial s.e."""
        ci = r.get(f"{field}_ci")
        if ci:
            return [[max(r[field] - ci[0], 0.0)], [max(ci[1] - r[field], 0.0)]]
        if field == "capability":
            g = _stderr(r["gsm8k"], sizes.get("gsm8k", 0))
            b = _stderr(r["bbq"], sizes.get("bbq", 0))
            return 0.5 * math.sqrt(g * g + b * b) or None
        if field == "safety":
            return _stderr(r["safety"], sizes.get("harmful", 0)) or None
        return None  # drift without an interval: a mean NLL over many tokens

    curves: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        if "alpha" in r:
            curves.setdefault(r["pipeline"], []).append(r)
    for ax, x, xlabel in (
        (axes[0], "capability", "capability (mean of GSM8K-MC and BBQ accuracy; higher = better)"),
        (axes[1], "drift", "drift from the start (NLL of its own answers; lower = less moved)"),
    ):
        for pipeline, pts in curves.items():
            tuned = [
                r
                for r in runs
                if r["method"] == "naive" and r["pipeline"] == pipeline and "alpha" not in r
            ]
            line = ([start] if start else []) + sorted(pts, key=lambda r: r["alpha"]) + tuned
            ax.plot(
                [p[x] for p in line],
                [p["safety"] for p in line],
                "-",
                color="tab:blue",
                alpha=0.7,
                lw=1.5,
                marker="o",
                ms=4,
                label=f"weight averaging start <-> naive {pipeline}",
                zorder=2,
            )
            for p in pts:
                ax.annotate(
                    f"a={p['alpha']:.2f}",
                    (p[x], p["safety"]),
                    textcoords="offset points",
                    xytext=(6, -10),
                    fontsize=7,
                    color="tab:blue",
                )
        for r in runs:
            if "alpha" in r:
                continue
            is_start = r["method"] == "start"
            ax.errorbar(
                r[x],
                r["safety"],
                xerr=bar(r, x),
                yerr=bar(r, "safety"),
                fmt="*" if is_start else markers.get(r["pipeline"], "^"),
                color="black" if is_start else colours.get(r["method"], "tab:gray"),
                ms=15 if is_start else 8,
                elinewidth=0.8,
                capsize=2,
                alpha=0.9,
                label=run_label(r),
                zorder=4 if is_start else 3,
            )
        ax.set_xlabel(xlabel, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("safety (refusal rate on held-out harmful prompts)")
    axes[0].set_ylim(-0.05, 1.08)
    handles, labels = axes[0].get_legend_handles_labels()
    seen: dict[str, Any] = {}
    for h, lab in zip(handles, labels, strict=True):
        seen.setdefault(lab, h)
    axes[1].legend(seen.values(), seen.keys(), fontsize=8, loc="lower right")
    has_ci = any(r.get("safety_ci") for r in runs)
    note = " (bars: 95% intervals)" if has_ci else " (bars: +-1 binomial s.e.)" if sizes else ""
    fig.suptitle(title + note, fontsize=11)
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
        >>> import json, tempfile
        >>> run = dict(method="start", pipeline="none", safety=0.1, over_refusal=0.0,
        ...            capability=0.5, gsm8k=0.6, bbq=0.4, drift=0.6, steps=0, seconds=0.0)
        >>> paths = write_results(tempfile.mkdtemp(), [run], {"model": "SmolLM2-135M"})
        >>> json.load(open(paths["json"]))["runs"][0]["safety"]
        0.1
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
    plot_pareto(
        runs,
        paths["png"],
        f"Alignment tax: {meta.get('model', '?')}",
        set_sizes=meta.get("set_sizes"),
    )
    return paths
