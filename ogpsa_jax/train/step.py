"""Pure, jitted train steps (SFT and DPO) with OGPSA projection, accumulation and fault guards.

The optimiser is ``ogpsa_adamw``'s chain split in two halves -- the projection (``ogpsa`` /
``ogpsa_matrix``, or identity when OGPSA is off) and ``chain(clip, adamw)`` (or ``sgd``) -- so the
step sees the projected gradient for its metrics without projecting twice. The opt state is the
tuple ``(projection_state, rest_state)``.

Example:
    >>> proj, rest = make_optimizer(stage_cfg, total_steps=100)  # doctest: +SKIP
    >>> step = make_train_step(apply_fn, "sft", stage_cfg, proj, rest)  # doctest: +SKIP
    >>> params, opt_state, metrics = jax.jit(step, donate_argnums=(0, 1))(  # doctest: +SKIP
    ...     params, opt_state, batch, 0.0, None)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax.models import sequence_logprobs
from ogpsa_jax.train.config import FLAT_METHODS, StageConfig
from ogpsa_jax.train.losses import dpo_loss, dpo_rewards, token_nll

_F32 = jnp.float32
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as "a/b/c" (dict keys, attributes and indices; nnx ``value`` dropped)."""
    parts = []
    for k in path:
        part = getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))
        parts.append(str(part))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """ "/"-joined paths of a tree's leaves, in leaf order."""
    return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def param_mask(spec: str) -> Callable[[Any], Any] | None:
    """The projection mask for a config string.

    Args:
        spec: "all" (project every tensor), "no_embed" (skip paths containing "embed" or
            "lm_head"), or a regex: tensors whose path matches are projected.

    Returns:
        None (all) or a callable params -> pytree of bools.
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
    """Cosine decay to 0 over ``total_steps`` (after optional warm-up), or constant."""
    lr = stage.learning_rate
    if stage.schedule == "constant":
        return optax.constant_schedule(lr)
    total = max(total_steps, 1)
    if stage.warmup_steps > 0:
        return optax.warmup_cosine_decay_schedule(
            0.0, lr, stage.warmup_steps, max(total, stage.warmup_steps + 1), end_value=0.0
        )
    return optax.cosine_decay_schedule(lr, total, alpha=0.0)


def make_optimizer(
    stage: StageConfig, total_steps: int
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """The two halves of the optimiser: projection, then clip + AdamW (or SGD).

    Args:
        stage: stage config (optimiser and OGPSA fields).
        total_steps: optimiser steps of the run (cosine length).

    Returns:
        (projection, rest). Their chain equals ``ogpsa_adamw(...)`` for the adamw optimiser.
    """
    from ogpsa_jax.projection import ogpsa

    og = stage.ogpsa
    mask = param_mask(og.mask)
    if not og.enabled:
        proj = optax.identity()
    elif og.method in FLAT_METHODS:
        proj = ogpsa(og.k, strength=og.strength, conflict_only=og.conflict_only, mask=mask)
    else:
        from ogpsa_jax.projection import ogpsa_matrix

        if og.conflict_only:
            raise ValueError(f"ogpsa.conflict_only is not supported by method {og.method!r}")
        proj = ogpsa_matrix(og.k, strength=og.strength, mask=mask)
    schedule = make_schedule(stage, total_steps)
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
    return proj, optax.chain(*parts)


def _sq_norm(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if not _is_masked(x)]
    return sum((jnp.sum(jnp.square(x.astype(_F32))) for x in leaves), jnp.zeros((), _F32))


def _max_residual(pg: Any, proj_state: Any) -> jax.Array:
    """What the projected gradient still has along the protected directions: max over leaves
    and directions of |<Pg, u_i>| (flat basis) or of |V^T Pg| (matrix basis, the decoder's
    default input axes, as training builds it); 0 when OGPSA is off."""
    from ogpsa_jax.projection import residual_max

    return residual_max(pg, proj_state)


def sft_micro_loss(
    apply_fn: ApplyFn,
) -> Callable[[Any, dict[str, jax.Array], Any], tuple[jax.Array, tuple[jax.Array, dict]]]:
    """SFT micro-batch loss: (nll_sum, (token_count, {}))."""

    def loss(params: Any, micro: dict[str, jax.Array], ref_params: Any) -> Any:
        del ref_params
        logits = apply_fn(params, micro["input_ids"], micro["attention_mask"])
        total, count = token_nll(logits, micro["input_ids"], micro["loss_mask"])
        return total, (count, {})

    return loss


def dpo_micro_loss(apply_fn: ApplyFn, stage: StageConfig) -> Callable:
    """DPO micro-batch loss on stacked [chosen; rejected] rows: (loss_sum, (pairs, sums)).

    Reference log-probs come from ``micro["ref_logps"]`` ([2P], precomputed) or, when
    ``ref_params`` is given, from the frozen reference model.
    """

    def row_logps(params: Any, micro: dict[str, jax.Array]) -> jax.Array:
        logits = apply_fn(params, micro["input_ids"], micro["attention_mask"])
        s, n = sequence_logprobs(logits, micro["input_ids"], micro["loss_mask"])
        return s / jnp.maximum(n, 1.0) if stage.loss_type == "ipo" else s

    def loss(params: Any, micro: dict[str, jax.Array], ref_params: Any) -> Any:
        lp_R = row_logps(params, micro)
        if ref_params is None:
            ref_R = micro["ref_logps"]
        else:
            ref_R = jax.lax.stop_gradient(row_logps(ref_params, micro))
        p = lp_R.shape[0] // 2
        args = (lp_R[:p], lp_R[p:], ref_R[:p], ref_R[p:])
        losses_P = dpo_loss(
            *args, beta=stage.beta, label_smoothing=stage.label_smoothing, loss_type=stage.loss_type
        )
        sums = {k: jnp.sum(v) for k, v in dpo_rewards(*args, beta=stage.beta).items()}
        return jnp.sum(losses_P), (jnp.asarray(p, _F32), sums)

    return loss


def make_train_step(
    micro_loss: Callable,
    proj_tx: optax.GradientTransformation,
    rest_tx: optax.GradientTransformation,
) -> Callable:
    """The pure train step (to be jitted with shardings and donation by the caller).

    ``step(params, opt_state, batch, poison, ref_params) -> (params, opt_state, metrics)``:
    ``batch`` holds arrays with a leading accumulation axis [A, ...]; gradients of the summed
    loss are accumulated with ``lax.scan`` and divided once by the total count. ``poison`` is a
    float32 scalar multiplied into the gradient as ``(1 + poison)``: 0 normally, NaN in fault
    drills. A step whose loss or gradient is not finite leaves params and opt state unchanged
    (``skipped = 1``; ``first_nonfinite_leaf`` = index of the first bad gradient leaf, -1 if
    only the loss, -2 if none).

    Args:
        micro_loss: ``(params, micro, ref_params) -> (sum, (count, aux_sums))``.
        proj_tx: projection transform (ogpsa / ogpsa_matrix / identity).
        rest_tx: clip + optimiser.

    Returns:
        The step function.
    """

    def step(params: Any, opt_state: Any, batch: dict, poison: jax.Array, ref_params: Any):
        proj_state, rest_state = opt_state
        grad_fn = jax.grad(micro_loss, has_aux=True)

        def body(carry: Any, micro: dict) -> Any:
            g_acc, loss_acc, n_acc, aux_acc = carry
            (loss_sum, (count, aux)), g = jax.value_and_grad(micro_loss, has_aux=True)(
                params, micro, ref_params
            )
            g_acc = jax.tree.map(lambda a, b: a + b.astype(_F32), g_acc, g)
            aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
            return (g_acc, loss_acc + loss_sum, n_acc + count, aux_acc), None

        del grad_fn
        first = jax.tree.map(lambda x: x[0], batch)
        aux0 = jax.eval_shape(lambda: micro_loss(params, first, ref_params)[1][1])
        zeros = (
            # zeros_like keeps each parameter's sharding (part of the type on Explicit axes)
            jax.tree.map(lambda p: jnp.zeros_like(p, _F32), params),
            jnp.zeros((), _F32),
            jnp.zeros((), _F32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0),
        )
        (g_sum, loss_sum, count, aux_sum), _ = jax.lax.scan(body, zeros, batch)
        inv = (1.0 + poison) / jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda x, p: (x * inv).astype(p.dtype), g_sum, params)
        loss = loss_sum * inv

        leaf_ok = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)])
        ok = jnp.all(leaf_ok) & jnp.isfinite(loss)
        first_bad = jnp.where(
            jnp.all(leaf_ok), jnp.where(jnp.isfinite(loss), -2, -1), jnp.argmin(leaf_ok)
        )

        def apply(operands: Any) -> Any:
            params, (proj_state, rest_state), grads = operands
            pg, new_proj = proj_tx.update(grads, proj_state, params)
            updates, new_rest = rest_tx.update(pg, rest_state, params)
            return optax.apply_updates(params, updates), (new_proj, new_rest), pg, updates

        def skip(operands: Any) -> Any:
            params, opt_state, grads = operands
            # zero updates shaped, typed and sharded like the parameters they would move
            zeros = lambda p, s: jnp.zeros_like(p, s.dtype)
            return params, opt_state, grads, jax.tree.map(zeros, params, shapes[3])

        # A non-finite step leaves params and opt state untouched. `lax.cond` (not a select of
        # new vs old) lets XLA update the donated buffers in place: a `jnp.where(ok, new, old)`
        # made it copy the AdamW moments every step.
        operands = (params, opt_state, grads)
        shapes = jax.eval_shape(apply, operands)
        new_params, new_opt, pg, updates = jax.lax.cond(ok, apply, skip, operands)

        g2, pg2 = _sq_norm(grads), _sq_norm(pg)
        metrics = {
            "loss": loss,
            "grad_norm": jnp.sqrt(g2),
            "proj_grad_norm": jnp.sqrt(pg2),
            "frac_removed": 1.0 - pg2 / jnp.maximum(g2, 1e-30),
            "residual_max": _max_residual(pg, proj_state),
            "update_norm": jnp.sqrt(_sq_norm(updates)),
            "skipped": 1 - ok.astype(jnp.int32),
            "first_nonfinite_leaf": first_bad.astype(jnp.int32),
            "count": count,
        }
        for key, value in aux_sum.items():
            metrics[key] = value / jnp.maximum(count, 1.0)
        return new_params, new_opt, metrics

    return step


def make_ref_grad_fn(apply_fn: ApplyFn) -> Callable:
    """``f(params, batch) -> (grads of summed NLL (float32), nll_sum, token_count)``.

    Preference batches ([chosen; rejected] rows) give the NLL on chosen AND rejected, the
    reference code's DPO-stage capability loss.
    """

    def f(params: Any, batch: dict) -> Any:
        def loss(p: Any) -> Any:
            logits = apply_fn(p, batch["input_ids"], batch["attention_mask"])
            return token_nll(logits, batch["input_ids"], batch["loss_mask"])

        (total, count), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda x: x.astype(_F32), g), total, count

    return f


def make_logps_fn(apply_fn: ApplyFn, stage: StageConfig) -> Callable:
    """``f(params, batch) -> [rows]`` sequence log-probs (per-token mean for IPO)."""

    def f(params: Any, batch: dict) -> jax.Array:
        logits = apply_fn(params, batch["input_ids"], batch["attention_mask"])
        s, n = sequence_logprobs(logits, batch["input_ids"], batch["loss_mask"])
        return s / jnp.maximum(n, 1.0) if stage.loss_type == "ipo" else s

    return f
