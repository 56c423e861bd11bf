"""Weight averaging with the starting model: the cheapest alignment-tax baseline.

``theta(alpha) = (1 - alpha) * theta_start + alpha * theta_tuned``: alpha = 0 is the starting
model, alpha = 1 the tuned one (both exactly, as products with 0 and 1 are exact), values in
between trade safety for capability along a curve that costs only evaluations.

Example:
    >>> from ogpsa_jax import models
    >>> start = models.init_random(models.tiny_config(vocab_size=101), seed=0)
    >>> tuned = models.init_random(models.tiny_config(vocab_size=101), seed=1)
    >>> mixed = average_models(start, tuned, 0.5)
    >>> bool(jnp.allclose(mixed.embed_tokens[...],
    ...                   (start.embed_tokens[...] + tuned.embed_tokens[...]) / 2, atol=1e-7))
    True
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def average_params(start: Any, tuned: Any, alpha: float) -> Any:
    """Leafwise ``(1 - alpha) * start + alpha * tuned`` in float32, cast back to each dtype.

    Args:
        start: the starting parameters (any pytree of arrays).
        tuned: the tuned parameters, same structure, shapes and dtypes.
        alpha: mixing weight in [0, 1].

    Returns:
        The averaged tree.

    Example:
        >>> average_params({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0.25)["w"]
        Array([0.75, 0.75, 0.75], dtype=float32)
    """
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    s_def, t_def = jax.tree.structure(start), jax.tree.structure(tuned)
    if s_def != t_def:
        raise ValueError(f"parameter trees differ: {s_def} vs {t_def}")
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(tuned), strict=True):
        if a.shape != b.shape or a.dtype != b.dtype:
            raise ValueError(
                f"parameter mismatch: {a.shape} {a.dtype} vs {b.shape} {b.dtype} (same model?)"
            )
    a32 = jnp.float32(alpha)

    def mix(a: jax.Array, b: jax.Array) -> jax.Array:
        out = (1.0 - a32) * a.astype(jnp.float32) + a32 * b.astype(jnp.float32)
        return out.astype(a.dtype)

    return jax.tree.map(mix, start, tuned)


def average_models(start: nnx.Module, tuned: nnx.Module, alpha: float) -> nnx.Module:
    """A new model whose parameters are `average_params` of two models of one architecture.

    Args:
        start: the starting model (its graph, config and dtypes are kept).
        tuned: the tuned model.
        alpha: mixing weight in [0, 1] (0 = start, 1 = tuned).

    Returns:
        The averaged model; neither input is modified.

    Example:
        >>> from ogpsa_jax import models
        >>> start = models.init_random(models.tiny_config(vocab_size=101), seed=0)
        >>> same = average_models(start, start, 0.3)  # a model averaged with itself
        >>> bool(jnp.allclose(same.embed_tokens[...], start.embed_tokens[...], atol=1e-7))
        True
    """
    graphdef, s_state = nnx.split(start)
    _, t_state = nnx.split(tuned)
    return nnx.merge(graphdef, average_params(s_state, t_state, alpha))
