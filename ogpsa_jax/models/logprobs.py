"""The sum of token log-probabilities of sequences, and their count: one definition for
training losses, DPO, scoring and evaluation.

Batch convention (shared with ``ogpsa_jax.data``): ``loss_mask[b, t] = 1`` iff
``input_ids[b, t]`` is a target, so ``logits[:, :-1]`` are scored against ``input_ids[:, 1:]``
under ``loss_mask[:, 1:]``. With a model: ``sequence_logprobs(model(ids, mask), ids, loss_mask)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


__all__ = ["sequence_logprobs"]
