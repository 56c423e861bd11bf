"""GSM8K: multiple choice by log-likelihood (the default proxy) or exact match by generation.

A 135M model solves ~1% of GSM8K by generation, so the default measure is 4-way multiple choice
by log-likelihood (:func:`gsm8k_mc_accuracy`): the gold final number vs three nearby
distractors (``prompts.gsm8k_choices``) after the fixed cue "The answer is". It is NOT
comparable to official GSM8K. :func:`gsm8k_exact_match` is the generation variant (the last
number of the answer == the gold number), scored by :func:`score_gsm8k_responses`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.eval.generation import generate_responses
from ogpsa_jax.eval.multiple_choice import multiple_choice_accuracy
from ogpsa_jax.eval.prompts import GSM8K_ANSWER_CUE, gsm8k_choices

_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


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
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> from ogpsa_jax.eval.prompts import load_prompt_set
      >>> res = gsm8k_mc_accuracy(model, tok, load_prompt_set("gsm8k", limit=4), progress=False)
      >>> res["n"], [len(s) for s in res["scores"]]  # gold + three nearby numbers
      (4, [4, 4, 4, 4])
    """
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
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> from ogpsa_jax.eval.prompts import load_prompt_set
      >>> items = load_prompt_set("gsm8k", limit=2)
      >>> res = gsm8k_exact_match(model, tok, items, max_new_tokens=8, progress=False)
      >>> res["n"], len(res["responses"])
      (2, 2)
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
