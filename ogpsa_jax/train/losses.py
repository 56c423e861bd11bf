"""Training losses: token cross-entropy as (sum, count) and the DPO loss.

Batch convention (shared with ``ogpsa_jax.data``): ``input_ids``, ``attention_mask`` and
``loss_mask`` of shape [B, L]; ``loss_mask[b, t] = 1`` iff ``input_ids[b, t]`` is a target, so
logits[:, :-1] are scored against input_ids[:, 1:] under loss_mask[:, 1:].

Example:
    >>> ids, mask = jnp.array([[3, 1, 2]]), jnp.array([[0, 1, 1]])  # targets: tokens 1 and 2
    >>> nll_sum, count = token_nll(jnp.zeros((1, 3, 4)), ids, mask)  # uniform over 4 tokens
    >>> round(float(nll_sum / count), 4), float(count)  # log 4 per target token
    (1.3863, 2.0)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ogpsa_jax.models import sequence_logprobs

_F32 = jnp.float32


def token_nll(
    logits_BxLxV: jax.Array, input_ids_BxL: jax.Array, loss_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Cross-entropy summed over target tokens, and their count (divide once after accumulating).

    Args:
        logits_BxLxV: model logits.
        input_ids_BxL: token ids.
        loss_mask_BxL: 1 where input_ids is a target.

    Returns:
        (nll_sum, count): float32 scalars.

    Example:
        >>> total, n = token_nll(jnp.zeros((1, 2, 5)), jnp.array([[4, 1]]), jnp.array([[0, 1]]))
        >>> float(n), round(float(total), 4)  # one target token, uniform over 5: log 5
        (1.0, 1.6094)
    """
    s_B, n_B = sequence_logprobs(logits_BxLxV, input_ids_BxL, loss_mask_BxL)
    return -jnp.sum(s_B), jnp.sum(n_B)


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
) -> jax.Array:
    """Per-pair DPO loss (as TRL's DPOTrainer).

    With ``h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)``:
    ``sigmoid``: ``-(1 - ls) * logsigmoid(beta * h) - ls * logsigmoid(-beta * h)``;
    ``ipo``: ``(h - 1 / (2 * beta))**2`` (TRL feeds IPO per-token mean log-probs; the train step
    does the same).

    Args:
        policy_chosen_logps: [P] log-probs of the chosen responses under the policy.
        policy_rejected_logps: [P] same for the rejected responses.
        ref_chosen_logps: [P] chosen under the reference model.
        ref_rejected_logps: [P] rejected under the reference model.
        beta: inverse temperature (> 0).
        label_smoothing: probability that a label is flipped (sigmoid loss), in [0, 0.5).
        loss_type: "sigmoid" or "ipo".

    Returns:
        float32 [P] losses.

    Example:
        >>> dpo_loss(jnp.array([-1.0]), jnp.array([-2.0]), jnp.zeros(1), jnp.zeros(1), beta=0.1)
        Array([0.64439666], dtype=float32)
    """
    if loss_type not in ("sigmoid", "ipo"):
        raise ValueError(f"loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    h_P = (policy_chosen_logps.astype(_F32) - policy_rejected_logps.astype(_F32)) - (
        ref_chosen_logps.astype(_F32) - ref_rejected_logps.astype(_F32)
    )
    if loss_type == "ipo":
        return (h_P - 1.0 / (2.0 * beta)) ** 2
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(
        beta * h_P
    ) - label_smoothing * jax.nn.log_sigmoid(-beta * h_P)


def dpo_rewards(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float,
) -> dict[str, jax.Array]:
    """Implicit DPO rewards per pair: chosen, rejected, margin and accuracy (chosen > rejected).

    Args:
        policy_chosen_logps: [P].
        policy_rejected_logps: [P].
        ref_chosen_logps: [P].
        ref_rejected_logps: [P].
        beta: inverse temperature.

    Returns:
        dict of float32 [P] arrays: rewards_chosen, rewards_rejected, margins, accuracy.
    """
    chosen_P = beta * (policy_chosen_logps.astype(_F32) - ref_chosen_logps.astype(_F32))
    rejected_P = beta * (policy_rejected_logps.astype(_F32) - ref_rejected_logps.astype(_F32))
    return {
        "rewards_chosen": chosen_P,
        "rewards_rejected": rejected_P,
        "margins": chosen_P - rejected_P,
        "accuracy": (chosen_P > rejected_P).astype(_F32),
    }
