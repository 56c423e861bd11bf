"""Drift: how far a model moved from the starting model on held-out benign prompts.

:func:`reference_answers` records the starting model's greedy answers (token ids); :func:`drift`
is the mean per-token NLL of those answers under the model (higher = moved further) and, with
the starting model, the mean per-token KL(start || model) on the same positions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flax import nnx

from ogpsa_jax.data.chat import pad_token_id
from ogpsa_jax.eval.generation import encode_prompts, generate_token_ids
from ogpsa_jax.eval.prompts import prompt_texts
from ogpsa_jax.eval.scoring import score_continuations

logger = logging.getLogger(__name__)


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
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> answers = reference_answers(model, tok, ["Name a colour."], max_new_tokens=4,
      ...                             progress=False)
      >>> len(answers), len(answers[0]) <= 4
      (1, True)
    """
    return generate_token_ids(
        model,
        tokenizer,
        prompt_texts(prompts),
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
      ref_model), n, tokens, nll_per_prompt, tokens_per_prompt (of the non-empty answers)).

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> prompts = ["Name a colour.", "Say hello."]
      >>> ref = [[40, 41, 42], [50, 51]]  # e.g. reference_answers(start_model, tok, prompts)
      >>> res = drift(model, ref, tok, prompts, ref_model=model, progress=False)
      >>> res["tokens"], res["nll"] > 0.0, abs(res["kl"]) < 1e-5  # KL of a model with itself
      (5, True, True)
    """
    texts = prompt_texts(prompts)
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
        pad_id=pad_token_id(tokenizer),
        ref_model=ref_model,
        progress="drift" if progress is True else progress,
    )
    tokens = float(res["count"].sum())
    out = {
        "nll": float(-res["logprob"].sum() / tokens),
        "n": len(requests),
        "tokens": int(tokens),
        "nll_per_prompt": (-res["logprob"] / res["count"]).tolist(),
        "tokens_per_prompt": res["count"].astype(int).tolist(),
    }
    if ref_model is not None:
        out["kl"] = float(res["kl"].sum() / tokens)
    return out
