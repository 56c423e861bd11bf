"""Generation for evaluation: prompts rendered and encoded, decoded in fixed-shape batches.

Prompts are rendered with the chat template (``ogpsa_jax.data.chat.prompt_ids``) or encoded as
plain text, LEFT-padded in length-sorted batches of a fixed size with bucketed lengths (the
last batch is padded with copies, so few shapes compile), and decoded with
``ogpsa_jax.models.generate`` (KV cache; greedy, or sampled with a per-batch key). Rows are cut
after their first end token (:func:`eos_token_ids`: the config's and tokenizer's eos ids and
the usual end-of-turn tokens).

- :func:`generate_responses`: decoded strings per prompt.
- :func:`generate_token_ids`: token ids per prompt (e.g. a starting model's answers to score).
- :func:`generate_from_ids`: the same from already encoded prompts.

Example:
    >>> from ogpsa_jax import data, models
    >>> from transformers import AutoTokenizer
    >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
    >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
    >>> out = generate_token_ids(model, tok, ["Hi", "Tell me a story"], max_new_tokens=4,
    ...                          progress=False)
    >>> [0 < len(ids) <= 4 for ids in out]
    [True, True]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ogpsa_jax.data.chat import left_pad, pad_token_id, prompt_ids
from ogpsa_jax.models import generate

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-generation ids for a model and tokenizer.

    Args:
      model: a decoder (its ``config.eos_token_id``, int or tuple, is used when present).
      tokenizer: a Hugging Face tokenizer.

    Returns:
      Sorted ids: the config's eos ids, the tokenizer's eos id, and the end-of-turn tokens
      (``<|im_end|>``, ``<|eot_id|>``, ``<|end_of_text|>``, ``<|endoftext|>``) in its vocabulary.

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> tok.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tok)
      True
    """
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if cfg_eos is not None:
        ids.extend([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in _END_OF_TURN_TOKENS if t in vocab)
    ids = sorted({int(i) for i in ids})
    if not ids:
        raise ValueError("no end-of-sequence token found in the model config or the tokenizer")
    return ids


def encode_prompts(
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    system_prompt: str | None = None,
    chat: bool = True,
) -> list[list[int]]:
    """Token ids of each prompt.

    Args:
      tokenizer: a Hugging Face tokenizer (with a chat template when ``chat``).
      prompts: user prompts.
      system_prompt: optional system message (needs ``chat``).
      chat: render one user turn plus the assistant header (``data.chat.prompt_ids``); else
        the plain text with the tokenizer's special tokens (e.g. BOS).

    Returns:
      One list of ids per prompt.

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> ids = encode_prompts(tok, ["Hi"])[0]
      >>> tok.decode(ids).rstrip().endswith("<|im_start|>assistant")
      True
    """
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")
    if chat:
        return [prompt_ids(tokenizer, p, system_prompt=system_prompt).tolist() for p in prompts]
    if system_prompt is not None:
        raise ValueError("system_prompt needs chat=True")
    return [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]


def generate_token_ids(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    chat: bool = True,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    length_bucket: int = 32,
    progress: bool | str = True,
) -> list[list[int]]:
    """Generated token ids per prompt, cut after the first end token (which is kept).

    Args:
      model: a decoder from ``load_hf`` / ``init_random``.
      tokenizer: its Hugging Face tokenizer.
      prompts: user prompts (strings).
      max_new_tokens: generation length.
      batch_size: prompts per compiled call (the last batch is padded with copies; see
        `generate_from_ids`).
      system_prompt: optional system message.
      chat: render with the chat template (else plain text with special tokens).
      temperature: 0.0 = greedy.
      top_p: nucleus sampling threshold when sampling.
      seed: PRNG seed when sampling (batch ``i`` uses ``fold_in(key, i)``).
      length_bucket: prompt lengths are padded to multiples of this.
      progress: show a tqdm bar (a string is used as its description).

    Returns:
      One list of ids per prompt, in input order.

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> ids = generate_token_ids(model, tok, ["Hi"], max_new_tokens=8, progress=False)
      >>> len(ids), len(ids[0]) <= 8
      (1, True)
    """
    encoded = encode_prompts(tokenizer, prompts, system_prompt=system_prompt, chat=chat)
    return generate_from_ids(
        model,
        encoded,
        eos_token_ids=eos_token_ids(model, tokenizer),
        pad_id=pad_token_id(tokenizer),
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        length_bucket=length_bucket,
        progress=progress,
    )


def generate_from_ids(
    model: nnx.Module,
    encoded: Sequence[Sequence[int]],
    *,
    eos_token_ids: Sequence[int],
    pad_id: int,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    length_bucket: int = 32,
    progress: bool | str = True,
) -> list[list[int]]:
    """Batched generation from token ids (left-padded, length-sorted, bucketed batches).

    Args:
      model: a decoder.
      encoded: prompt token ids, each non-empty.
      eos_token_ids: ids that end a row (the first one is kept in the output).
      pad_id: padding id for the prompts and for rows that ended.
      max_new_tokens: generation length.
      batch_size: prompts per compiled call (the last batch is padded with copies; a set
        of fewer prompts runs as one batch of its own size).
      temperature: 0.0 = greedy.
      top_p: nucleus threshold when sampling.
      seed: PRNG seed when sampling (batch ``i`` uses ``fold_in(key, i)``).
      length_bucket: prompt lengths are padded to multiples of this.
      progress: tqdm bar (a string is used as its description).

    Returns:
      Generated ids per prompt in input order, cut after the first end token.

    Example:
      >>> from ogpsa_jax import models
      >>> model = models.init_random(models.tiny_config(vocab_size=101), seed=0)
      >>> out = generate_from_ids(model, [[1, 2, 3], [4]], eos_token_ids=[0], pad_id=0,
      ...                         max_new_tokens=5, progress=False)
      >>> [len(row) <= 5 for row in out]
      [True, True]
    """
    if max_new_tokens < 1 or batch_size < 1 or length_bucket < 1:
        raise ValueError(
            "max_new_tokens, batch_size and length_bucket must be >= 1, got "
            f"{max_new_tokens}, {batch_size}, {length_bucket}"
        )
    eos = sorted({int(t) for t in eos_token_ids})
    if not eos:
        raise ValueError("eos_token_ids is empty")
    for i, e in enumerate(encoded):
        if len(e) == 0:
            raise ValueError(f"prompt {i} encodes to no tokens")
    # a set smaller than one batch runs as one batch of its own size (no padding copies)
    batch_size = min(batch_size, max(len(encoded), 1))
    order = sorted(range(len(encoded)), key=lambda j: -len(encoded[j]))
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    results: list[list[int]] = [[] for _ in encoded]
    key = jax.random.key(seed)
    desc = progress if isinstance(progress, str) else "generating"
    for bi, rows in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        padded_rows = rows + [rows[0]] * (batch_size - len(rows))
        ids, mask = left_pad([encoded[j] for j in padded_rows], pad_id, multiple_of=length_bucket)
        new = generate(
            model,
            jnp.asarray(ids),
            jnp.asarray(mask),
            max_new_tokens=max_new_tokens,
            eos_token_id=eos if len(eos) > 1 else eos[0],
            temperature=temperature,
            top_p=top_p,
            rng=jax.random.fold_in(key, bi) if temperature > 0 else None,
            pad_token_id=pad_id,
        )
        new = np.asarray(jax.device_get(new))
        for b, j in enumerate(rows):
            row = new[b].tolist()
            stop = next((t for t, tok in enumerate(row) if tok in eos), None)
            results[j] = row if stop is None else row[: stop + 1]
    return results


def generate_responses(
    model: nnx.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    system_prompt: str | None = None,
    **kwargs: Any,
) -> list[str]:
    """Decoded responses (special tokens dropped, stripped) for each prompt.

    Args:
      model: a decoder from ``load_hf`` / ``init_random``.
      tokenizer: its Hugging Face tokenizer.
      prompts: user prompts.
      max_new_tokens: generation length (a refusal shows in the first 32 tokens).
      batch_size: prompts per compiled call.
      system_prompt: optional system message.
      **kwargs: passed to :func:`generate_token_ids` (chat, temperature, top_p, seed,
        length_bucket, progress).

    Returns:
      One string per prompt, in input order.

    Example:
      >>> from transformers import AutoTokenizer
      >>> from ogpsa_jax import data, models
      >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
      >>> model = models.init_random(models.tiny_config(vocab_size=len(tok)), seed=0)
      >>> out = generate_responses(model, tok, ["What is 2+2?"], max_new_tokens=8, progress=False)
      >>> type(out[0])  # a trained model answers e.g. '2 + 2 = 4.'
      <class 'str'>
    """
    ids = generate_token_ids(
        model,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        **kwargs,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in ids]


def answer_and_score(
    model: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    check: Any,
    score: Any,
    *,
    max_new_tokens: int,
    batch_size: int,
    system_prompt: str | None,
    progress: bool | str,
) -> dict[str, Any]:
    """Greedy answers (chat template) to the rows' prompts, scored by ``score(rows,
    responses)``: the shared body of the instruction-following evaluators. ``check(rows)``
    raises for bad rows before anything is generated."""
    check(rows)
    responses = generate_responses(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress=progress,
    )
    return {**score(rows, responses), "responses": responses, "max_new_tokens": max_new_tokens}
