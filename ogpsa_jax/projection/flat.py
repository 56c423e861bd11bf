"""Flat OGPSA: project each gradient tensor off its own k capability directions.

Per parameter tensor (leaf) the state holds k directions ``u_1..u_k`` of the leaf's shape,
orthonormal per leaf (zero directions allowed; they project nothing). The update removes the
gradient's component in their span::

    g <- g - strength * sum_i <g, u_i> u_i

with the coefficients in float32 and the result cast back to the gradient's dtype. To first
order the step then leaves the capability (reference) loss unchanged. How XLA computes the
coefficients and the subtract (one pass over g, in place) is `ogpsa_jax.projection._kernels`.

`ogpsa` is the bare transform; `ogpsa_adamw` is the paper's optimiser: project -> clip -> AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax._tree import is_masked, zeros_like
from ogpsa_jax.projection._kernels import coefficients, fence
from ogpsa_jax.projection.alias import project_clip_adamw
from ogpsa_jax.projection.state import (
    F32_DTYPE,
    OGPSAState,
    check_basis_dtype,
    check_k,
    check_strength,
)

_F32 = jnp.float32


def _check_basis_trees(grads: optax.Updates, basis: Sequence[optax.Params]) -> tuple:
    """Leaves and treedef of ``grads`` and the leaves of every basis tree, validated."""
    if not isinstance(basis, (tuple, list)):
        raise ValueError(
            f"basis must be a tuple or list of parameter-shaped trees, got {type(basis).__name__}"
        )
    g_leaves, g_def = jax.tree.flatten(grads, is_leaf=is_masked)
    basis_leaves = []
    for i, tree in enumerate(basis):
        leaves, tree_def = jax.tree.flatten(tree, is_leaf=is_masked)
        if tree_def != g_def:
            raise ValueError(
                f"basis tree {i} does not match the gradient structure: got {tree_def}, "
                f"expected {g_def}"
            )
        for u, g in zip(leaves, g_leaves, strict=True):
            if not is_masked(u) and not is_masked(g) and jnp.shape(u) != jnp.shape(g):
                raise ValueError(
                    f"basis tree {i} has a leaf of shape {jnp.shape(u)} for a gradient of "
                    f"shape {jnp.shape(g)}"
                )
        basis_leaves.append(leaves)
    return g_leaves, g_def, basis_leaves


def _project_leaf(
    g: jax.Array, us: Sequence[jax.Array], strength: Any, conflict_only: Any
) -> jax.Array:
    """``g - strength * sum_i c_i u_i`` with ``c_i = <g, u_i>`` (``min(c_i, 0)`` in conflict-only
    mode), in float32, cast back to g's dtype."""
    if not us:
        return g
    coeffs_K = coefficients(g, us)
    if isinstance(conflict_only, bool):
        if conflict_only:
            coeffs_K = [jnp.minimum(c, 0.0) for c in coeffs_K]
    else:  # an injected (array) flag
        coeffs_K = [jnp.where(conflict_only, jnp.minimum(c, 0.0), c) for c in coeffs_K]
    coeffs_K, g = fence(coeffs_K, g)
    removed = sum(c * u.astype(_F32) for c, u in zip(coeffs_K, us, strict=True))
    return (g.astype(_F32) - jnp.asarray(strength, _F32) * removed).astype(g.dtype)


def project(
    grads: optax.Updates,
    basis: Sequence[optax.Params],
    *,
    strength: float | jax.Array = 1.0,
    conflict_only: bool | jax.Array = False,
) -> optax.Updates:
    """Removes from each gradient leaf its component along that leaf's basis directions.

    Args:
      grads: gradient tree.
      basis: tuple of k trees with the structure of ``grads`` (leaf i of tree j is direction j
        of parameter i, orthonormal per leaf or zero). ``optax.MaskedNode`` leaves mean "do not
        project this leaf".
      strength: fraction of the component to remove, in [0, 1].
      conflict_only: remove direction u_i only where ``<g, u_i> < 0`` (the reference code's
        "threshold" mode: only steps that would raise the capability loss are corrected).

    Returns:
      The projected gradient tree, each leaf in its input dtype.

    Example:
      >>> g = {"w": jnp.array([1.0, 1.0])}
      >>> u = ({"w": jnp.array([1.0, 0.0])},)
      >>> project(g, u)["w"]
      Array([0., 1.], dtype=float32)
    """
    check_strength(strength)
    g_leaves, g_def, basis_leaves = _check_basis_trees(grads, basis)
    out = []
    for j, g in enumerate(g_leaves):
        us = [leaves[j] for leaves in basis_leaves]
        if is_masked(g) or any(is_masked(u) for u in us):
            out.append(g)
        else:
            out.append(_project_leaf(g, us, strength, conflict_only))
    return jax.tree.unflatten(g_def, out)


def _fold_coefficients(
    grads: optax.Updates,
    basis: Sequence[optax.Params],
    fold: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """``fold`` over the coefficients <g, u_i> of every projected leaf, from a float32 zero."""
    g_leaves, _, basis_leaves = _check_basis_trees(grads, basis)
    out = jnp.zeros((), _F32)
    for j, g in enumerate(g_leaves):
        us = [leaves[j] for leaves in basis_leaves if not is_masked(leaves[j])]
        if us and not is_masked(g):
            for c in coefficients(g, us):
                out = fold(out, c)
    return out


def residual_max_flat(grads: optax.Updates, basis: Sequence[optax.Params]) -> jax.Array:
    """``max |<g, u_i>|`` over every leaf and direction: what a projected gradient still has
    along the basis (0 up to rounding right after `project`).

    Args:
      grads: gradient tree.
      basis: tuple of k trees with the structure of ``grads`` (``MaskedNode`` = not projected).

    Returns:
      A float32 scalar (0 when no leaf has a basis).

    Example:
      >>> float(residual_max_flat({"w": jnp.array([3.0, 4.0])}, ({"w": jnp.array([1.0, 0.0])},)))
      3.0
    """
    return _fold_coefficients(grads, basis, lambda out, c: jnp.maximum(out, jnp.abs(c)))


def span_energy_flat(updates: optax.Updates, basis: Sequence[optax.Params]) -> jax.Array:
    """``sum_i <g, u_i>^2`` over every leaf: the squared norm of ``g``'s part in the span of an
    orthonormal basis (per tensor).

    Example:
      >>> float(span_energy_flat({"w": jnp.array([3.0, 4.0])}, ({"w": jnp.array([1.0, 0.0])},)))
      9.0
    """
    return _fold_coefficients(updates, basis, lambda out, c: out + jnp.sum(jnp.square(c)))


def ogpsa(
    k: int,
    *,
    strength: float | jax.Array = 1.0,
    conflict_only: bool | jax.Array = False,
    mask: Any = None,
    basis_dtype: Any = F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """Orthogonal gradient projection onto the complement of a per-tensor capability subspace.

    Args:
      k: number of basis directions per parameter tensor (static), >= 1.
      strength: fraction of the component removed, in [0, 1] (1 = the paper's full removal).
      conflict_only: remove a direction only where ``<g, u_i> < 0`` ("threshold" mode).
      mask: pytree of bools with the parameters' structure, or a callable on the params
        returning one; ``False`` leaves pass through unchanged and carry no basis memory.
      basis_dtype: floating dtype in which the basis is stored (float32 by default).

    Under ``optax.inject_hyperparams`` pass ``static_args=("k",)`` (plus ``"basis_dtype"`` and
    ``"mask"`` when you give a dtype class or a callable: it would treat those as schedules);
    ``strength`` and ``conflict_only`` can then be changed in ``state.hyperparams``.

    Returns:
      A ``GradientTransformationExtraArgs``. Its state is an `OGPSAState` whose basis starts as
      all-zero directions (identity). ``update(updates, state, params=None, *, basis=None)``: a
      ``basis`` (tuple of <= k trees) replaces the stored basis before use.

    Example:
      >>> tx = ogpsa(k=1)
      >>> state = tx.init({"w": jnp.zeros(3)})
      >>> u = ({"w": jnp.array([0.0, 0.6, 0.8])},)
      >>> g, state = tx.update({"w": jnp.array([1.0, 3.0, 4.0])}, state, basis=u)
      >>> g["w"]
      Array([1., 0., 0.], dtype=float32)
    """
    check_k(k)
    check_strength(strength)
    basis_dtype = check_basis_dtype(basis_dtype)

    def init_fn(params: optax.Params) -> OGPSAState:
        # `optax.tree_map_params` calls init on a leafless stand-in: no mask to resolve there.
        if mask is not None and jax.tree.leaves(params):
            mask_tree = mask(params) if callable(mask) else mask
            params = jax.tree.map(
                lambda m, p: p if m else optax.MaskedNode(), mask_tree, params, is_leaf=is_masked
            )
        zeros = lambda p: p if is_masked(p) else zeros_like(p, basis_dtype)
        return OGPSAState(
            basis=tuple(jax.tree.map(zeros, params, is_leaf=is_masked) for _ in range(k))
        )

    def update_fn(
        updates: optax.Updates,
        state: OGPSAState,
        params: optax.Params | None = None,
        *,
        basis: Sequence[optax.Params] | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, OGPSAState]:
        del params, extra_args
        if basis is not None:
            state = state.with_basis(basis)
        return project(updates, state.basis, strength=strength, conflict_only=conflict_only), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ogpsa_adamw(
    learning_rate: optax.ScalarOrSchedule,
    k: int,
    *,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    strength: float | jax.Array = 1.0,
    conflict_only: bool | jax.Array = False,
    mask: Any = None,
    basis_dtype: Any = F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with flat OGPSA projection first, as in the paper: project -> clip -> AdamW.

    Args:
      learning_rate: a float or an optax schedule.
      k: basis directions per tensor.
      max_grad_norm: global-norm clipping after the projection; ``None`` for no clipping.
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      weight_decay: decoupled weight decay.
      strength: see `ogpsa`.
      conflict_only: see `ogpsa`.
      mask: see `ogpsa` (masks the projection only; all leaves are optimised).
      basis_dtype: see `ogpsa`.

    Returns:
      ``optax.chain(ogpsa(...), [clip_by_global_norm], adamw(...))``; ``update`` forwards
      ``basis=`` to the projection.

    Example:
      >>> tx = ogpsa_adamw(optax.cosine_decay_schedule(1e-3, 100), k=2)
      >>> params = {"w": jnp.ones(3)}
      >>> state = tx.init(params)
      >>> u = ({"w": jnp.array([1.0, 0.0, 0.0])},)
      >>> updates, state = tx.update({"w": jnp.ones(3)}, state, params, basis=u)
      >>> float(updates["w"][0]) == 0.0  # the protected direction does not move
      True
    """
    proj = dict(strength=strength, conflict_only=conflict_only, mask=mask, basis_dtype=basis_dtype)
    adam = dict(max_grad_norm=max_grad_norm, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return project_clip_adamw(ogpsa(k, **proj), learning_rate, **adam)


__all__ = ["ogpsa", "ogpsa_adamw", "project", "residual_max_flat"]
