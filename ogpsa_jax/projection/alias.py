"""The chain behind both user-facing aliases (`ogpsa_adamw`, `ogpsa_matrix_adamw`): the
projection first, as in the paper, then the optional global-norm clip, then AdamW.

Example:
    >>> import jax.numpy as jnp
    >>> tx = project_clip_adamw(optax.identity(), 1e-3, max_grad_norm=1.0)
    >>> len(tx.init({"w": jnp.ones(3)}))  # (projection, clip, adamw)
    3
"""

from __future__ import annotations

import optax


def project_clip_adamw(
    projection: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(projection, [clip_by_global_norm], adamw)``.

    Args:
        projection: the bare OGPSA transform (`ogpsa` or `ogpsa_matrix`).
        learning_rate: a float or an optax schedule.
        max_grad_norm: global-norm clipping after the projection; ``None`` for no clipping.
        b1: Adam first-moment decay.
        b2: Adam second-moment decay.
        eps: Adam epsilon.
        weight_decay: decoupled weight decay.

    Returns:
        The chain; its ``update`` forwards extra arguments (``basis=``) to the projection.
    """
    parts: list[optax.GradientTransformation] = [projection]
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)
