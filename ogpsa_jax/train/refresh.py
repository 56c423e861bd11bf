"""Basis refreshes: recompute the capability basis at the current weights, in jitted pieces.

Every refresh returns ``(opt_state with the new basis, metrics)`` and keeps the old basis when
anything it computed is not finite (``basis_finite=False``; the loop then skips or stops).

* `make_gradient_refresh` (methods ``gram_schmidt``, ``svd``, ``gradient``): gradients of the
  token NLL on the reference batches (``gram_schmidt``: one mean gradient per reference set, the
  reference code; ``svd`` and ``gradient``: one per batch), then `capability_basis` (flat) or
  `matrix_basis_from_gradients`. The gradients are checked too: Gram-Schmidt would turn a NaN
  gradient into a finite zero direction. Its two jitted programs come from `gradient_programs`
  (memory planning compiles the same ones: `ogpsa_jax.train.plan`).
* `make_activation_refresh` (GPM, ``activation``): in `ogpsa_jax.train.activation_refresh`
  (with `inputs_like`; both re-exported here).

Example:
    >>> refresh = make_refresh(  # doctest: +SKIP
    ...     og, logps_fn=logps_fn, graphdef=graphdef, rest=rest, groups=groups,
    ...     param_shardings=param_sh, mesh=mesh, seed=0)
    >>> opt_state, metrics = refresh(params, opt_state)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax._tree import leaf_paths
from ogpsa_jax.bases import capability_basis, matrix_basis_from_gradients
from ogpsa_jax.projection import set_basis
from ogpsa_jax.train.activation_refresh import (
    inputs_like,
    make_activation_refresh,
    rows_per_batch,
)
from ogpsa_jax.train.first_order import FirstOrder
from ogpsa_jax.train.optimizer import param_mask
from ogpsa_jax.train.schema import FLAT_METHODS, OGPSAConfig
from ogpsa_jax.train.sharding import BoundProgram, jit_bound, rows_sharding
from ogpsa_jax.train.sharding import place as place_batch
from ogpsa_jax.train.step import LogpsFn, make_ref_grad_fn

# refresh(params, opt_state) -> (opt_state with the new basis, metrics)
Refresh = Callable[[Any, Any], tuple[Any, dict]]


def _finite_basis(og: OGPSAConfig, mask: Any, grads: list) -> tuple[Any, jax.Array, jax.Array]:
    """(basis, all finite, per-leaf finiteness of the reference gradients)."""
    energy = og.energy or None
    if og.method == "gradient":
        basis = matrix_basis_from_gradients(grads, k=og.k, energy=energy, mask=mask)
    else:
        basis = capability_basis(grads, k=og.k, method=og.method, energy=energy)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(basis)]))
    grad_leaves = [jax.tree.leaves(g) for g in grads]
    leaf_ok = jnp.stack(
        [
            jnp.all(jnp.stack([jnp.all(jnp.isfinite(gl[j])) for gl in grad_leaves]))
            for j in range(len(grad_leaves[0]))
        ]
    )
    return basis, ok & jnp.all(leaf_ok), leaf_ok


class GradientPrograms(NamedTuple):
    """The jitted programs of a gradient refresh."""

    grad: BoundProgram  # (params, batch) -> (float32 reference gradient, nll sum, token count)
    basis: Callable  # (list of gradient trees) -> (basis, all finite, per-leaf finiteness)
    rows_sharding: NamedSharding  # the reference batches' placement (rows over data x fsdp)


def gradient_programs(
    logps_fn: LogpsFn,
    og: OGPSAConfig,
    rows: int,
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    mask: Any = None,
) -> GradientPrograms:
    """The reference-gradient and basis programs of a gradient refresh, jitted with shardings.

    Args:
        logps_fn: the model's `LogpsFn` (`ogpsa_jax.train.step`); passed to the gradient
            program as an argument (`jit_bound`): a Partial's bound arrays stay inputs.
        og: the stage's OGPSA config (``method``, ``k``, ``energy``, ``mask``).
        rows: rows per reference batch.
        param_shardings: the parameters' shardings.
        mesh: the training mesh.
        mask: ``gradient``: the leaves with a basis (default ``param_mask(og.mask)``).

    Returns:
        The `GradientPrograms`.
    """
    replicated = NamedSharding(mesh, P())
    rows_sh = rows_sharding(mesh, rows, 2, 0)
    grad_jit = jit_bound(
        lambda f, p, b: make_ref_grad_fn(f)(p, b),
        logps_fn,
        in_shardings=(param_shardings, rows_sh),
        out_shardings=(param_shardings, replicated, replicated),
    )
    mask = param_mask(og.mask) if mask is None else mask
    basis_jit = jax.jit(partial(_finite_basis, og, mask), out_shardings=None)
    return GradientPrograms(grad=grad_jit, basis=basis_jit, rows_sharding=rows_sh)


def make_gradient_refresh(
    logps_fn: LogpsFn,
    og: OGPSAConfig,
    groups: Sequence[Sequence[dict]],
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    mask: Any = None,
) -> Refresh:
    """The refresh of a basis estimated from reference gradients (flat methods, ``gradient``).

    Args:
        logps_fn: the model's `LogpsFn` (`ogpsa_jax.train.step`).
        og: the stage's OGPSA config (``method``, ``k``, ``energy``, ``mask``).
        groups: reference sets, each a list of host batches, all of one shape.
        param_shardings: the parameters' shardings.
        mesh: the training mesh.
        mask: ``gradient``: the leaves with a basis (default ``param_mask(og.mask)``).

    Returns:
        The refresh function. Its metrics: ``ref_loss`` (token-mean NLL of the reference set),
        ``refresh_s``, ``basis_finite`` and ``nonfinite_at`` (None, or the first parameter
        whose reference gradient is not finite, or "the reference loss"); with
        ``og.first_order``, from the second refresh on, `FirstOrder`'s ``ref_loss_change`` and
        ``ref_loss_predicted``.

    Example:
        >>> refresh = make_gradient_refresh(logps_fn, og, groups, param_sh, mesh)  # doctest: +SKIP
    """
    if og.method not in (*FLAT_METHODS, "gradient"):
        raise ValueError(
            f"ogpsa.method {og.method!r} is not estimated from gradients (activation bases need "
            f"the model's layer inputs: make_activation_refresh); use gram_schmidt, svd or gradient"
        )
    programs = gradient_programs(
        logps_fn, og, groups[0][0]["input_ids"].shape[0], param_shardings, mesh, mask=mask
    )
    grad_jit, basis_jit = programs.grad, programs.basis
    groups = [[place_batch(b, programs.rows_sharding) for b in group] for group in groups]
    add_jit = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    scale_jit = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a), donate_argnums=0)
    per_batch = og.method in ("svd", "gradient")

    def reference_grads(params: Any) -> tuple[list, list, float, float]:
        grads, tokens, nll, count = [], [], 0.0, 0.0
        for group in groups:
            acc, n = None, 0.0
            for b in group:
                g, s, c = grad_jit(params, b)
                nll, c = nll + float(s), float(c)
                count += c
                if per_batch:
                    grads.append(scale_jit(g, 1.0 / max(c, 1.0)))
                    tokens.append(c)
                else:
                    acc = g if acc is None else add_jit(acc, g)
                    n += c
            if not per_batch:
                grads.append(scale_jit(acc, 1.0 / max(n, 1.0)))
                tokens.append(n)
        return grads, tokens, nll, count

    first_order = FirstOrder() if og.first_order else None

    def refresh(params: Any, opt_state: Any) -> tuple[Any, dict]:
        t0 = time.perf_counter()
        grads, tokens, nll, count = reference_grads(params)
        basis, ok, leaf_ok = basis_jit(grads)
        ok = bool(ok) and math.isfinite(nll)
        if ok:
            opt_state = set_basis(opt_state, basis)
        leaf_ok = np.asarray(leaf_ok)
        bad = "the reference loss" if leaf_ok.all() else repr(leaf_paths(params)[leaf_ok.argmin()])
        metrics = {
            "ref_loss": nll / max(count, 1.0),
            "refresh_s": time.perf_counter() - t0,
            "basis_finite": ok,
            "nonfinite_at": None if ok else bad,
        }
        if first_order is not None and ok:
            metrics.update(first_order(params, grads, tokens, metrics["ref_loss"]))
        return opt_state, metrics

    return refresh


def make_refresh(
    og: OGPSAConfig,
    *,
    logps_fn: LogpsFn,
    graphdef: Any,
    rest: Any,
    groups: Sequence[Sequence[dict]],
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    seed: int,
    mask: Any = None,
) -> Refresh | None:
    """The stage's refresh for its OGPSA method; None with OGPSA off.

    Args:
        og: the stage's OGPSA config.
        logps_fn: the model's `LogpsFn` (gradient methods).
        graphdef: the decoder's graphdef (activation method).
        rest: the non-parameter state of the decoder's split (activation method).
        groups: reference sets, each a list of host batches, all of one shape.
        param_shardings: the parameters' shardings.
        mesh: the training mesh.
        seed: the run's seed (the activation method's row draw).
        mask: matrix methods: the leaves with a basis (default ``param_mask(og.mask)``).

    Returns:
        `make_activation_refresh` or `make_gradient_refresh` for ``og.method``, or None.
    """
    if not og.enabled:
        return None
    if og.method == "activation":  # GPM: the layers' inputs, not gradients
        rows_sh = rows_sharding(mesh, groups[0][0]["input_ids"].shape[0], 2, 0)
        place = lambda b: place_batch(b, rows_sh)  # noqa: E731
        return make_activation_refresh(
            graphdef, rest, og, groups, place=place, seed=seed, mask=mask
        )
    return make_gradient_refresh(logps_fn, og, groups, param_shardings, mesh, mask=mask)


__all__ = [
    "GradientPrograms",
    "Refresh",
    "gradient_programs",
    "inputs_like",
    "make_activation_refresh",
    "make_gradient_refresh",
    "make_refresh",
    "rows_per_batch",
]
