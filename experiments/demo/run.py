"""The demo, start to end: `run_demo` and the steps it is built from.

1. `prepare`: the prompt sets, the starting model (converted once and cached), its answers
   (drift reference, DPO rejected answers, capability reference; cached) and the training
   files.
2. `evaluate_run` on the starting model.
3. `train_runs`: each "method:pipeline" of ``config.runs`` (training in
   ``experiments.demo.stages``: a method's SFT stage is trained once and reused by its SFT->DPO
   run), each trained model evaluated.
4. `weight_averaging_runs`: start <-> the naive tuned model at each mixing weight (evaluations
   only).
5. `results_meta` and ``ogpsa_jax.experiment.report.write_results``: results.json, results.md,
   pareto.png.

Every evaluation is the library's ``ogpsa_jax.eval.evaluate_alignment`` on the demo's own prompt
sets. Every part runs inside a named phase of a ``PhaseClock`` (wall, CPU, compile seconds ->
``meta["timings"]``).

Example:
    >>> from experiments.demo.config import tiny_config
    >>> run_demo(tiny_config(), "/tmp/demo")["runs"][0]["method"]  # doctest: +SKIP
    'start'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax.numpy as jnp
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from experiments.demo.config import DemoConfig, eval_config, validate
from experiments.demo.data import TrainingData, prompts_of, select_prompts, write_training_data
from experiments.demo.stages import Stages
from ogpsa_jax import eval as ev
from ogpsa_jax import models
from ogpsa_jax.data import assets_path, pad_token_id
from ogpsa_jax.experiment import report, targets
from ogpsa_jax.experiment.averaging import average_models
from ogpsa_jax.experiment.compare import demo_pairs, paired_comparisons
from ogpsa_jax.experiment.entry import output_dirs
from ogpsa_jax.experiment.report import write_results
from ogpsa_jax.experiment.timing import PhaseClock
from ogpsa_jax.models.gguf import smollm2_path

logger = logging.getLogger(__name__)

_METRICS = (
    "safety",
    "over_refusal",
    "capability",
    "gsm8k",
    "bbq",
    *report.IFEVAL_FIELDS,
    "choice",
    "choice_mean",
    "truthfulqa_mc1",
    "drift",
    "safety_by_source",
)


# ----------------------------------------------------------------------------- models


def start_model_dir(config: DemoConfig, cache_dir: str) -> str:
    """The starting model's HF folder (with tokenizer files), made once under ``cache_dir``."""
    if config.model == "smollm2":
        return str(smollm2_path(os.path.join(cache_dir, "smollm2-135m-instruct")))
    path = os.path.join(cache_dir, f"tiny-start-seed{config.seed}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    tok = AutoTokenizer.from_pretrained(str(assets_path("tiny_tokenizer")))
    cfg = dataclasses.replace(
        models.tiny_config(vocab_size=len(tok)),
        pad_token_id=pad_token_id(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = models.init_random(cfg, seed=config.seed)
    models.save_hf(model, path + ".tmp")
    tok.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def load_model(path: str, config: DemoConfig) -> Any:
    """A model folder at the demo's compute dtype (parameters float32)."""
    return models.load_hf(path, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)


# ----------------------------------------------------------------------------- preparation


@dataclasses.dataclass
class Context:
    """What the steps of one demo run share; `prepare` builds it, the steps append runs."""

    config: DemoConfig
    clock: PhaseClock
    cache_dir: str
    sets: dict[str, list[dict[str, Any]]]
    start_dir: str
    tokenizer: Any
    start: Any
    reference: dict[str, Any]  # drift reference: the starting model's answers (token ids)
    data: TrainingData
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    responses: dict[str, Any] = dataclasses.field(default_factory=dict)
    outcomes: dict[str, Any] = dataclasses.field(default_factory=dict)  # label -> per item


def start_answers(
    config: DemoConfig,
    start: Any,
    tok: Any,
    start_dir: str,
    prompts: list[str],
    name: str,
    cache_dir: str,
) -> list[str]:
    """The starting model's answers to ``prompts`` (DPO rejected / reference), cached as JSON."""
    t = config.answer_temperature
    key = targets.cache_key(start_dir, prompts, config.answer_tokens, config.dtype, t)
    return targets.cached_json(
        os.path.join(cache_dir, f"start_answers_{name}.json"),
        key,
        lambda: ev.generate_responses(
            start,
            tok,
            prompts,
            max_new_tokens=config.answer_tokens,
            batch_size=config.gen_batch,
            progress=f"start: {name}",
            temperature=t,
            seed=config.seed,
        ),
    )


def prepare(config: DemoConfig, cache_dir: str, clock: PhaseClock) -> Context:
    """Prompt sets, starting model, its cached answers and the training files."""
    with clock.phase("prompt sets"):
        sets = select_prompts(config)
    with clock.phase("start model: convert (cached) and load"):
        start_dir = start_model_dir(config, cache_dir)
        tok = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
        start = load_model(start_dir, config)
    drift_prompts = prompts_of(sets["drift"])
    with clock.phase("start answers: drift (cached)"):
        drift_answers = targets.cached_json(
            os.path.join(cache_dir, "start_answers_drift_ids.json"),
            targets.cache_key(start_dir, drift_prompts, config.answer_tokens, config.dtype),
            lambda: ev.drift_reference(
                start, tok, eval_config(config), prompts=drift_prompts, progress="start: drift"
            )["answers"],
        )
    answers = {}
    for name in ("dpo", "reference"):
        with clock.phase(f"start answers: {name} (cached)"):
            prompts = prompts_of(sets[name])
            answers[name] = start_answers(config, start, tok, start_dir, prompts, name, cache_dir)
    data = write_training_data(
        sets, answers["dpo"], answers["reference"], os.path.join(cache_dir, "data")
    )
    return Context(
        config=config,
        clock=clock,
        cache_dir=cache_dir,
        sets=sets,
        start_dir=start_dir,
        tokenizer=tok,
        start=start,
        reference={"prompts": drift_prompts, "answers": drift_answers},
        data=data,
    )


# ----------------------------------------------------------------------------- evaluation


def evaluate_run(
    ctx: Context, method: str, pipeline: str, model: Any, steps: int, seconds: float, **extra: Any
) -> dict[str, Any]:
    """Evaluates one model, appends its run record (and its responses) to ``ctx``."""
    label = f"{method}:{pipeline}" + (f":{extra['alpha']}" if "alpha" in extra else "")
    sets = {k: ctx.sets[k] for k in ev.EVAL_SETS}
    res = ev.evaluate_alignment(
        model,
        ctx.tokenizer,
        eval_config(ctx.config),
        sets=sets,
        reference=ctx.reference,
        phase=lambda part: ctx.clock.phase(f"eval {label}: {part}"),
    )
    ctx.responses[label] = res["responses"]
    ctx.outcomes[label] = res["outcomes"]
    run = {"method": method, "pipeline": pipeline, **{k: res[k] for k in _METRICS}}
    run.update({f"{k}_ci": res[f"{k}_ci"] for k in _METRICS if f"{k}_ci" in res})
    run["label"] = label
    if res["gsm8k_generate"] is not None:
        run["gsm8k_generate"] = res["gsm8k_generate"]
    run.update(eval_seconds=res["seconds"], steps=steps, seconds=seconds, **extra)
    ctx.runs.append(run)
    logger.info(
        "%s: safety %.3f over-refusal %.3f capability %.3f IFEval %s drift %.3f (eval %.0fs)",
        label,
        run["safety"],
        run["over_refusal"],
        run["capability"],
        run["ifeval_prompt_strict"],
        run["drift"],
        run["eval_seconds"],
    )
    return run


def train_runs(ctx: Context, stages: Stages, bar: Any) -> dict[str, str]:
    """Trains and evaluates every run of ``config.runs``; returns spec -> final model dir."""
    finals: dict[str, str] = {}
    for spec in ctx.config.runs:
        method, _, pipeline = spec.partition(":")
        bar.set_postfix_str(f"training {spec}")
        if pipeline == "sft-dpo":
            sft_dir, s1, t1 = stages.get(method, "sft", ctx.start_dir, "sft")
            final, s2, t2 = stages.get(method, "dpo", sft_dir, "sft-dpo")
            steps, seconds = s1 + s2, t1 + t2
        else:
            final, steps, seconds = stages.get(method, pipeline, ctx.start_dir, pipeline)
        finals[spec] = final
        with ctx.clock.phase(f"load {spec}"):
            model = load_model(final, ctx.config)
        evaluate_run(ctx, method, pipeline, model, steps, seconds)
        bar.update(1)
        del model
    return finals


def weight_averaging_runs(ctx: Context, finals: dict[str, str], bar: Any) -> str | None:
    """Evaluates start <-> naive tuned model at each alpha; returns the tuned run's spec."""
    tuned_spec = next((s for s in ("naive:sft-dpo", "naive:dpo", "naive:sft") if s in finals), None)
    if tuned_spec is None or not ctx.config.alphas:
        return tuned_spec
    with ctx.clock.phase(f"load {tuned_spec}"):
        tuned = load_model(finals[tuned_spec], ctx.config)
    tuned_run = next(r for r in ctx.runs if f"{r['method']}:{r['pipeline']}" == tuned_spec)
    pipeline = tuned_spec.split(":")[1]
    for alpha in ctx.config.alphas:
        with ctx.clock.phase("weight averaging"):
            mixed = average_models(ctx.start, tuned, alpha)
        evaluate_run(
            ctx, "weight-avg", pipeline, mixed, tuned_run["steps"], 0.0, alpha=float(alpha)
        )
        bar.update(1)
        del mixed
    return tuned_spec


# ----------------------------------------------------------------------------- the demo


def results_meta(ctx: Context, stages: Stages, tuned_spec: str | None) -> dict[str, Any]:
    """results.json's ``meta``: what ran, on which data and machine, and where the time went."""
    config = ctx.config
    return {
        "model": "SmolLM2-135M-Instruct" if config.model == "smollm2" else "tiny random decoder",
        "model_dir": ctx.start_dir,
        "judge": ev.default_judge().name + " (keyword/pattern refusal classifier anchored on the "
        "response's opening; agreement with people: results/eval/judge_agreement.json)",
        "set_sizes": {k: len(v) for k, v in ctx.sets.items()},
        "harmful_sources": sorted({r["source"] for r in ctx.sets["harmful"]}),
        "dpo_pairs": ctx.data.dpo[1],
        "reference_rows": ctx.data.reference_rows,
        "gsm8k_scoring": "4-way multiple choice by log-likelihood after 'The answer is' "
        "(gold vs 3 nearby numbers); not comparable to official GSM8K",
        "drift": "per-token NLL of the starting model's own greedy answers "
        f"({config.answer_tokens} new tokens) on held-out benign prompts",
        "ifeval": f"{len(ctx.sets['ifeval'])} IFEval prompts ({config.ifeval_subset} subset), "
        f"answers of up to {config.ifeval_tokens} new tokens, official checker",
        "choice_tasks": list(config.choice_tasks),
        "truthfulqa_mc1": ev.TRUTHFULQA_NOTE,
        "intervals": "<name>_ci: 95% Wilson interval of a rate; capability_ci, choice_mean_ci: "
        "stratified bootstrap; drift_ci: bootstrap over prompts (2000 resamples, seed 0)",
        "comparisons": paired_comparisons(ctx.outcomes, demo_pairs(ctx.outcomes)),
        "comparisons_note": "paired on the same items: b - a, exact McNemar p-value for 0/1 "
        "outcomes (rates), paired bootstrap for per-prompt drift NLL (unweighted mean of "
        "per-prompt NLL); ci = paired bootstrap 95% interval of the difference",
        "weight_averaging": f"start <-> {tuned_spec}, alphas {list(config.alphas)}; steps = the "
        "tuned model's, seconds = 0 (evaluations only)",
        "settings": dataclasses.asdict(config),
        **ctx.clock.run_record(),
        "timings_note": "per phase: wall_s, cpu_s (user+sys of the demo process), compile_s and "
        "compiles (XLA backend compiles); stage_breakdown splits each training phase into the "
        "first step (includes compiling the step), the other steps and the basis refreshes, "
        "the rest of a stage being loading, compiling the refresh, DPO reference log-probs "
        "and the final export",
        "stage_breakdown": stages.breakdown,
    }


def run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike = "results/demo",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs the whole experiment and writes results.json, results.md and pareto.png.

    Args:
        config: what to run (`default_config`, `full_config`, `tiny_config`).
        out_dir: output folder.
        cache_dir: cache folder (default ``out_dir/cache``).

    Returns:
        ``{"meta": ..., "runs": [...], "paths": {...}}``.
    """
    validate(config)
    out_dir, cache_dir = output_dirs(out_dir, cache_dir)
    with PhaseClock() as clock:
        ctx = prepare(config, cache_dir, clock)
        bar = tqdm(total=1 + len(config.runs) + len(config.alphas), desc="demo runs")
        evaluate_run(ctx, "start", "none", ctx.start, 0, 0.0)
        bar.update(1)
        stages = Stages(config, ctx.data, clock, os.path.join(cache_dir, "runs"))
        finals = train_runs(ctx, stages, bar)
        tuned_spec = weight_averaging_runs(ctx, finals, bar)
        bar.close()
        meta = results_meta(ctx, stages, tuned_spec)
        with clock.phase("write results"):
            paths = write_results(out_dir, ctx.runs, meta)
    with open(os.path.join(cache_dir, "responses.json"), "w", encoding="utf-8") as f:
        json.dump(ctx.responses, f, indent=1, ensure_ascii=False)
    with open(os.path.join(cache_dir, "outcomes.json"), "w", encoding="utf-8") as f:
        json.dump(ctx.outcomes, f)
    return {"meta": meta, "runs": ctx.runs, "paths": paths}
