"""The first-order check of OGPSA between basis refreshes: `FirstOrder`.

OGPSA's argument is first order: a step orthogonal to the reference gradient leaves the
reference loss unchanged to first order. `FirstOrder` measures how far that holds over a refresh
interval, with the applied update (after AdamW) rather than the projected gradient: the
measured change of the reference loss against ``<g_ref, delta params>``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


@jax.jit
def _weighted_mean(grads: list, weights: jax.Array) -> Any:
    return jax.tree.map(lambda *gs: sum(w * g for w, g in zip(weights, gs, strict=True)), *grads)


@jax.jit
def _dot_change(g: Any, new: Any, old: Any) -> jax.Array:
    """``<g, new - old>`` in float32 (elementwise multiply and sum, no matmul)."""
    parts = jax.tree.map(
        lambda a, b, c: jnp.sum(a.astype(jnp.float32) * (b.astype(jnp.float32) - c)), g, new, old
    )
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


class FirstOrder:
    """The reference loss's change between refreshes against its first-order prediction.

    Called at each refresh with the current parameters, the reference gradients (and their
    token counts) and the reference loss; from the second call on it returns
    ``ref_loss_change`` (measured: this loss minus the previous refresh's) and
    ``ref_loss_predicted`` (``<g_ref, params - previous params>`` with the previous refresh's
    token-mean reference gradient): how far the first-order argument behind OGPSA holds over an
    interval. It keeps a float32 copy of the parameters and of that gradient.

    Example:
        >>> fo = FirstOrder()
        >>> fo({"w": jnp.zeros(2)}, [{"w": jnp.ones(2)}], [1.0], 1.0)
        {}
        >>> fo({"w": jnp.array([0.1, 0.0])}, [{"w": jnp.ones(2)}], [1.0], 1.2)
        {'ref_loss_change': 0.2, 'ref_loss_predicted': 0.1}
    """

    def __init__(self) -> None:
        self.previous: tuple[Any, Any, float] | None = None

    def __call__(self, params: Any, grads: list, tokens: list, loss: float) -> dict[str, float]:
        out = {}
        if self.previous is not None:
            old_params, old_g, old_loss = self.previous
            predicted = float(_dot_change(old_g, params, old_params))
            out = {
                "ref_loss_change": round(loss - old_loss, 6),
                "ref_loss_predicted": round(predicted, 6),
            }
        total = max(sum(tokens), 1.0)
        weights = jnp.asarray([t / total for t in tokens], jnp.float32)
        mean_g = _weighted_mean(grads, weights)
        copy = jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), params)
        self.previous = (copy, mean_g, loss)
        return out


__all__ = ["FirstOrder"]
