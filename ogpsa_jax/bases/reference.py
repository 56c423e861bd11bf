"""Reference gradients: the raw material of every gradient-based capability basis.

Jitted float32 gradients of a loss on reference batches, one per batch or one per group of
batches (a reference set), with the reference code's averaging: the mean over micro-batches for
a scalar loss, the token mean over the whole set for a ``(sum, count)`` loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

logger = logging.getLogger(__name__)

_F32 = jnp.float32


@partial(jax.jit, static_argnums=0)
def _grad_one(loss_fn: Callable, params: optax.Params, batch: Any) -> tuple[Any, Any]:
    """Gradient of the loss (or of its sum, if it returns (sum, count)) and the count."""

    def scalar(p: optax.Params) -> tuple[jax.Array, jax.Array]:
        out = loss_fn(p, batch)
        if isinstance(out, tuple):
            total, count = out
            return total, jnp.asarray(count, _F32)
        return out, jnp.asarray(jnp.nan, _F32)

    grads, count = jax.grad(scalar, has_aux=True)(params)
    return jax.tree.map(lambda g: g.astype(_F32), grads), count


@jax.jit
def _combine(grads: Sequence[Any], counts: Sequence[jax.Array]) -> Any:
    """Mean of gradients; for (sum, count) losses: sum of gradients / sum of counts."""
    counts_N = jnp.stack(counts)
    is_tuple_loss = ~jnp.isnan(counts_N[0])
    denom = jnp.where(
        is_tuple_loss, jnp.sum(jnp.where(is_tuple_loss, counts_N, 0.0)), float(len(grads))
    )
    denom = jnp.maximum(denom, 1e-12)
    return jax.tree.map(lambda *gs: sum(gs) / denom, *grads)


def reference_gradients(
    loss_fn: Callable[[optax.Params, Any], Any],
    params: optax.Params,
    batches: Sequence[Any] | None = None,
    *,
    group_size: int | None = None,
    groups: Sequence[Sequence[Any]] | None = None,
) -> list[optax.Params]:
    """Jitted float32 gradients of a loss over reference batches, per batch or per group.

    ``loss_fn(params, batch)`` returns a scalar loss, or ``(sum, count)`` (e.g. summed token
    NLL and the token count). Per batch the gradient is that of the loss (or of sum/count). For a
    group of batches (one reference set), a scalar loss gives the mean of the per-batch gradients
    (the reference code's mean over micro-batches); a ``(sum, count)`` loss gives the gradient of
    sum-of-sums / sum-of-counts, i.e. of the token-mean over the whole set.

    Args:
      loss_fn: the loss; must be hashable (it is a static argument of the jitted gradient, so
        pass the same function object on each refresh to avoid recompiling).
      params: the parameters (at which the gradients are taken).
      batches: the reference batches (same shapes, so one compilation).
      group_size: None -> one gradient per batch (input for ``method="svd"``); g -> the mean
        over each consecutive group of g batches (len(batches) must be a multiple of g).
      groups: alternative to ``batches``: a list of reference sets, each a list of batches;
        one mean gradient per set.

    Returns:
      A list of float32 gradient trees.

    Example:
      >>> params = {"w": jnp.array([1.0, 2.0])}
      >>> loss = lambda p, x: jnp.mean((x @ p["w"]) ** 2)
      >>> batches = [jnp.ones((4, 2)), jnp.eye(2)]
      >>> [g["w"] for g in reference_gradients(loss, params, batches)]  # one per batch
      [Array([6., 6.], dtype=float32), Array([1., 2.], dtype=float32)]
      >>> reference_gradients(loss, params, batches, group_size=2)[0]["w"]  # their mean
      Array([3.5, 4. ], dtype=float32)
    """
    if (batches is None) == (groups is None):
        raise ValueError("pass exactly one of batches or groups")
    if groups is not None:
        if group_size is not None:
            raise ValueError("group_size cannot be combined with groups")
        groups = [list(g) for g in groups]
        if not groups or any(len(g) == 0 for g in groups):
            raise ValueError("groups must be a non-empty list of non-empty lists of batches")
    else:
        batches = list(batches)
        if not batches:
            raise ValueError("batches must not be empty")
        if group_size is None:
            groups = [[b] for b in batches]
        else:
            if not isinstance(group_size, int) or group_size < 1:
                raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")
            if len(batches) % group_size:
                raise ValueError(f"{len(batches)} batches do not split into groups of {group_size}")
            groups = [batches[i : i + group_size] for i in range(0, len(batches), group_size)]
    out = []
    for group in groups:
        results = [_grad_one(loss_fn, params, b) for b in group]
        out.append(_combine([r[0] for r in results], [r[1] for r in results]))
    logger.debug("reference_gradients: %d gradients from %d groups", len(out), len(groups))
    return out


__all__ = ["reference_gradients"]
