"""Paper-scale alignment-tax experiments: configs and the one launcher.

The paper ("Safety Alignment as Continual Learning", arXiv 2602.07892) safety-tunes
Qwen2.5-7B-Instruct and Llama-3.1-8B-Instruct with SFT, DPO and SFT->DPO on PKU-SafeRLHF,
naively and with OGPSA (two mean reference gradients for SFT, UltraFeedback + HaluEval; one for
DPO, UltraFeedback; Gram-Schmidt; refresh every 30 / 5 steps; lr 1e-6 cosine; bf16). Every
experiment here is one (model, pipeline, method) cell of that grid, built on the library presets
``qwen2_5_7b_paper`` / ``llama3_1_8b_paper`` (``ogpsa_jax.train.presets``), plus our SVD basis
and three baselines: general-data mixing ("replay": the safety data mixed 1:1 with the
reference general data), weight averaging with the starting model (evaluations only, of the
naive run) and LoRA ("lora": adapters only, `LORA`), with OGPSA on the adapters beside it
("ogpsa_lora").

Each experiment's docstring states its question, the expected result and the exact command.
Evaluation is the library's ``ogpsa_jax.eval.evaluate_alignment`` on every prompt of every
shipped set (`EVAL`), plots and tables ``ogpsa_jax.experiment.report.write_results``; the
paper's capability benchmarks (SimpleQA, IFEval, ...) run through
``ogpsa_jax.eval.LMEvalAdapter`` with lm-evaluation-harness where their data is available.

Commands (TPU v5e-8 / v4-8 slice, or one 8-GPU node; the model folder must exist locally, e.g.
``./Qwen2.5-7B-Instruct``; data sets come from the Hugging Face hub cache)::

    python -m experiments.paper list
    python -m experiments.paper run qwen_sft_dpo_ogpsa --output-dir runs/qwen_sft_dpo_ogpsa
    python -m experiments.paper eval qwen_sft_dpo_ogpsa --output-dir runs/qwen_sft_dpo_ogpsa
    python -m experiments.paper report runs/qwen_* --out results/paper_qwen

On a multi-host TPU pod slice run the same ``run`` command on every host (``--distributed``);
on a larger slice scale mesh and batch together, e.g. ``--set mesh=2,16,1 --set
sft.batch_size=128`` (the global batch is what the paper fixes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from transformers import AutoTokenizer

from ogpsa_jax.data import load_preferences, load_sft
from ogpsa_jax.eval import (
    TRUTHFULQA_NOTE,
    default_judge,
    drift_reference,
    evaluate_alignment,
    full_eval_config,
    load_eval_sets,
)
from ogpsa_jax.experiment.averaging import average_models
from ogpsa_jax.experiment.compare import demo_pairs, paired_comparisons
from ogpsa_jax.experiment.report import IFEVAL_FIELDS, write_results
from ogpsa_jax.models import load_hf
from ogpsa_jax.train import TrainConfig, apply_overrides, preset, train, validate

logger = logging.getLogger("experiments.paper")

MODELS = {
    "qwen": ("qwen2_5_7b_paper", "Qwen2.5-7B-Instruct"),
    "llama": ("llama3_1_8b_paper", "Llama-3.1-8B-Instruct"),
}
PIPELINES = {"sft": "sft", "dpo": "dpo", "sft_dpo": "sft-dpo"}
METHODS = ("naive", "ogpsa", "ogpsa_svd", "replay", "weight_avg", "lora", "ogpsa_lora")
# A LoRA run: rank 16, alpha 32 on q, k, v, o, gate, up, down (base weights frozen), at the
# learning rates of LLaMA-Factory's LoRA examples (the reference code is a LLaMA-Factory fork;
# the paper does not give its LoRA baseline's settings). One line for any preset:
# ``apply_overrides(config, LORA)``.
LORA = (
    "model.lora.rank=16",
    "model.lora.alpha=32",
    "sft.learning_rate=1e-4",
    "dpo.learning_rate=5e-6",
)
# OGPSA on the adapters with the matrix basis of each adapted layer's inputs (GPM, energy 0.97,
# rank <= 64; InfLoRA's construction, docs/matrix.md#on-lora-adapters).
OGPSA_LORA = tuple(
    f"{s}.ogpsa.{f}" for s in ("sft", "dpo") for f in ("method=activation", "k=64", "energy=0.97")
)
# Paper's headline (Qwen2.5-7B-Instruct, SFT->DPO, naive -> OGPSA).
PAPER_HEADLINE = "SimpleQA 0.53% -> 3.03%, IFEval 51.94% -> 63.96%"
# Weight-averaging mixing weights (start <-> the naive run).
ALPHAS = (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)
# Every prompt of every shipped set; GSM8K-MC in capability, GSM8K by generation beside it;
# 64-token starting-model answers for drift.
EVAL = full_eval_config(gsm8k_mode="mc", gsm8k_generate=True, drift_max_new_tokens=64)

_QUESTIONS = {
    "naive": "How much general capability does plain {pipe} safety tuning of {model} cost "
    "(the alignment tax), and how much safety does it buy?",
    "ogpsa": "Does projecting the {pipe} safety gradient of {model} off the capability "
    "subspace (Gram-Schmidt mean reference gradients, the paper's setting) keep capability "
    "while reaching the same safety as naive tuning?",
    "ogpsa_svd": "Does a richer per-tensor subspace (SVD of per-batch reference gradients, "
    "k = 8; ours, beyond the paper) protect capability better than the rank-2 mean gradients "
    "for {pipe} on {model}?",
    "replay": "Does the standard continual-learning baseline, mixing general data into the "
    "{pipe} safety data 1:1, close the alignment tax on {model} as well as OGPSA does?",
    "weight_avg": "How does interpolating the weights of {model} between the start and the "
    "naive {pipe} model trade safety for capability (a curve, evaluations only)?",
    "lora": "Where does plain LoRA {pipe} safety tuning of {model} (rank 16, all projections; the "
    "paper's LoRA baseline) land on the safety-capability plane?",
    "ogpsa_lora": "Does OGPSA on LoRA adapters ({pipe}, {model}; the input space of each adapted "
    "layer protected, InfLoRA's construction) keep more capability than plain LoRA?",
}
_EXPECTED = {
    "naive": "Expected: high safety with a clear capability drop; for Qwen2.5-7B SFT->DPO the "
    "paper reports {headline_naive}.",
    "ogpsa": "Expected: safety close to naive with most of the capability kept; paper "
    "(Qwen2.5-7B, SFT->DPO, naive -> OGPSA): {headline}. OGPSA lies on or above the "
    "safety-capability frontier of naive tuning, weight merging, LoRA and data mixing.",
    "ogpsa_svd": "Expected (untested at this scale): at least the mean-gradient OGPSA's "
    "capability at equal safety; on our small continual-learning toy a gradient-SVD subspace "
    "kept ~86% old-task accuracy vs ~55% for the rank-1 mean gradient.",
    "replay": "Expected: between naive and OGPSA; the paper places data mixing below the "
    "OGPSA frontier for DPO and SFT->DPO.",
    "weight_avg": "Expected: a curve from the start (capable, less safe) to the naive model "
    "(safe, less capable) that lies below the OGPSA point, as in the paper's figure.",
    "lora": "Expected: less safety and a smaller capability drop than naive full tuning; the "
    "paper places LoRA below the OGPSA frontier.",
    "ogpsa_lora": "Expected (untested at this scale): plain LoRA's safety with less capability "
    "lost; the adapters' reach is restricted to directions the capability inputs do not use.",
}


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """One paper-scale experiment: a training config (None = evaluations only) and its doc."""

    name: str  # e.g. "qwen_sft_dpo_ogpsa"
    model: str  # "qwen" | "llama"
    pipeline: str  # "sft" | "dpo" | "sft-dpo"
    method: str  # one of METHODS
    train: TrainConfig | None  # None for weight averaging (uses the naive run)
    doc: str  # question, expected result, exact command


def _replay_data(train: TrainConfig) -> TrainConfig:
    """Points each stage at a 1:1 safety + general mix, written by ``paper.py prepare``."""
    out = train
    for stage in ("sft", "dpo"):
        st = getattr(out, stage)
        mixed = f"data/replay_{stage}_{st.limit or 'all'}.jsonl"
        og = dataclasses.replace(st.ogpsa, enabled=False)
        out = dataclasses.replace(out, **{stage: dataclasses.replace(st, data=mixed, ogpsa=og)})
    return out


def _make(model: str, pipe_key: str, method: str) -> Experiment:
    preset_name, model_name = MODELS[model]
    pipeline = PIPELINES[pipe_key]
    name = f"{model}_{pipe_key}_{method}"
    train: TrainConfig | None = preset(preset_name)
    if method == "naive":
        train = apply_overrides(train, ["sft.ogpsa.enabled=false", "dpo.ogpsa.enabled=false"])
    elif method == "ogpsa_svd":
        train = apply_overrides(
            train, [f"{s}.ogpsa.{f}" for s in ("sft", "dpo") for f in ("method=svd", "k=8")]
        )
    elif method == "replay":
        train = _replay_data(train)
    elif method == "weight_avg":
        train = None
    elif method in ("lora", "ogpsa_lora"):
        off = ("sft.ogpsa.enabled=false", "dpo.ogpsa.enabled=false")
        train = apply_overrides(train, [*LORA, *(OGPSA_LORA if method == "ogpsa_lora" else off)])
    headline_naive = "SimpleQA 0.53%, IFEval 51.94%"
    expected = _EXPECTED[method].format(headline=PAPER_HEADLINE, headline_naive=headline_naive)
    if method == "weight_avg":
        cmd = (
            f"python -m experiments.paper eval {name} --output-dir runs/{name} "
            f"--tuned runs/{model}_{pipe_key}_naive"
        )
    else:
        cmd = f"python -m experiments.paper run {name} --output-dir runs/{name}"
        if method == "replay":
            cmd = f"python -m experiments.paper prepare {name} && " + cmd
    doc = "\n".join(
        [
            _QUESTIONS[method].format(pipe=pipeline, model=model_name),
            expected,
            f"Command (TPU v5e-8 slice or one 8-GPU node): {cmd}",
        ]
    )
    return Experiment(
        name=name, model=model, pipeline=pipeline, method=method, train=train, doc=doc
    )


EXPERIMENTS: dict[str, tuple[str, str, str]] = {
    f"{m}_{p}_{meth}": (m, p, meth) for m in MODELS for p in PIPELINES for meth in METHODS
}


def build(name: str) -> Experiment:
    """The named experiment (see ``EXPERIMENTS``); nothing is loaded.

    Example:
        >>> build("qwen_sft_dpo_ogpsa").train.dpo.ogpsa.refresh_every
        5
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return _make(*EXPERIMENTS[name])


def validate_experiment(exp: Experiment, device_count: int) -> None:
    """Checks an experiment's training config for its pipeline (no model instantiated)."""
    if exp.train is None:
        return
    validate(exp.train, exp.pipeline, device_count)


# ----------------------------------------------------------------------------- launcher


def _prepare(exp: Experiment) -> None:
    """Writes the 1:1 safety + general mixes a replay experiment trains on."""
    assert exp.train is not None
    os.makedirs("data", exist_ok=True)
    for stage in ("sft", "dpo"):
        st = getattr(exp.train, stage)
        base = getattr(preset(MODELS[exp.model][0]), stage)
        general = base.ogpsa.reference[0]
        limit = base.limit or None
        if stage == "sft":
            safety = load_sft(base.data, limit=limit, safe_only=True)
            extra = load_sft(general, limit=len(safety))
            rows = [{"prompt": e.prompt, "response": e.response} for e in safety + extra]
        else:
            safety = load_preferences(base.data, limit=limit, safe_pairs_only=True)
            extra = load_preferences(general, limit=len(safety))
            rows = [
                {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}
                for p in safety + extra
            ]
        with open(st.data, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        logger.info("wrote %s (%d rows)", st.data, len(rows))


def _evaluate(exp: Experiment, output_dir: str, tuned: str | None) -> None:
    if exp.method == "weight_avg" and tuned is None:
        raise ValueError("weight_avg needs --tuned RUN_DIR (the naive run of the pipeline)")
    start_dir = MODELS[exp.model][1]
    tok = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
    start = load_hf(start_dir, dtype=jnp.bfloat16)
    sets = load_eval_sets(EVAL)
    reference = drift_reference(start, tok, EVAL)
    if exp.method == "weight_avg":
        end = load_hf(os.path.join(tuned, "final"), dtype=jnp.bfloat16)
        models = [(a, average_models(start, end, a)) for a in ALPHAS]
    else:  # a LoRA run's final/ holds the adapters; final-merged/ the full model
        lora = exp.train is not None and exp.train.model.lora.rank > 0
        final = os.path.join(output_dir, "final-merged" if lora else "final")
        models = [(None, load_hf(final, dtype=jnp.bfloat16))]
    results = []
    for alpha, model in models:
        m = evaluate_alignment(model, tok, EVAL, sets=sets, reference=reference)
        run = {"method": exp.method, "pipeline": exp.pipeline}
        rates = ("safety", "over_refusal", "capability", "gsm8k", "bbq", *IFEVAL_FIELDS)
        rates += ("choice", "choice_mean", "truthfulqa_mc1", "drift")
        run.update({k: m[k] for k in rates})
        run.update({f"{k}_ci": m[f"{k}_ci"] for k in rates if f"{k}_ci" in m})
        run.update(safety_by_source=m["safety_by_source"], outcomes=m["outcomes"])
        run.update(gsm8k_generate=m["gsm8k_generate"], eval_seconds=m["seconds"])
        run.update(steps=0, seconds=0.0)
        if alpha is not None:
            run["alpha"] = alpha
        results.append(run)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "eval.json"), "w") as f:
        json.dump(results, f, indent=2)


def _report(run_dirs: Sequence[str], out: str) -> None:
    runs = []
    for d in run_dirs:
        with open(os.path.join(d, "eval.json")) as f:
            runs += json.load(f)
    meta = {"model": "paper-scale", "judge": default_judge().name, "runs": list(run_dirs)}
    label = lambda r: f"{r['method']}:{r['pipeline']}" + (f":{r['alpha']}" if "alpha" in r else "")
    outcomes = {label(r): r.pop("outcomes") for r in runs}
    meta["comparisons"] = paired_comparisons(outcomes, demo_pairs(list(outcomes)))
    meta["truthfulqa_mc1"] = TRUTHFULQA_NOTE
    write_results(out, runs, meta)


def main(argv: list[str] | None = None) -> int:
    """``paper.py {list,prepare,run,eval,report} ...`` (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.paper", description=__doc__.split("\n")[0]
    )
    parser.add_argument("action", choices=("list", "prepare", "run", "eval", "report"))
    parser.add_argument("names", nargs="*", help="experiment name (run dirs for 'report')")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--out", default="results/paper", help="report folder")
    parser.add_argument("--tuned", default=None, help="weight_avg: the naive run folder")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--distributed", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.action == "list":
        for name in EXPERIMENTS:
            sys.stdout.write(f"{name}\n    " + build(name).doc.replace("\n", "\n    ") + "\n")
        return 0
    if args.action == "report":
        _report(args.names, args.out)
        return 0
    if len(args.names) != 1:
        parser.error(f"{args.action} takes one experiment name")
    exp = build(args.names[0])
    out = args.output_dir or os.path.join("runs", exp.name)
    if args.action == "prepare":
        _prepare(exp)
        return 0
    if args.action == "run":
        if exp.train is None:
            parser.error(f"{exp.name} trains nothing; use: eval {exp.name} --tuned RUN_DIR")
        if args.distributed:
            jax.distributed.initialize()
        config = apply_overrides(exp.train, args.set)
        validate(config, exp.pipeline, jax.device_count())
        train(exp.pipeline, config, out)
    _evaluate(exp, out, args.tuned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
