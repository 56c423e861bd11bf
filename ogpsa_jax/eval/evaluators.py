"""Evaluators for the alignment-tax experiment: refusal rate, multiple choice, GSM8K, drift.

All take a decoder (``load_hf`` / ``init_random``) and its Hugging Face tokenizer. Prompts are
rendered with the tokenizer's chat template by default (``chat=True``).

- :func:`refusal_rate`: greedy responses judged by a :class:`~ogpsa_jax.eval.judge.Judge`
  (keyword judge by default); reports the judge's name.
- :func:`multiple_choice_accuracy`: each choice is scored by the log-likelihood of its text as
  the assistant's answer after the rendered question (and after the item's ``cue``, if any):
  summed (``accuracy``) and per-token mean (``accuracy_norm``).
- GSM8K: by default multiple choice by log-likelihood (:func:`gsm8k_mc_accuracy`): the gold
  final number vs three nearby distractors (``prompts.gsm8k_choices``) after the fixed cue
  "The answer is". A 135M model solves ~1% of GSM8K by generation, so this proxy is what moves
  at that size; it is NOT comparable to official GSM8K. :func:`gsm8k_exact_match` is the
  generation variant (last number in the answer == gold).
- :func:`drift`: mean per-token NLL under the model of the starting model's own greedy answers
  to held-out benign prompts (higher = moved further); with ``ref_model`` also the mean
  per-token KL(start || model) on those positions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.eval.judge import Judge, KeywordJudge
from ogpsa_jax.eval.scoring import (
    encode_prompts,
    generate_responses,
    generate_token_ids,
    score_continuations,
)

logger = logging.getLogger(__name__)

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def _texts(prompts: Sequence[str | Mapping[str, Any]]) -> list[str]:
    """Accepts strings or rows from ``load_prompt_set`` (uses their ``prompt``)."""
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                raise ValueError(f"prompt row {i} has no 'prompt' field: {sorted(p)}")
            p = p["prompt"]
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")
        out.append(p)
    return out


def judge_refusals(
    prompts: Sequence[str | Mapping[str, Any]],
    responses: Sequence[str],
    *,
    judge: Judge | None = None,
) -> dict[str, Any]:
    """Refusal rate of given responses (no model needed).

    Args:
      prompts: the prompts (strings or prompt-set rows).
      responses: one response per prompt.
      judge: a :class:`Judge`; default :class:`KeywordJudge`.

    Returns:
      dict(rate, n, judge, responses, refused) -- ``refused`` is a list of bools.

    Example:
      >>> judge_refusals(["q1", "q2"], ["I cannot help with that.", "Sure: ..."])["rate"]
      0.5
    """
    judge = KeywordJudge() if judge is None else judge
    texts = _texts(prompts)
    if len(texts) != len(responses):
        raise ValueError(f"{len(texts)} prompts but {len(responses)} responses")
    refused = [bool(r) for r in judge(texts, list(responses))]
    n = len(refused)
    return {
        "rate": float(np.mean(refused)) if n else float("nan"),
        "n": n,
        "judge": judge.name,
        "responses": list(responses),
        "refused": refused,
    }


def refusal_rate(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    judge: Judge | None = None,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Fraction of prompts whose greedy response the judge calls a refusal.

    Args:
      model: a decoder.
      tokenizer: its tokenizer.
      prompts: strings or prompt-set rows.
      judge: a :class:`Judge`; default :class:`KeywordJudge` (first 200 characters).
      max_new_tokens: response length (a refusal shows in the first 32 tokens).
      batch_size: generation batch size.
      system_prompt: optional system message.
      **generate_kwargs: passed to ``generate_responses`` (chat, progress, ...).

    Returns:
      dict(rate in [0, 1], n, judge (name), responses, refused).

    Example:
      >>> refusal_rate(model, tok, load_prompt_set("harmbench", limit=8))["rate"]  # doctest: +SKIP
      0.75
    """
    texts = _texts(prompts)
    responses = generate_responses(
        model,
        tokenizer,
        texts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        **generate_kwargs,
    )
    return judge_refusals(texts, responses, judge=judge)


def _mc_requests(
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None,
    chat: bool,
) -> list[tuple[list[int], list[int]]]:
    for i, item in enumerate(items):
        for field in ("prompt", "choices", "answer"):
            if field not in item:
                raise ValueError(f"multiple-choice item {i} has no {field!r} field")
        if len(item["choices"]) < 2:
            raise ValueError(f"item {i} has {len(item['choices'])} choices; need >= 2")
        if not 0 <= int(item["answer"]) < len(item["choices"]):
            raise ValueError(f"item {i}: answer {item['answer']} out of range")
    contexts = encode_prompts(
        tokenizer, [it["prompt"] for it in items], system_prompt=system_prompt, chat=chat
    )
    requests = []
    for item, ctx in zip(items, contexts, strict=True):
        cue = item.get("cue") or ""
        if cue:  # the answer cue opens the assistant turn (chat) or follows the question
            ctx = ctx + tokenizer.encode(cue if chat else "\n" + cue, add_special_tokens=False)
        sep = " " if (cue or not chat) else ""
        for choice in item["choices"]:
            cont = tokenizer.encode(sep + str(choice), add_special_tokens=False)
            requests.append((ctx, cont))
    return requests


def multiple_choice_accuracy(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None = None,
    chat: bool = True,
    batch_size: int = 16,
    length_bucket: int = 32,
    progress: bool | str = True,
) -> dict[str, Any]:
    """Multiple-choice accuracy by the log-likelihood of each choice's text.

    The context is the rendered question (chat template with the assistant header, or the
    plain text); when the item has a ``cue`` (e.g. "The answer is") it follows, and the choice
    is scored as " " + choice; otherwise (chat) the choice is the assistant's first words. All
    (question, choice) sequences are batched together.

    Args:
      model: a decoder.
      tokenizer: its tokenizer.
      items: dicts with ``prompt``, ``choices`` (list of str), ``answer`` (gold index), optional
        ``cue`` -- e.g. ``load_prompt_set("bbq")`` or ``load_prompt_set("gsm8k")``.
      system_prompt: optional system message.
      chat: render with the chat template.
      batch_size: scoring batch size.
      length_bucket: padded lengths are multiples of this.
      progress: tqdm bar.

    Returns:
      dict(accuracy (summed log-likelihood), accuracy_norm (per-token mean), n, predictions,
      predictions_norm, scores (list of per-choice summed log-likelihoods), counts).

    Example:
      >>> multiple_choice_accuracy(model, tok, load_prompt_set("bbq", limit=5))  # doctest: +SKIP
    """
    requests = _mc_requests(tokenizer, items, system_prompt=system_prompt, chat=chat)
    res = score_continuations(
        model,
        requests,
        batch_size=batch_size,
        length_bucket=length_bucket,
        pad_id=_pad_id(tokenizer),
        progress="multiple choice" if progress is True else progress,
    )
    scores, counts, preds, preds_norm = [], [], [], []
    k = 0
    for item in items:
        c = len(item["choices"])
        lp, cnt = res["logprob"][k : k + c], res["count"][k : k + c]
        k += c
        scores.append(lp.tolist())
        counts.append(cnt.astype(int).tolist())
        preds.append(int(np.argmax(lp)))
        preds_norm.append(int(np.argmax(lp / cnt)))
    gold = np.array([int(it["answer"]) for it in items])
    n = len(items)
    return {
        "accuracy": float(np.mean(np.array(preds) == gold)) if n else float("nan"),
        "accuracy_norm": float(np.mean(np.array(preds_norm) == gold)) if n else float("nan"),
        "n": n,
        "predictions": preds,
        "predictions_norm": preds_norm,
        "scores": scores,
        "counts": counts,
    }


def gsm8k_mc_accuracy(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    **kwargs: Any,
) -> dict[str, Any]:
    """GSM8K as 4-way multiple choice by log-likelihood (gold vs three nearby numbers).

    A proxy for small models, NOT comparable to official GSM8K: see the module docstring.

    Args:
      model: a decoder.
      tokenizer: its tokenizer.
      items: ``load_prompt_set("gsm8k")`` rows (``choices``/``answer``/``cue`` are used; rows
        with only ``prompt`` and ``target`` get them from ``prompts.gsm8k_choices``).
      **kwargs: passed to :func:`multiple_choice_accuracy`.

    Returns:
      The :func:`multiple_choice_accuracy` dict.

    Example:
      >>> gsm8k_mc_accuracy(model, tok, load_prompt_set("gsm8k", limit=4))  # doctest: +SKIP
    """
    from ogpsa_jax.eval.prompts import GSM8K_ANSWER_CUE, gsm8k_choices

    full = []
    for i, it in enumerate(items):
        if "choices" not in it:
            if "target" not in it:
                raise ValueError(f"GSM8K item {i} has neither 'choices' nor 'target'")
            choices, answer = gsm8k_choices(it["target"])
            it = {**it, "choices": choices, "answer": answer}
        full.append({**it, "cue": it.get("cue") or GSM8K_ANSWER_CUE})
    return multiple_choice_accuracy(model, tokenizer, full, **kwargs)


def extract_last_number(text: str) -> str | None:
    """The last number in a text, commas removed, trailing ".0" dropped; None if none.

    Example:
      >>> extract_last_number("So 3 + 4 = 7. The answer is 1,234.")
      '1234'
    """
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    num = found[-1].replace(",", "").rstrip(".")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return num


def gsm8k_exact_match(
    model: nnx.Module,
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    system_prompt: str | None = None,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """GSM8K by greedy generation: the last number of the answer must equal the gold number.

    Args:
      model: a decoder.
      tokenizer: its tokenizer.
      items: rows with ``prompt`` and ``target`` (``load_prompt_set("gsm8k")``).
      max_new_tokens: generation length (chain of thought needs room).
      batch_size: generation batch size.
      system_prompt: optional system message.
      **generate_kwargs: passed to ``generate_responses``.

    Returns:
      dict(accuracy, n, responses, predictions (extracted numbers or None), correct).

    Example:
      >>> gsm8k_exact_match(model, tok, load_prompt_set("gsm8k", limit=4))  # doctest: +SKIP
    """
    for i, it in enumerate(items):
        if "prompt" not in it or "target" not in it:
            raise ValueError(f"GSM8K item {i} needs 'prompt' and 'target'")
    responses = generate_responses(
        model,
        tokenizer,
        [it["prompt"] for it in items],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        **generate_kwargs,
    )
    return score_gsm8k_responses(items, responses)


def score_gsm8k_responses(
    items: Sequence[Mapping[str, Any]], responses: Sequence[str]
) -> dict[str, Any]:
    """Exact match of the last number in each response against ``item["target"]``.

    Example:
      >>> score_gsm8k_responses([{"target": "12"}], ["... so 12 apples."])["accuracy"]
      1.0
    """
    if len(items) != len(responses):
        raise ValueError(f"{len(items)} items but {len(responses)} responses")
    preds = [extract_last_number(r) for r in responses]
    correct = [
        p is not None and p == extract_last_number(str(it["target"]))
        for p, it in zip(preds, items, strict=True)
    ]
    n = len(items)
    return {
        "accuracy": float(np.mean(correct)) if n else float("nan"),
        "n": n,
        "responses": list(responses),
        "predictions": preds,
        "correct": correct,
    }


def reference_answers(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    **generate_kwargs: Any,
) -> list[list[int]]:
    """The (starting) model's greedy answers as token ids, for :func:`drift`.

    Example:
      >>> ref = reference_answers(start_model, tok, load_prompt_set("benign_reference", limit=8))  # doctest: +SKIP
    """  # noqa: E501
    return generate_token_ids(
        model,
        tokenizer,
        _texts(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        **generate_kwargs,
    )


def drift(
    model: nnx.Module,
    ref_answers: Sequence[Sequence[int] | str],
    tokenizer: Any,
    prompts: Sequence[str | Mapping[str, Any]],
    *,
    ref_model: nnx.Module | None = None,
    system_prompt: str | None = None,
    chat: bool = True,
    batch_size: int = 16,
    length_bucket: int = 32,
    progress: bool | str = True,
) -> dict[str, Any]:
    """How far a model moved from the starting model on held-out benign prompts.

    Args:
      model: the (trained) decoder.
      ref_answers: the starting model's greedy answers, one per prompt: token ids (from
        :func:`reference_answers`; exact) or strings (re-encoded without special tokens).
      tokenizer: the tokenizer.
      prompts: the prompts the answers respond to.
      ref_model: the starting model; when given, also the mean per-token KL(start || model).
      system_prompt: optional system message (use the one the answers were generated with).
      chat: render with the chat template.
      batch_size: scoring batch size.
      length_bucket: padded lengths are multiples of this.
      progress: tqdm bar.

    Returns:
      dict(nll = total NLL / total answer tokens (higher = moved further), kl (only with
      ref_model), n, tokens, nll_per_prompt).

    Example:
      >>> ref = reference_answers(start, tok, prompts)  # doctest: +SKIP
      >>> drift(trained, ref, tok, prompts, ref_model=start)["nll"]  # doctest: +SKIP
    """
    texts = _texts(prompts)
    if len(texts) != len(ref_answers):
        raise ValueError(f"{len(texts)} prompts but {len(ref_answers)} reference answers")
    contexts = encode_prompts(tokenizer, texts, system_prompt=system_prompt, chat=chat)
    requests, kept = [], []
    for i, (ctx, ans) in enumerate(zip(contexts, ref_answers, strict=True)):
        ids = tokenizer.encode(ans, add_special_tokens=False) if isinstance(ans, str) else ans
        ids = [int(t) for t in ids]
        if ids:
            requests.append((ctx, ids))
            kept.append(i)
    if len(kept) < len(texts):
        logger.warning("drift: %d empty reference answers skipped", len(texts) - len(kept))
    if not requests:
        raise ValueError("drift: every reference answer is empty")
    res = score_continuations(
        model,
        requests,
        batch_size=batch_size,
        length_bucket=length_bucket,
        pad_id=_pad_id(tokenizer),
        ref_model=ref_model,
        progress="drift" if progress is True else progress,
    )
    tokens = float(res["count"].sum())
    out = {
        "nll": float(-res["logprob"].sum() / tokens),
        "n": len(requests),
        "tokens": int(tokens),
        "nll_per_prompt": (-res["logprob"] / res["count"]).tolist(),
    }
    if ref_model is not None:
        out["kl"] = float(res["kl"].sum() / tokens)
    return out


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0
