"""Refusal rate: how often a model's responses refuse, by a refusal judge.

:func:`refusal_rate` generates greedy responses (chat template by default) and judges them;
:func:`judge_refusals` judges given responses (no model). Both report the judge's name; the
default judge is :func:`~ogpsa_jax.eval.judge.default_judge`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.eval.generation import generate_responses
from ogpsa_jax.eval.judge import Judge, default_judge
from ogpsa_jax.eval.prompts import prompt_texts


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
      judge: a :class:`Judge`; default :func:`~ogpsa_jax.eval.judge.default_judge`.

    Returns:
      dict(rate, n, judge, responses, refused) -- ``refused`` is a list of bools.

    Example:
      >>> judge_refusals(["q1", "q2"], ["I cannot help with that.", "Sure: ..."])["rate"]
      0.5
    """
    judge = default_judge() if judge is None else judge
    texts = prompt_texts(prompts)
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
      judge: a :class:`Judge`; default :func:`~ogpsa_jax.eval.judge.default_judge`.
      max_new_tokens: response length (a refusal shows in the first 32 tokens).
      batch_size: generation batch size.
      system_prompt: optional system message.
      **generate_kwargs: passed to ``generate_responses`` (chat, progress, ...).

    Returns:
      dict(rate in [0, 1], n, judge (name), responses, refused).

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> from ogpsa_jax.eval.prompts import load_prompt_set
      >>> res = refusal_rate(model, tok, load_prompt_set("harmbench", limit=4), progress=False)
      >>> res["n"], 0.0 <= res["rate"] <= 1.0  # SmolLM2-135M-Instruct refuses ~10% of them
      (4, True)
    """
    texts = prompt_texts(prompts)
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
