"""A stage's optimiser: the public OGPSA alias, built from the stage config, and its two halves.

The state the train step carries is the state of the public alias -- ``ogpsa_adamw(...)`` (flat
methods), ``ogpsa_matrix_adamw(...)`` (matrix methods), or ``optax.chain(clip, adamw)`` with
OGPSA off -- so a state trained by ``ogpsa train`` continues in a user's own loop and the other
way round. The step needs the projected gradient for its metrics, so `Optimizer` also holds the
chain's first element (the projection) and the chain of the others (``rest``): applying one
after the other is the alias's update, and `Optimizer.split` / `Optimizer.join` convert
between the alias's state and the two halves' states.

Example:
    >>> import jax.numpy as jnp
    >>> from ogpsa_jax.train.schema import StageConfig
    >>> opt = make_optimizer(StageConfig(), total_steps=100)
    >>> state = opt.init({"w": jnp.zeros(3)})  # the state of ogpsa_adamw(...)
    >>> proj_state, rest_state = opt.split(state)
    >>> type(proj_state).__name__, len(rest_state)  # the projection; clip and adamw
    ('OGPSAState', 2)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import optax

from ogpsa_jax._tree import path_str
from ogpsa_jax.projection import ogpsa, ogpsa_adamw, ogpsa_matrix, ogpsa_matrix_adamw
from ogpsa_jax.train.schema import FLAT_METHODS, StageConfig


def param_mask(spec: str) -> Callable[[Any], Any] | None:
    """The projection mask for a config string.

    Args:
        spec: "all" (project every tensor), "no_embed" (skip paths containing "embed" or
            "lm_head"), or a regex: tensors whose path matches are projected.

    Returns:
        None (all) or a callable params -> pytree of bools.

    Example:
        >>> param_mask("no_embed")({"embed_tokens": 0, "layers": {"q_proj": 0}})
        {'embed_tokens': False, 'layers': {'q_proj': True}}
    """
    if spec == "all":
        return None
    if spec == "no_embed":
        pattern = re.compile(r"^(?!.*(embed|lm_head)).*$")
    else:
        try:
            pattern = re.compile(spec)
        except re.error as e:
            raise ValueError(f"ogpsa.mask {spec!r} is not a valid regex: {e}") from None

    def mask_fn(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: bool(pattern.search(path_str(p))), params
        )

    return mask_fn


def make_schedule(stage: StageConfig, total_steps: int) -> optax.Schedule:
    """Cosine decay to 0 over ``total_steps`` (after optional warm-up), or constant.

    Args:
        stage: the stage config (``learning_rate``, ``schedule``, ``warmup_steps``).
        total_steps: optimiser steps of the stage.

    Returns:
        The learning-rate schedule.

    Example:
        >>> round(float(make_schedule(StageConfig(learning_rate=1.0), total_steps=4)(2)), 6)
        0.5
    """
    lr = stage.learning_rate
    if stage.schedule == "constant":
        return optax.constant_schedule(lr)
    total = max(total_steps, 1)
    if stage.warmup_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, stage.warmup_steps, max(total, stage.warmup_steps + 1), end_value=0.0
        )
    return optax.cosine_decay_schedule(lr, total, alpha=0.0)


class Optimizer(NamedTuple):
    """A stage's optimiser: the public alias ``tx`` and the two halves the train step applies.

    ``tx``'s state is ``(projection state, *rest's states)`` with OGPSA on, and ``rest``'s state
    (``rest`` is ``tx``) with it off.
    """

    tx: optax.GradientTransformation  # the alias: what `init` builds and the step carries
    projection: optax.GradientTransformation | None  # tx's first element; None: OGPSA off
    rest: optax.GradientTransformation  # the chain of tx's other elements (clip, adamw/sgd)
    after: bool = False  # the projection is tx's LAST element (placement "after" AdamW)
    span_metric: bool = False  # the step logs update_in_span (ogpsa.update_in_span)

    @classmethod
    def chain(
        cls,
        projection: optax.GradientTransformation | None,
        *rest: optax.GradientTransformation,
    ) -> Optimizer:
        """``optax.chain(projection, *rest)`` with its two halves (``projection=None``: no
        projection, ``optax.chain(*rest)``).

        Example:
            >>> from ogpsa_jax.projection import ogpsa
            >>> opt = Optimizer.chain(ogpsa(1), optax.sgd(0.1))
            >>> len(opt.init({"w": jax.numpy.zeros(2)}))
            2
        """
        rest_tx = optax.chain(*rest)
        if projection is None:
            return cls(tx=rest_tx, projection=None, rest=rest_tx)
        return cls(tx=optax.chain(projection, *rest), projection=projection, rest=rest_tx)

    def init(self, params: optax.Params) -> optax.OptState:
        """The alias's initial state."""
        return self.tx.init(params)

    def split(self, opt_state: optax.OptState) -> tuple[Any, Any]:
        """The alias's state as ``(projection state or None, rest state)``."""
        if self.projection is None:
            return None, opt_state
        if not isinstance(opt_state, tuple) or len(opt_state) < 2:
            raise ValueError(
                f"expected the state of an OGPSA chain (a tuple whose first element is the "
                f"projection's state), got {type(opt_state).__name__}"
            )
        if self.after:
            return opt_state[-1], tuple(opt_state[:-1])
        return opt_state[0], tuple(opt_state[1:])

    def join(self, proj_state: Any, rest_state: Any) -> optax.OptState:
        """Inverse of `split`."""
        if self.projection is None:
            return rest_state
        if self.after:
            return (*rest_state, proj_state)
        return (proj_state, *rest_state)


def _rest_parts(stage: StageConfig, schedule: optax.Schedule) -> list:
    parts = []
    if stage.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(stage.max_grad_norm))
    if stage.optimizer == "sgd":
        parts.append(optax.sgd(schedule))
    else:
        parts.append(
            optax.adamw(
                schedule, b1=stage.b1, b2=stage.b2, eps=stage.eps, weight_decay=stage.weight_decay
            )
        )
    return parts


def make_optimizer(stage: StageConfig, total_steps: int) -> Optimizer:
    """The stage's optimiser: project (OGPSA), clip, then AdamW (or SGD).

    Args:
        stage: stage config (optimiser and OGPSA fields).
        total_steps: optimiser steps of the stage (the cosine length).

    Returns:
        An `Optimizer` whose ``tx`` is ``ogpsa_adamw(...)`` (flat methods) or
        ``ogpsa_matrix_adamw(...)`` (matrix methods) for ``optimizer="adamw"``; the same chain
        with ``optax.sgd`` for ``optimizer="sgd"``; ``optax.chain(clip, adamw)`` (or sgd) with
        OGPSA off. ``max_grad_norm=0`` drops the clip. With ``ogpsa.placement="after"``,
        ``optax.chain(clip, adamw, projection)``: the projection acts on AdamW's update.

    Example:
        >>> opt = make_optimizer(StageConfig(optimizer="sgd", max_grad_norm=0), total_steps=10)
        >>> len(opt.init({"w": jax.numpy.zeros(2)}))  # (projection, sgd)
        2
    """
    og = stage.ogpsa
    schedule = make_schedule(stage, total_steps)
    rest_parts = _rest_parts(stage, schedule)
    if not og.enabled:
        return Optimizer.chain(None, *rest_parts)
    mask = param_mask(og.mask)
    common = dict(
        strength=og.strength, conflict_only=og.conflict_only, mask=mask, basis_dtype=og.basis_dtype
    )
    flat = og.method in FLAT_METHODS
    projection = ogpsa(og.k, **common) if flat else ogpsa_matrix(og.k, **common)
    span = og.update_in_span
    if og.placement == "after":  # Adam-NSCL: project the update AdamW (or SGD) computed
        rest = optax.chain(*rest_parts)
        tx_after = optax.chain(*rest_parts, projection)
        return Optimizer(tx_after, projection, rest, after=True, span_metric=span)
    if stage.optimizer == "sgd":
        return Optimizer.chain(projection, *rest_parts)._replace(span_metric=span)
    alias = ogpsa_adamw if flat else ogpsa_matrix_adamw
    tx = alias(
        schedule,
        og.k,
        max_grad_norm=stage.max_grad_norm or None,
        b1=stage.b1,
        b2=stage.b2,
        eps=stage.eps,
        weight_decay=stage.weight_decay,
        **common,
    )
    return Optimizer(tx, projection, optax.chain(*rest_parts), span_metric=span)
