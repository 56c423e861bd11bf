"""The sum of token log-probabilities of sequences, and their count: one definition for
training losses, DPO, scoring and evaluation.

Batch convention (shared with ``ogpsa_jax.data``): ``loss_mask[b, t] = 1`` iff
``input_ids[b, t]`` is a target, so ``logits[:, :-1]`` are scored against ``input_ids[:, 1:]``
under ``loss_mask[:, 1:]``. With a model: ``sequence_logprobs(model(ids, mask), ids, loss_mask)``,
or ``model.sequence_logprobs(ids, mask, loss_mask)``, which runs the lm_head in chunks of
positions (`chunked_sequence_logprobs`) so that the logits of a whole batch never exist at once.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.functional import head_logits


def sequence_logprobs(
    logits_BxLxV: jax.Array, input_ids_BxL: jax.Array, loss_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per row: the sum of log p(token t | tokens before t) over target tokens, and their count.

    Computed in float32 as the target logit minus the logsumexp of its row, so no second
    [B, L, V] array (a full log-softmax) is materialised. Losses return (sum, count) so that
    accumulation over micro-batches divides once.

    Args:
        logits_BxLxV: logits of a causal model ([:, t] predicts token t + 1), any float dtype.
        input_ids_BxL: int token ids.
        loss_mask_BxL: 1 where input_ids[b, t] is a target token (position 0 never counts).

    Returns:
        (sum_B, count_B): float32 [B] each.

    Raises:
        ValueError: the shapes do not agree.

    Example:
        >>> logits = jnp.log(jnp.array([[[0.5, 0.5], [0.25, 0.75], [1.0, 1.0]]]))
        >>> s, n = sequence_logprobs(logits, jnp.array([[0, 1, 1]]), jnp.array([[0, 1, 1]]))
        >>> float(s[0]), float(n[0])  # log 0.5 + log 0.75, 2 targets
        (-0.9808292388916016, 2.0)
    """
    if logits_BxLxV.ndim != 3 or not (
        logits_BxLxV.shape[:2] == input_ids_BxL.shape == loss_mask_BxL.shape
    ):
        raise ValueError(
            f"need logits [B, L, V] with input_ids and loss_mask [B, L]: got logits "
            f"{logits_BxLxV.shape}, input_ids {input_ids_BxL.shape}, loss_mask "
            f"{loss_mask_BxL.shape}"
        )
    logits_BxTxV = logits_BxLxV[:, :-1].astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, input_ids_BxL[:, 1:, None], axis=-1)[..., 0]
    m_BxT = loss_mask_BxL[:, 1:].astype(jnp.float32)
    return jnp.sum((picked_BxT - logz_BxT) * m_BxT, axis=1), jnp.sum(m_BxT, axis=1)


def chunked_sequence_logprobs(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    h_BxLxD: jax.Array,
    input_ids_BxL: jax.Array,
    loss_mask_BxL: jax.Array,
    chunk: int,
    *,
    unroll: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """`sequence_logprobs` of the lm_head's logits of final-norm hidden states, computed over
    chunks of ``chunk`` positions.

    A `lax.scan` runs the lm_head, the float32 log-softmax and the target gather on [B, chunk]
    positions at a time, under `jax.checkpoint`: only one chunk's float32 logits [B, chunk, V]
    exist at a time, in the forward and in the backward pass (which recomputes each chunk's
    logits: one more lm_head matmul). Same sums as the whole logits up to float32 rounding of
    the order of summation.

    Args:
        params: the decoder's parameter dict (the lm_head or the tied embedding).
        config: architecture.
        dtype: compute dtype of the lm_head matmul.
        h_BxLxD: final-norm hidden states (`ogpsa_jax.models.functional.hidden_states`).
        input_ids_BxL: token ids.
        loss_mask_BxL: 1 where input_ids is a target.
        chunk: positions per chunk; ``chunk <= 0`` or ``>= L - 1``: the whole logits at once.
        unroll: unroll the chunk loop (no loop in the program; e.g. for cost analysis).

    Returns:
        (sum_B, count_B): float32 [B] each, as `sequence_logprobs`.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> from ogpsa_jax.models.functional import hidden_states
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> p, ids = model.params(), jnp.arange(14).reshape(2, 7) % 5
        >>> mask = jnp.ones_like(ids)
        >>> h = hidden_states(p, model.config, jnp.float32, ids, mask)
        >>> s, n = chunked_sequence_logprobs(p, model.config, jnp.float32, h, ids, mask, 4)
        >>> whole, _ = sequence_logprobs(head_logits(p, model.config, jnp.float32, h), ids, mask)
        >>> bool(jnp.allclose(s, whole, rtol=1e-5)), n.tolist()
        (True, [6.0, 6.0])
    """
    b, length, _ = h_BxLxD.shape
    t = length - 1
    if chunk <= 0 or chunk >= t:
        logits = head_logits(params, config, dtype, h_BxLxD)
        return sequence_logprobs(logits, input_ids_BxL, loss_mask_BxL)
    n = -(-t // chunk)
    pad = ((0, 0), (0, n * chunk - t))
    m_BxT = loss_mask_BxL[:, 1:].astype(jnp.float32)

    def chunks(x: jax.Array) -> jax.Array:  # [B, T, ...] -> [n, B, chunk, ...], zero padded
        x = jnp.pad(x, pad + ((0, 0),) * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one(h_BxCxD: jax.Array, tok_BxC: jax.Array, m_BxC: jax.Array) -> jax.Array:
        logits_BxCxV = head_logits(params, config, dtype, h_BxCxD)
        logz_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
        picked_BxC = jnp.take_along_axis(logits_BxCxV, tok_BxC[..., None], axis=-1)[..., 0]
        return jnp.sum((picked_BxC - logz_BxC) * m_BxC, axis=1)

    def body(acc_B: jax.Array, xs: tuple) -> tuple[jax.Array, None]:
        return acc_B + one(*xs), None

    xs = (chunks(h_BxLxD[:, :-1]), chunks(input_ids_BxL[:, 1:]), chunks(m_BxT))
    zeros_B = jnp.zeros((b,), jnp.float32)
    s_B, _ = jax.lax.scan(body, zeros_B, xs, unroll=True if unroll else 1)
    return s_B, jnp.sum(m_BxT, axis=1)


__all__ = ["chunked_sequence_logprobs", "sequence_logprobs"]
