"""Batched log-likelihood scoring and greedy generation for any of our decoders.

Scoring (``score_continuations``): each request is ``(context_ids, continuation_ids)``; the full
sequence is RIGHT-padded (so positions and the causal prefix of real tokens never see padding),
rows are sorted by length into batches of a fixed size padded to length buckets (few compiled
shapes), and one jitted function returns per row the summed log-probability of the continuation
tokens, their count, whether every one of them is the greedy (argmax) token, and optionally the
summed KL(reference || model) over those positions. Only the logits rows that predict
continuation tokens are gathered before the float32 log-softmax, so a [B, L, V] log-softmax is
never materialised.

Generation (``generate_token_ids`` / ``generate_responses``): prompts are rendered with the chat
template (``ogpsa_jax.data.chat.prompt_ids``), LEFT-padded in length-sorted batches of a fixed
size and bucketed lengths, and decoded with ``ogpsa_jax.models.generate`` (KV cache).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef"))
def _score_batch(
    graphdef, state, ids_BxL, mask_BxL, pos_BxC, valid_BxC, ref_graphdef=None, ref_state=None
):
    """Per-row sums over the continuation: log p, count, all-greedy, KL(ref || model).

    ``pos_BxC[b, c]`` is the position whose logits predict continuation token c (the token at
    ``pos + 1``); only those C rows of the logits go through the softmax (C << L for answers).
    """
    tok_BxC = jnp.take_along_axis(ids_BxL, pos_BxC + 1, axis=1)
    valid_BxC = valid_BxC.astype(jnp.float32)

    def _logp(graphdef, state):
        logits_BxLxV = nnx.merge(graphdef, state)(ids_BxL, attention_mask=mask_BxL)
        logits_BxCxV = jnp.take_along_axis(logits_BxLxV, pos_BxC[..., None], axis=1)
        return jax.nn.log_softmax(logits_BxCxV.astype(jnp.float32), axis=-1)

    logp_BxCxV = _logp(graphdef, state)
    tok_logp_BxC = jnp.take_along_axis(logp_BxCxV, tok_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = (jnp.argmax(logp_BxCxV, axis=-1) == tok_BxC).astype(jnp.float32)
    out = {
        "logprob": jnp.sum(tok_logp_BxC * valid_BxC, axis=-1),
        "count": jnp.sum(valid_BxC, axis=-1),
        # min over targets of "is greedy"; rows without targets report 1 (vacuously greedy)
        "greedy": jnp.min(jnp.where(valid_BxC > 0, greedy_BxC, 1.0), axis=-1),
    }
    if ref_graphdef is not None:
        ref_logp_BxCxV = _logp(ref_graphdef, ref_state)
        kl_BxC = jnp.sum(jnp.exp(ref_logp_BxCxV) * (ref_logp_BxCxV - logp_BxCxV), axis=-1)
        out["kl"] = jnp.sum(kl_BxC * valid_BxC, axis=-1)
    return out


def score_continuations(
    model: nnx.Module,
    requests: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 16,
    max_length: int | None = None,
    length_bucket: int = 32,
    pad_id: int = 0,
    ref_model: nnx.Module | None = None,
    progress: bool | str = False,
) -> dict[str, np.ndarray]:
    """Log-likelihood of each continuation given its context, in fixed-shape batches.

    Args:
      model: a decoder ``model(input_ids, attention_mask=) -> logits [B, L, V]``.
      requests: ``(context_ids, continuation_ids)`` pairs; the context must be non-empty (it
        predicts the first continuation token) and the continuation non-empty.
      batch_size: rows per compiled call (the last batch is padded with copies).
      max_length: longest sequence fed to the model; longer ones lose context tokens from the
        left (logged). None: no limit.
      length_bucket: padded lengths are multiples of this (fewer compilations).
      pad_id: token id used for padding (masked out).
      ref_model: if given, also return ``kl``: the summed KL(ref || model) of the next-token
        distributions over the continuation positions.
      progress: show a tqdm bar (a string is used as its description).

    Returns:
      dict of float64 arrays ``[N]`` in request order: ``logprob`` (sum of log p of the
      continuation tokens), ``count`` (their number), ``greedy`` (1.0 when each continuation
      token is the argmax), and ``kl`` when ``ref_model`` is given.

    Example:
      >>> out = score_continuations(model, [([1, 5, 7], [9, 2])])  # doctest: +SKIP
      >>> out["logprob"].shape
      (1,)
    """
    if batch_size < 1 or length_bucket < 1:
        raise ValueError(
            f"batch_size and length_bucket must be >= 1: {batch_size}, {length_bucket}"
        )
    seqs, starts = [], []
    truncated = 0
    for i, (ctx, cont) in enumerate(requests):
        ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
        if not ctx:
            raise ValueError(f"request {i} has an empty context (needs >= 1 token to predict from)")
        if not cont:
            raise ValueError(f"request {i} has an empty continuation")
        full = ctx + cont
        if max_length is not None and len(full) > max_length:
            if len(cont) >= max_length:
                raise ValueError(
                    f"request {i}: continuation of {len(cont)} tokens does not fit "
                    f"max_length={max_length}"
                )
            full = full[len(full) - max_length :]
            truncated += 1
        seqs.append(full)
        starts.append(len(full) - len(cont))
    if truncated:
        logger.info("score_continuations: left-truncated %d contexts to %d", truncated, max_length)
    n = len(seqs)
    keys = ["logprob", "count", "greedy"] + (["kl"] if ref_model is not None else [])
    out = {k: np.zeros(n, dtype=np.float64) for k in keys}
    if n == 0:
        return out
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(ref_model) if ref_model is not None else (None, None)
    order = sorted(range(n), key=lambda j: -len(seqs[j]))
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    # One continuation width for the whole call (few compiled shapes).
    cont_width = _bucket(max(len(seqs[j]) - starts[j] for j in range(n)), 8)
    desc = progress if isinstance(progress, str) else "scoring"
    for rows in tqdm(batches, desc=desc, disable=not progress, leave=False):
        width = _bucket(max(len(seqs[j]) for j in rows), length_bucket)
        ids = np.full((batch_size, width), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, width), dtype=np.int32)
        pos = np.zeros((batch_size, cont_width), dtype=np.int32)
        valid = np.zeros((batch_size, cont_width), dtype=np.int32)
        for b in range(batch_size):
            j = rows[b] if b < len(rows) else rows[0]  # pad the batch with copies of a real row
            s, c = seqs[j], len(seqs[j]) - starts[j]
            ids[b, : len(s)] = s
            mask[b, : len(s)] = 1
            pos[b, :c] = np.arange(starts[j] - 1, len(s) - 1)
            valid[b, :c] = 1
        res = _score_batch(
            graphdef, state, ids, mask, pos, valid, ref_graphdef=ref_graphdef, ref_state=ref_state
        )
        res = jax.device_get(res)
        for k in keys:
            out[k][rows] = np.asarray(res[k][: len(rows)], dtype=np.float64)
    return out


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """End-of-generation ids for a model and tokenizer.

    Args:
      model: a decoder (its ``config.eos_token_id``, int or tuple, is used when present).
      tokenizer: a Hugging Face tokenizer.

    Returns:
      Sorted ids: the config's eos ids, the tokenizer's eos id, and the end-of-turn tokens
      (``<|im_end|>``, ``<|eot_id|>``, ``<|end_of_text|>``, ``<|endoftext|>``) in its vocabulary.

    Example:
      >>> eos_token_ids(model, tok)  # doctest: +SKIP
      [0, 2]
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
      >>> encode_prompts(tok, ["Hi"])[0][-2:] == tok.encode("assistant\n")  # doctest: +SKIP
      True
    """
    from ogpsa_jax.data.chat import prompt_ids

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
      batch_size: prompts per compiled call (the last batch is padded with copies).
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
      >>> ids = generate_token_ids(model, tok, ["Hi"], max_new_tokens=8)  # doctest: +SKIP
    """
    from ogpsa_jax.data.chat import pad_token_id

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
      batch_size: prompts per compiled call (the last batch is padded with copies).
      temperature: 0.0 = greedy.
      top_p: nucleus threshold when sampling.
      seed: PRNG seed when sampling (batch ``i`` uses ``fold_in(key, i)``).
      length_bucket: prompt lengths are padded to multiples of this.
      progress: tqdm bar (a string is used as its description).

    Returns:
      Generated ids per prompt in input order, cut after the first end token.

    Example:
      >>> generate_from_ids(model, [[1, 2, 3]], eos_token_ids=[0], pad_id=0)  # doctest: +SKIP
    """
    from ogpsa_jax.data.chat import left_pad
    from ogpsa_jax.models import generate

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
      >>> generate_responses(model, tok, ["What is 2+2?"], max_new_tokens=8)  # doctest: +SKIP
      ['2 + 2 = 4.']
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
