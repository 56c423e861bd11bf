"""Batched log-likelihood scoring and greedy generation for any of our decoders.

Scoring (``score_continuations``): each request is ``(context_ids, continuation_ids)``; the
result per request is the summed log-probability of the continuation tokens, their count,
whether every one of them is the greedy (argmax) token, and optionally the summed
KL(reference || model) over those positions. Three paths compute the same numbers:

- shared prefix (``Decoder`` models, the default): requests are grouped by identical context;
  each distinct context minus its last token runs once (``prefill`` into a KV cache, RIGHT-padded
  so slot == position), the cache is gathered per request, and only the continuation tokens run
  (the last context token, then all continuation tokens but the last) through
  ``forward_with_cache``: the lm_head sees only the C positions that predict continuation tokens.
  A multiple-choice item with k choices runs its question once instead of k times.
- full sequence (``Decoder`` models, ``shared_prefix=False``): each RIGHT-padded context +
  continuation runs whole; the final hidden states of the C predicting positions are gathered
  before the lm_head, so [B, L, V] logits are never materialised.
- generic (any other ``model(ids, attention_mask=) -> logits``): full logits, then the gather.

Batches have a fixed number of rows (padded with copies), lengths are bucketed, and the
continuation width is one bucket per call, so few shapes compile. Only the C gathered rows of
logits go through the float32 log-softmax.

Generation (``generate_token_ids`` / ``generate_responses``): prompts are rendered with the chat
template (``ogpsa_jax.data.chat.prompt_ids``), LEFT-padded in length-sorted batches of a fixed
size and bucketed lengths, and decoded with ``ogpsa_jax.models.generate`` (KV cache).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ogpsa_jax.models.decoder import Decoder
from ogpsa_jax.models.functional import forward_with_cache, head_logits, hidden_states, prefill
from ogpsa_jax.models.sharding import with_auto_axes

logger = logging.getLogger(__name__)

_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>")
_CONT_BUCKET = 4  # continuation widths are multiples of this (one width per call)


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _stats(
    logp_BxCxV: jax.Array,
    tok_BxC: jax.Array,
    valid_BxC: jax.Array,
    ref_logp_BxCxV: jax.Array | None,
) -> jax.Array:
    """[B, 3 or 4] per-row sums over valid targets: log p, count, all-greedy, KL(ref || model)."""
    valid_BxC = valid_BxC.astype(jnp.float32)
    tok_logp_BxC = jnp.take_along_axis(logp_BxCxV, tok_BxC[..., None], axis=-1)[..., 0]
    greedy_BxC = (jnp.argmax(logp_BxCxV, axis=-1) == tok_BxC).astype(jnp.float32)
    cols = [
        jnp.sum(tok_logp_BxC * valid_BxC, axis=-1),
        jnp.sum(valid_BxC, axis=-1),
        # min over targets of "is greedy"; rows without targets report 1 (vacuously greedy)
        jnp.min(jnp.where(valid_BxC > 0, greedy_BxC, 1.0), axis=-1),
    ]
    if ref_logp_BxCxV is not None:
        kl_BxC = jnp.sum(jnp.exp(ref_logp_BxCxV) * (ref_logp_BxCxV - logp_BxCxV), axis=-1)
        cols.append(jnp.sum(kl_BxC * valid_BxC, axis=-1))
    return jnp.stack(cols, axis=-1)


def _log_softmax32(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "ref_graphdef"))
def _score_generic(
    graphdef, state, ids_BxL, mask_BxL, pos_BxC, valid_BxC, ref_graphdef=None, ref_state=None
):
    """Any ``model(ids, attention_mask=) -> [B, L, V]``; ``pos_BxC[b, c]`` predicts token
    ``pos + 1``, and only those C rows of the logits go through the softmax."""
    tok_BxC = jnp.take_along_axis(ids_BxL, pos_BxC + 1, axis=1)

    def logp(graphdef, state):
        logits_BxLxV = nnx.merge(graphdef, state)(ids_BxL, attention_mask=mask_BxL)
        return _log_softmax32(jnp.take_along_axis(logits_BxLxV, pos_BxC[..., None], axis=1))

    ref = logp(ref_graphdef, ref_state) if ref_graphdef is not None else None
    return _stats(logp(graphdef, state), tok_BxC, valid_BxC, ref)


_STATIC = ("config", "dtype", "ref_config", "ref_dtype")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score_full(
    params,
    ids_BxL,
    mask_BxL,
    pos_BxC,
    valid_BxC,
    ref_params,
    *,
    config,
    dtype,
    ref_config,
    ref_dtype,
):
    """Full-sequence forward of a Decoder; the lm_head runs on the C gathered hidden rows."""

    def run(params, ref_params, ids_BxL, mask_BxL, pos_BxC, valid_BxC):
        def logp(params, config, dtype):
            h_BxLxD = hidden_states(params, config, dtype, ids_BxL, mask_BxL)
            h_BxCxD = jnp.take_along_axis(h_BxLxD, pos_BxC[..., None], axis=1)
            return _log_softmax32(head_logits(params, config, dtype, h_BxCxD))

        tok_BxC = jnp.take_along_axis(ids_BxL, pos_BxC + 1, axis=1)
        ref = logp(ref_params, ref_config, ref_dtype) if ref_config is not None else None
        return _stats(logp(params, config, dtype), tok_BxC, valid_BxC, ref)

    k = 3 if ref_config is None else 4
    return with_auto_axes(run, (ids_BxL.shape[0], k))(
        params, ref_params, ids_BxL, mask_BxL, pos_BxC, valid_BxC
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _score_shared(
    params,
    ctx_GxP,
    ctx_mask_GxP,
    group_R,
    ids_RxC,
    pos_RxC,
    tok_RxC,
    valid_RxC,
    ref_params,
    *,
    config,
    dtype,
    ref_config,
    ref_dtype,
):
    """Prefill G distinct contexts once, then run each row's C tokens against its context.

    Row r belongs to context ``group_R[r]``; it feeds the context's last token and its
    continuation but the last (``ids_RxC``, RoPE positions ``pos_RxC``), written at cache slots
    [P, P + C), and scores ``tok_RxC`` (the continuation) where ``valid_RxC``.
    """

    def run(
        params, ref_params, ctx_GxP, ctx_mask_GxP, group_R, ids_RxC, pos_RxC, tok_RxC, valid_RxC
    ):
        p, c = ctx_GxP.shape[1], ids_RxC.shape[1]
        kv_valid_RxT = jnp.concatenate(
            [ctx_mask_GxP.astype(bool)[group_R], valid_RxC.astype(bool)], axis=1
        )

        def logp(params, config, dtype):
            caches = prefill(params, config, dtype, ctx_GxP, ctx_mask_GxP, p + c)
            caches = tuple(jnp.take(x, group_R, axis=1) for x in caches)
            logits_RxCxV, _ = forward_with_cache(
                params, config, dtype, ids_RxC, pos_RxC, kv_valid_RxT, caches, p
            )
            return _log_softmax32(logits_RxCxV)

        ref = logp(ref_params, ref_config, ref_dtype) if ref_config is not None else None
        return _stats(logp(params, config, dtype), tok_RxC, valid_RxC, ref)

    k = 3 if ref_config is None else 4
    return with_auto_axes(run, (ids_RxC.shape[0], k))(
        params, ref_params, ctx_GxP, ctx_mask_GxP, group_R, ids_RxC, pos_RxC, tok_RxC, valid_RxC
    )


def _full_batches(
    seqs: list[list[int]], starts: list[int], batch_size: int, length_bucket: int, pad_id: int
):
    """Yields (rows, (ids, mask, pos, valid)): RIGHT-padded whole sequences sorted by length."""
    n = len(seqs)
    order = sorted(range(n), key=lambda j: -len(seqs[j]))
    cont_width = _bucket(max(len(seqs[j]) - starts[j] for j in range(n)), _CONT_BUCKET)
    for s in range(0, n, batch_size):
        rows = order[s : s + batch_size]
        width = _bucket(max(len(seqs[j]) for j in rows), length_bucket)
        ids = np.full((batch_size, width), pad_id, dtype=np.int32)
        mask = np.zeros((batch_size, width), dtype=np.int32)
        pos = np.zeros((batch_size, cont_width), dtype=np.int32)
        valid = np.zeros((batch_size, cont_width), dtype=np.int32)
        for b in range(batch_size):
            j = rows[b] if b < len(rows) else rows[0]  # pad the batch with copies of a real row
            seq, c = seqs[j], len(seqs[j]) - starts[j]
            ids[b, : len(seq)] = seq
            mask[b, : len(seq)] = 1
            pos[b, :c] = np.arange(starts[j] - 1, len(seq) - 1)
            valid[b, :c] = 1
        yield rows, (ids, mask, pos, valid)


def _shared_batches(
    seqs: list[list[int]], starts: list[int], batch_size: int, length_bucket: int, pad_id: int
):
    """Yields (rows, arrays) for `_score_shared`: whole context groups packed into batches of
    at most `batch_size` rows (a larger group is split), contexts sorted by length."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for j, (seq, start) in enumerate(zip(seqs, starts, strict=True)):
        groups.setdefault(tuple(seq[:start]), []).append(j)
    chunks = [
        (ctx, members[s : s + batch_size])
        for ctx, members in sorted(groups.items(), key=lambda kv: -len(kv[0]))
        for s in range(0, len(members), batch_size)
    ]
    # Context rows per call: a multiple of how many of the largest groups fit in a batch.
    per_batch = max(1, batch_size // max(len(m) for _, m in chunks))
    packed: list[list[tuple[tuple[int, ...], list[int]]]] = [[]]
    for chunk in chunks:
        if sum(len(m) for _, m in packed[-1]) + len(chunk[1]) > batch_size:
            packed.append([])
        packed[-1].append(chunk)
    cont_width = _bucket(max(len(s) - st for s, st in zip(seqs, starts, strict=True)), _CONT_BUCKET)
    logger.debug(
        "score_continuations: %d requests, %d distinct contexts, %d batches",
        len(seqs),
        len(groups),
        len(packed),
    )
    for batch in packed:
        n_ctx = min(_bucket(len(batch), per_batch), batch_size)
        width = _bucket(max(1, max(len(ctx) - 1 for ctx, _ in batch)), length_bucket)
        ctx_ids = np.full((n_ctx, width), pad_id, dtype=np.int32)
        ctx_mask = np.zeros((n_ctx, width), dtype=np.int32)
        for g in range(n_ctx):
            ctx = batch[g][0] if g < len(batch) else batch[0][0]  # pad with copies
            ctx_ids[g, : len(ctx) - 1] = ctx[:-1]
            ctx_mask[g, : len(ctx) - 1] = 1
        rows = [j for _, members in batch for j in members]
        row_group = [g for g, (_, members) in enumerate(batch) for _ in members]
        group = np.zeros(batch_size, dtype=np.int32)
        ids = np.full((batch_size, cont_width), pad_id, dtype=np.int32)
        pos = np.zeros((batch_size, cont_width), dtype=np.int32)
        tok = np.full((batch_size, cont_width), pad_id, dtype=np.int32)
        valid = np.zeros((batch_size, cont_width), dtype=np.int32)
        for b in range(batch_size):
            r = b if b < len(rows) else 0  # pad the batch with copies of a real row
            seq, start = seqs[rows[r]], starts[rows[r]]
            c = len(seq) - start
            group[b] = row_group[r]
            ids[b, :c] = seq[start - 1 : -1]
            pos[b] = start - 1 + np.arange(cont_width)
            tok[b, :c] = seq[start:]
            valid[b, :c] = 1
        yield rows, (ctx_ids, ctx_mask, group, ids, pos, tok, valid)


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
    shared_prefix: bool = True,
) -> dict[str, np.ndarray]:
    """Log-likelihood of each continuation given its context, in fixed-shape batches.

    For ``Decoder`` models (and ``ref_model`` a ``Decoder`` or None) requests with identical
    (truncated) context ids share one prefill of that context, and logits are computed only at
    the positions that predict continuation tokens; any other model runs whole sequences.

    Args:
      model: a ``Decoder``, or any ``model(input_ids, attention_mask=) -> logits [B, L, V]``.
      requests: ``(context_ids, continuation_ids)`` pairs; the context must be non-empty (it
        predicts the first continuation token) and the continuation non-empty.
      batch_size: scored rows per compiled call (the last batch is padded with copies); with
        the shared prefix, the contexts of those rows are prefilled together.
      max_length: longest sequence fed to the model; longer ones lose context tokens from the
        left (logged). None: no limit.
      length_bucket: padded (context) lengths are multiples of this (fewer compilations).
      pad_id: token id used for padding (masked out).
      ref_model: if given, also return ``kl``: the summed KL(ref || model) of the next-token
        distributions over the continuation positions.
      progress: show a tqdm bar (a string is used as its description).
      shared_prefix: group requests by context and run each context once (``Decoder`` models
        only); False runs every context + continuation whole (same results, slower when
        contexts repeat).

    Returns:
      dict of float64 arrays ``[N]`` in request order: ``logprob`` (sum of log p of the
      continuation tokens), ``count`` (their number), ``greedy`` (1.0 when each continuation
      token is the argmax), and ``kl`` when ``ref_model`` is given.

    Example:
      >>> out = score_continuations(model, [([1, 5], [9, 2]), ([1, 5], [4])])  # doctest: +SKIP
      >>> out["logprob"].shape
      (2,)
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

    kernel: Callable[..., jax.Array]
    if isinstance(model, Decoder) and (ref_model is None or isinstance(ref_model, Decoder)):
        static = dict(
            config=model.config,
            dtype=model.dtype,
            ref_config=None if ref_model is None else ref_model.config,
            ref_dtype=None if ref_model is None else ref_model.dtype,
        )
        params = model.params()
        ref_params = None if ref_model is None else ref_model.params()
        score = _score_shared if shared_prefix else _score_full
        kernel = lambda *arrays: score(params, *arrays, ref_params, **static)
    else:
        shared_prefix = False
        graphdef, state = nnx.split(model)
        ref_graphdef, ref_state = nnx.split(ref_model) if ref_model is not None else (None, None)
        kernel = lambda *arrays: _score_generic(
            graphdef, state, *arrays, ref_graphdef=ref_graphdef, ref_state=ref_state
        )
    make_batches = _shared_batches if shared_prefix else _full_batches
    batches = list(make_batches(seqs, starts, batch_size, length_bucket, pad_id))
    desc = progress if isinstance(progress, str) else "scoring"
    for rows, arrays in tqdm(batches, desc=desc, disable=not progress, leave=False):
        res = np.asarray(jax.device_get(kernel(*arrays)), dtype=np.float64)
        for i, k in enumerate(keys):
            out[k][rows] = res[: len(rows), i]
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
