"""Multiple choice by log-likelihood: each choice is scored as the assistant's answer.

The context is the rendered question (chat template with the assistant header, or the plain
text); when an item has a ``cue`` (e.g. "The answer is") it follows, and the choice is scored
as " " + choice; otherwise (chat) the choice is the assistant's first words. Accuracy is taken
with the summed log-likelihood (``accuracy``) and its per-token mean (``accuracy_norm``). All
(question, choice) requests of a call are scored together, each question prefilled once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import nnx

from ogpsa_jax.data.chat import pad_token_id
from ogpsa_jax.eval.generation import encode_prompts
from ogpsa_jax.eval.scoring import score_continuations


def check_mc_items(items: Sequence[Mapping[str, Any]]) -> None:
    """Raises ValueError naming the first malformed multiple-choice item.

    Args:
      items: dicts with ``prompt``, ``choices`` (at least two) and ``answer`` (a valid index).

    Example:
      >>> check_mc_items([{"prompt": "q", "choices": ["a", "b"], "answer": 2}])
      Traceback (most recent call last):
      ...
      ValueError: item 0: answer 2 out of range
    """
    for i, item in enumerate(items):
        for field in ("prompt", "choices", "answer"):
            if field not in item:
                raise ValueError(f"multiple-choice item {i} has no {field!r} field")
        if len(item["choices"]) < 2:
            raise ValueError(f"item {i} has {len(item['choices'])} choices; need >= 2")
        if not 0 <= int(item["answer"]) < len(item["choices"]):
            raise ValueError(f"item {i}: answer {item['answer']} out of range")


def _mc_requests(
    tokenizer: Any,
    items: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None,
    chat: bool,
) -> list[tuple[list[int], list[int]]]:
    check_mc_items(items)
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
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> from ogpsa_jax.eval.prompts import load_prompt_set
      >>> items = load_prompt_set("bbq", limit=5)
      >>> res = multiple_choice_accuracy(model, tok, items, progress=False)
      >>> res["n"], [len(s) for s in res["scores"]]  # three choices per BBQ item
      (5, [3, 3, 3, 3, 3])
    """
    requests = _mc_requests(tokenizer, items, system_prompt=system_prompt, chat=chat)
    res = score_continuations(
        model,
        requests,
        batch_size=batch_size,
        length_bucket=length_bucket,
        pad_id=pad_token_id(tokenizer),
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
