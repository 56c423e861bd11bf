"""The pure train step (SFT and DPO): accumulate, project, clip, update, and guard non-finite steps.

``step(params, opt_state, batch, ref_params) -> (params, opt_state, metrics)``. ``opt_state`` is
the state of the stage's public optimiser alias (`ogpsa_jax.train.optimizer`); the step applies
its projection and the rest one after the other, which is the alias's update, and so sees the
projected gradient for its metrics without projecting twice.

The losses see the model through a `LogpsFn`: per row, the summed log-probs of the target tokens
and their count. The training loop's is the decoder's `sequence_logprobs` (its lm_head in chunks
of ``model.loss_chunk`` positions); `logits_logps` makes one from any logits function.

Example:
    >>> opt = make_optimizer(stage_cfg, total_steps=100)  # doctest: +SKIP
    >>> step = make_train_step(sft_micro_loss(logits_logps(apply_fn)), opt)  # doctest: +SKIP
    >>> params, opt_state, metrics = jax.jit(step, donate_argnums=(0, 1))(  # doctest: +SKIP
    ...     params, opt.init(params), batch, None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax._tree import is_masked
from ogpsa_jax.models import sequence_logprobs
from ogpsa_jax.projection import residual_max, span_share
from ogpsa_jax.train.losses import dpo_loss, dpo_rewards
from ogpsa_jax.train.optimizer import Optimizer
from ogpsa_jax.train.schema import StageConfig

_F32 = jnp.float32
# (params, input_ids, attention_mask) -> logits [B, L, V]
ApplyFn = Callable[[Any, jax.Array, jax.Array], jax.Array]
# (params, input_ids, attention_mask, loss_mask) -> (sum_B, count_B): per row, the summed
# log-probs of the target tokens and their count (float32), as `sequence_logprobs`.
LogpsFn = Callable[[Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]
# (params, micro-batch, ref_params) -> (loss sum, (count, {name: sum})): divided once per step.
MicroLoss = Callable[[Any, dict, Any], tuple[jax.Array, tuple[jax.Array, dict]]]


def logits_logps(apply_fn: ApplyFn) -> LogpsFn:
    """The `LogpsFn` of a logits function (whose whole [B, L, V] logits exist at once).

    Args:
        apply_fn: ``(params, input_ids, attention_mask) -> logits``.

    Returns:
        ``(params, input_ids, attention_mask, loss_mask) -> (sum_B, count_B)``.

    Example:
        >>> f = logits_logps(lambda p, ids, attn: jnp.zeros((*ids.shape, 4)))  # uniform
        >>> s, n = f(None, jnp.array([[3, 1, 2]]), None, jnp.array([[0, 1, 1]]))
        >>> round(float(s[0]), 4), float(n[0])  # 2 targets, log(1/4) each
        (-2.7726, 2.0)
    """

    def f(params: Any, ids: jax.Array, attn: jax.Array, loss_mask: jax.Array) -> Any:
        return sequence_logprobs(apply_fn(params, ids, attn), ids, loss_mask)

    return f


def _batch_logps(logps_fn: LogpsFn, params: Any, batch: dict) -> tuple[jax.Array, jax.Array]:
    return logps_fn(params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])


def sft_micro_loss(logps_fn: LogpsFn) -> MicroLoss:
    """SFT micro-batch loss: ``(nll_sum, (token_count, {}))``.

    Args:
        logps_fn: the model's `LogpsFn`.

    Returns:
        The micro-batch loss.
    """

    def loss(params: Any, micro: dict[str, jax.Array], ref_params: Any) -> Any:
        del ref_params
        s_B, n_B = _batch_logps(logps_fn, params, micro)
        return -jnp.sum(s_B), (jnp.sum(n_B), {})

    return loss


def make_logps_fn(logps_fn: LogpsFn, stage: StageConfig) -> Callable:
    """``f(params, batch) -> [rows]`` sequence log-probs (per-token mean for IPO).

    Args:
        logps_fn: the model's `LogpsFn`.
        stage: the DPO stage config (``loss_type``).

    Returns:
        The log-prob function (the DPO policy's, and the reference's).
    """

    def f(params: Any, batch: dict) -> jax.Array:
        s, n = _batch_logps(logps_fn, params, batch)
        return s / jnp.maximum(n, 1.0) if stage.loss_type == "ipo" else s

    return f


def dpo_micro_loss(logps_fn: LogpsFn, stage: StageConfig) -> MicroLoss:
    """DPO micro-batch loss on stacked [chosen; rejected] rows: ``(loss_sum, (pairs, sums))``.

    Reference log-probs come from ``micro["ref_logps"]`` ([2P], precomputed) or, when
    ``ref_params`` is given, from the frozen reference model.

    Args:
        logps_fn: the model's `LogpsFn`.
        stage: the DPO stage config (``beta``, ``label_smoothing``, ``loss_type``).

    Returns:
        The micro-batch loss; its sums are the implicit rewards, margins and accuracy.
    """
    row_logps = make_logps_fn(logps_fn, stage)

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


def _sq_norm(tree: Any) -> jax.Array:
    leaves = [x for x in jax.tree.leaves(tree) if not is_masked(x)]
    return sum((jnp.sum(jnp.square(x.astype(_F32))) for x in leaves), jnp.zeros((), _F32))


def add_micro_batch(
    micro_loss: MicroLoss, params: Any, micro: dict, ref_params: Any, carry: tuple
) -> tuple:
    """One micro-batch of the accumulation: ``carry`` = (float32 gradient sums, loss sum, count,
    aux sums) plus this micro-batch's. The body of the step's accumulation `lax.scan`; the cost
    model of `ogpsa_jax.train.cost` compiles it alone.

    Args:
        micro_loss: ``(params, micro, ref_params) -> (sum, (count, aux_sums))``.
        params: the parameters.
        micro: one micro-batch.
        ref_params: the frozen DPO reference weights, or None.
        carry: the sums so far.

    Returns:
        The new sums.
    """
    g_acc, loss_acc, n_acc, aux_acc = carry
    (loss_sum, (count, aux)), g = jax.value_and_grad(micro_loss, has_aux=True)(
        params, micro, ref_params
    )
    g_acc = jax.tree.map(lambda a, b: a + b.astype(_F32), g_acc, g)
    aux_acc = jax.tree.map(jnp.add, aux_acc, aux)
    return g_acc, loss_acc + loss_sum, n_acc + count, aux_acc


def zero_sums(micro_loss: MicroLoss, params: Any, micro: dict, ref_params: Any) -> tuple:
    """The accumulation's initial carry for `add_micro_batch` (zeros shaped like its sums)."""
    aux0 = jax.eval_shape(lambda: micro_loss(params, micro, ref_params)[1][1])
    return (
        # zeros_like keeps each parameter's sharding (part of the type on Explicit axes)
        jax.tree.map(lambda p: jnp.zeros_like(p, _F32), params),
        jnp.zeros((), _F32),
        jnp.zeros((), _F32),
        jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux0),
    )


def _accumulate(micro_loss: MicroLoss, params: Any, batch: dict, ref_params: Any) -> tuple:
    """Sums of the loss, its float32 gradient, the count and the aux sums over the leading
    accumulation axis of ``batch`` (a `lax.scan` of `add_micro_batch`)."""

    def body(carry: Any, micro: dict) -> Any:
        return add_micro_batch(micro_loss, params, micro, ref_params, carry), None

    first = jax.tree.map(lambda x: x[0], batch)
    zeros = zero_sums(micro_loss, params, first, ref_params)
    (g_sum, loss_sum, count, aux_sum), _ = jax.lax.scan(body, zeros, batch)
    return g_sum, loss_sum, count, aux_sum


def _finite(grads: Any, loss: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(all finite, index of the first non-finite gradient leaf; -1: only the loss; -2: none)."""
    leaf_ok = jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grads)])
    ok = jnp.all(leaf_ok) & jnp.isfinite(loss)
    first_bad = jnp.where(
        jnp.all(leaf_ok), jnp.where(jnp.isfinite(loss), -2, -1), jnp.argmin(leaf_ok)
    )
    return ok, first_bad


def _update_or_skip(
    optimizer: Optimizer, params: Any, opt_state: Any, grads: Any, ok: jax.Array
) -> tuple:
    """``(params, opt_state, projected grads, updates)`` after the optimiser, or, when ``ok`` is
    False, the unchanged params and state with zero updates."""

    def apply(operands: Any) -> Any:
        params, opt_state, grads = operands
        proj_state, rest_state = optimizer.split(opt_state)
        pg, new_proj = grads, None
        if optimizer.projection is not None and not optimizer.after:
            pg, new_proj = optimizer.projection.update(grads, proj_state, params)
        updates, new_rest = optimizer.rest.update(pg, rest_state, params)
        if optimizer.projection is not None and optimizer.after:  # Adam-NSCL placement
            updates, new_proj = optimizer.projection.update(updates, proj_state, params)
        new_opt = optimizer.join(new_proj, new_rest)
        return optax.apply_updates(params, updates), new_opt, pg, updates

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
    return jax.lax.cond(ok, apply, skip, operands)


def make_train_step(micro_loss: MicroLoss, optimizer: Optimizer) -> Callable:
    """The pure train step (to be jitted with shardings and donation by the caller).

    ``step(params, opt_state, batch, ref_params) -> (params, opt_state, metrics)``: ``batch``
    holds arrays with a leading accumulation axis [A, ...]; gradients of the summed loss are
    accumulated with ``lax.scan`` and divided once by the total count. A step whose loss or
    gradient is not finite leaves params and opt state unchanged (``skipped = 1``;
    ``first_nonfinite_leaf`` = index of the first bad gradient leaf, -1 if only the loss, -2 if
    none).

    Args:
        micro_loss: ``(params, micro, ref_params) -> (sum, (count, aux_sums))``.
        optimizer: from `make_optimizer`; ``opt_state`` is the state of its ``tx``.

    Returns:
        The step function. Its metrics: ``loss``, ``grad_norm`` (before the projection),
        ``proj_grad_norm`` (after), ``frac_removed``, ``residual_max``, ``update_norm``,
        ``update_in_span`` (share of the applied update in the capability span; only with
        ``ogpsa.update_in_span``),
        ``skipped``, ``first_nonfinite_leaf``, ``count``, and the micro loss's aux means.
    """

    def step(params: Any, opt_state: Any, batch: dict, ref_params: Any) -> tuple:
        g_sum, loss_sum, count, aux_sum = _accumulate(micro_loss, params, batch, ref_params)
        return apply_accumulated(optimizer, params, opt_state, g_sum, loss_sum, count, aux_sum)

    return step


def apply_accumulated(
    optimizer: Optimizer,
    params: Any,
    opt_state: Any,
    g_sum: Any,
    loss_sum: jax.Array,
    count: jax.Array,
    aux_sum: dict,
) -> tuple:
    """The step after accumulation: divide once by the count, guard non-finite values, apply
    the optimiser (projection, then the rest), and the step's metrics.

    The part of `make_train_step`'s step outside its loops; the cost model of
    `ogpsa_jax.train.plan` compiles it alone.

    Args:
        optimizer: from `make_optimizer`.
        params: the parameters.
        opt_state: the state of ``optimizer.tx``.
        g_sum: float32 gradient sums over the micro-batches.
        loss_sum: the summed loss.
        count: the summed count (tokens or pairs).
        aux_sum: the micro loss's summed aux values.

    Returns:
        ``(params, opt_state, metrics)`` as `make_train_step`'s step.
    """
    inv = 1.0 / jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda x, p: (x * inv).astype(p.dtype), g_sum, params)
    loss = loss_sum * inv
    ok, first_bad = _finite(grads, loss)
    new_params, new_opt, pg, updates = _update_or_skip(optimizer, params, opt_state, grads, ok)
    g2, pg2 = _sq_norm(grads), _sq_norm(pg)
    metrics = {
        "loss": loss,
        "grad_norm": jnp.sqrt(g2),
        "proj_grad_norm": jnp.sqrt(pg2),
        "frac_removed": 1.0 - pg2 / jnp.maximum(g2, 1e-30),
        # what the projected gradient still has along the protected directions (about 0)
        "residual_max": residual_max(updates if optimizer.after else pg, opt_state),
        "update_norm": jnp.sqrt(_sq_norm(updates)),
        "skipped": 1 - ok.astype(jnp.int32),
        "first_nonfinite_leaf": first_bad.astype(jnp.int32),
        "count": count,
    }
    if optimizer.span_metric:  # share of the applied update (after AdamW) in the span
        metrics["update_in_span"] = span_share(updates, opt_state)
    for key, value in aux_sum.items():
        metrics[key] = value / jnp.maximum(count, 1.0)
    return new_params, new_opt, metrics


def make_ref_grad_fn(logps_fn: LogpsFn) -> Callable:
    """``f(params, batch) -> (grads of summed NLL (float32), nll_sum, token_count)``.

    Preference batches ([chosen; rejected] rows) give the NLL on chosen AND rejected, the
    reference code's DPO-stage capability loss.

    Args:
        logps_fn: the model's `LogpsFn`.

    Returns:
        The reference-gradient function of a basis refresh.
    """

    def f(params: Any, batch: dict) -> Any:
        def loss(p: Any) -> Any:
            s_B, n_B = _batch_logps(logps_fn, p, batch)
            return -jnp.sum(s_B), jnp.sum(n_B)

        (total, count), g = jax.value_and_grad(loss, has_aux=True)(params)
        return jax.tree.map(lambda x: x.astype(_F32), g), total, count

    return f
