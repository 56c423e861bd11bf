"""Batched log-likelihood scoring of continuations for any of our decoders.

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
logits go through the float32 log-softmax. The host-side layout of those batches is
``ogpsa_jax.eval.batching``.
Generation lives in ``ogpsa_jax.eval.generation``.

Example:
    >>> from ogpsa_jax import models
    >>> model = models.init_random(models.tiny_config(vocab_size=101), seed=0)
    >>> out = score_continuations(model, [([1, 5], [9, 2]), ([1, 5], [4])], batch_size=2)
    >>> out["count"].tolist(), bool(out["logprob"][0] < 0)
    ([2.0, 1.0], True)
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ogpsa_jax.eval.batching import full_sequence_batches, shared_prefix_batches
from ogpsa_jax.models.decoder import Decoder
from ogpsa_jax.models.functional import forward_with_cache, head_logits, hidden_states, prefill
from ogpsa_jax.models.sharding import with_auto_axes

logger = logging.getLogger(__name__)


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
      >>> from ogpsa_jax import models
      >>> model = models.init_random(models.tiny_config(vocab_size=101), seed=0)
      >>> score_continuations(model, [([1, 5], [9, 2]), ([1, 5], [4])])["logprob"].shape
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
    make_batches = shared_prefix_batches if shared_prefix else full_sequence_batches
    batches = list(make_batches(seqs, starts, batch_size, length_bucket, pad_id))
    desc = progress if isinstance(progress, str) else "scoring"
    for rows, arrays in tqdm(batches, desc=desc, disable=not progress, leave=False):
        res = np.asarray(jax.device_get(kernel(*arrays)), dtype=np.float64)
        for i, k in enumerate(keys):
            out[k][rows] = res[: len(rows), i]
    return out
