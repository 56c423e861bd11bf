"""Matrix-factored (GPM-style) OGPSA: protect the input space of each weight matrix.

For a weight ``W`` of shape ``(d_in, d_out)`` (``y = x @ W``) the state holds an orthonormal
``V`` of shape ``(d_in, k)`` (zero columns allowed) and the gradient becomes::

    G <- G - strength * V (V^T G)

i.e. each column of ``G`` loses its component in the protected input subspace span(V). Inputs
``x`` in that subspace then see (to first order) the same layer output after the step, which is
what Gradient Projection Memory (GPM, Saha et al. 2021) protects. Which axis is the input axis,
and how stacked leaves are read, is `ogpsa_jax.projection.dims`. Memory is ``sum(d_in * k)``
over the projected leaves, against k full parameter copies for the flat basis.

`ogpsa_matrix` is the bare transform; `ogpsa_matrix_adamw` chains it ahead of clip and AdamW,
like `ogpsa_adamw`. Conflict-only mode does not exist here: an input-space direction carries no
sign, so "the step would raise the reference loss" is undefined per direction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax._tree import explicit_spec, is_masked
from ogpsa_jax.projection.alias import project_clip_adamw
from ogpsa_jax.projection.dims import DimsSpec, basis_shape, batch_ndim, resolve_dims
from ogpsa_jax.projection.state import (
    F32_DTYPE,
    MatrixOGPSAState,
    check_basis_dtype,
    check_k,
    check_strength,
)

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
_LETTERS = "abcdefghjklmnopqstuvwxyz"  # no 'i' (input axis) and no 'r' (basis columns)


def _is_masked_or_none(x: Any) -> bool:
    return x is None or is_masked(x)


def _check_conflict_only(conflict_only: Any) -> None:
    """A named ValueError for a concrete True (a traced value cannot be read; it was concrete,
    and checked, when the transform was first built)."""
    if isinstance(conflict_only, jax.core.Tracer):
        return
    if bool(conflict_only):
        raise ValueError(
            "conflict_only=True is not supported by the matrix transform: an input-space "
            "direction carries no sign, so 'the step would raise the reference loss' is "
            "undefined there (use the flat ogpsa for conflict-only projection)"
        )


def _full_spec(spec: Any, ndim: int) -> tuple[Any, ...]:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _basis_spec(param_spec: Any, ndim: int, axis: int) -> jax.P:
    """Basis sharding: the parameter's batch and input axes, the columns replicated."""
    spec = _full_spec(param_spec, ndim)
    return jax.P(*spec[: batch_ndim(ndim, axis)], spec[axis], None)


def _zeros_basis(p: Any, axis: int, k: int, dtype: Any) -> jax.Array:
    shape = basis_shape(tuple(jnp.shape(p)), axis, k)
    spec = explicit_spec(p)
    if spec is None and isinstance(p, jax.core.Tracer):
        # Auto (GSPMD) mesh inside a trace: a zero that depends on p lets sharding propagation
        # give V the batch/input sharding of p (a bare constant would be replicated).
        nb = batch_ndim(p.ndim, axis)
        cols = tuple(a for a in range(nb, p.ndim) if a != axis)
        z = jnp.sum(jnp.where(p == p, 0, 0).astype(dtype), axis=cols)
        return jnp.broadcast_to(z[..., None], shape)
    if spec is None:
        return jnp.zeros(shape, dtype)
    v_spec = _basis_spec(spec, len(jnp.shape(p)), axis)
    if isinstance(p, jax.core.Tracer):
        return jnp.zeros(shape, dtype, out_sharding=v_spec)
    return jnp.zeros(shape, dtype, device=jax.NamedSharding(p.sharding.mesh, v_spec))


def _subscripts(ndim: int, axis: int) -> tuple[str, str, str]:
    """einsum subscripts of (g, V, V^T g) for a leaf with ``ndim`` axes and input ``axis``."""
    nb = batch_ndim(ndim, axis)
    g_sub = _LETTERS[:axis] + "i" + _LETTERS[axis : ndim - 1]
    batch = g_sub[:nb]
    cols = "".join(c for a, c in enumerate(g_sub) if a >= nb and a != axis)
    return g_sub, batch + "ir", batch + "r" + cols


def _coefficients(g: jax.Array, v: jax.Array, axis: int) -> tuple[jax.Array, Any]:
    """``V^T g`` along ``axis`` in float32 (HIGHEST), and the sharding to give ``V c``."""
    ndim, nb = g.ndim, batch_ndim(g.ndim, axis)
    g_sub, v_sub, c_sub = _subscripts(ndim, axis)
    g_spec = explicit_spec(g)
    c_sharding = None
    if g_spec is not None and isinstance(g, jax.core.Tracer):
        full = _full_spec(g_spec, ndim)
        c_cols = [full[a] for a in range(nb, ndim) if a != axis]
        c_sharding = jax.P(*full[:nb], None, *c_cols)
    coeffs = jnp.einsum(
        f"{g_sub},{v_sub}->{c_sub}",
        g.astype(_F32),
        v.astype(_F32),
        precision=_HIGHEST,
        preferred_element_type=_F32,
        out_sharding=c_sharding,
    )
    return coeffs, None if c_sharding is None else jax.typeof(g).sharding.spec


def _project_leaf(g: jax.Array, v: jax.Array, axis: int, strength: Any) -> jax.Array:
    """``g - strength * V (V^T g)`` along ``axis``, coefficients in float32 (HIGHEST)."""
    coeffs, out_spec = _coefficients(g, v, axis)
    g_sub, v_sub, c_sub = _subscripts(g.ndim, axis)
    removed = jnp.einsum(
        f"{v_sub},{c_sub}->{g_sub}",
        v.astype(_F32),
        coeffs,
        precision=_HIGHEST,
        preferred_element_type=_F32,
        out_sharding=out_spec,
    )
    return (g.astype(_F32) - jnp.asarray(strength, _F32) * removed).astype(g.dtype)


def _leaves_with_axes(grads: optax.Updates, basis: optax.Params, dims: DimsSpec) -> tuple:
    """(g, V or None, axis) per gradient leaf, validated, and the gradients' treedef."""
    g_leaves, g_def = jax.tree.flatten(grads, is_leaf=is_masked)
    v_leaves, v_def = jax.tree.flatten(basis, is_leaf=_is_masked_or_none)
    if len(v_leaves) != len(g_leaves):
        raise ValueError(
            f"basis does not match the gradient structure: got {v_def}, expected {g_def}"
        )
    out = []
    for j, (g, v, axis) in enumerate(
        zip(g_leaves, v_leaves, resolve_dims(grads, dims), strict=True)
    ):
        if _is_masked_or_none(v) or is_masked(g):
            out.append((g, None, None))
            continue
        if axis is None:
            raise ValueError(f"leaf {j} has a basis but no input axis (dims gives None)")
        want = basis_shape(tuple(g.shape), axis, 1)[:-1]
        if v.ndim != len(want) + 1 or tuple(v.shape[:-1]) != want:
            raise ValueError(
                f"basis leaf {j} has shape {v.shape}, expected {want + ('k',)} for a "
                f"gradient of shape {g.shape} with input axis {axis}"
            )
        out.append((g, v, axis))
    return out, g_def


def project_matrix(
    grads: optax.Updates,
    basis: optax.Params,
    *,
    dims: DimsSpec = None,
    strength: float | jax.Array = 1.0,
) -> optax.Updates:
    """Removes from every projected gradient leaf its component in the protected input space.

    Args:
      grads: gradient tree.
      basis: tree with the structure of ``grads``: ``V`` of shape ``(*batch, d_in, k)`` per
        projected leaf (orthonormal or zero columns), ``None``/``optax.MaskedNode`` elsewhere.
      dims: input axis per leaf (see `resolve_dims`); only read for leaves with a basis.
      strength: fraction of the component removed, in [0, 1].

    Returns:
      The projected gradient tree, each leaf in its input dtype.

    Example:
      >>> g = {"w": jnp.ones((2, 3))}
      >>> project_matrix(g, {"w": jnp.array([[1.0], [0.0]])})["w"][0]
      Array([0., 0., 0.], dtype=float32)
    """
    check_strength(strength)
    leaves, g_def = _leaves_with_axes(grads, basis, dims)
    out = [g if v is None else _project_leaf(g, v, axis, strength) for g, v, axis in leaves]
    return jax.tree.unflatten(g_def, out)


def _fold_coefficients(
    grads: optax.Updates,
    basis: optax.Params,
    dims: DimsSpec,
    fold: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array:
    """``fold`` over the coefficients ``V^T g`` of every projected leaf, from a float32 zero."""
    out = jnp.zeros((), _F32)
    for g, v, axis in _leaves_with_axes(grads, basis, dims)[0]:
        if v is not None:
            out = fold(out, _coefficients(g, v, axis)[0])
    return out


def residual_max_matrix(
    grads: optax.Updates, basis: optax.Params, *, dims: DimsSpec = None
) -> jax.Array:
    """``max |V^T g|`` over every projected leaf: what a projected gradient still has in the
    protected input spaces (0 up to rounding right after `project_matrix`).

    Args:
      grads: gradient tree.
      basis: as for `project_matrix`.
      dims: input axis per leaf, as given to the transform.

    Returns:
      A float32 scalar (0 when no leaf has a basis).

    Example:
      >>> g = {"w": jnp.array([[3.0], [4.0]])}
      >>> float(residual_max_matrix(g, {"w": jnp.array([[1.0], [0.0]])}))
      3.0
    """
    return _fold_coefficients(
        grads, basis, dims, lambda out, c: jnp.maximum(out, jnp.max(jnp.abs(c)))
    )


def span_energy_matrix(
    updates: optax.Updates, basis: optax.Params, *, dims: DimsSpec = None
) -> jax.Array:
    """``sum ||V^T g||^2`` over every projected leaf: the squared norm of the part of ``g`` in
    the protected input spaces (``V`` with orthonormal columns).

    Example:
      >>> g = {"w": jnp.array([[3.0], [4.0]])}
      >>> float(span_energy_matrix(g, {"w": jnp.array([[1.0], [0.0]])}))
      9.0
    """
    return _fold_coefficients(updates, basis, dims, lambda out, c: out + jnp.sum(jnp.square(c)))


def ogpsa_matrix(
    k: int,
    *,
    dims: DimsSpec = None,
    strength: float | jax.Array = 1.0,
    conflict_only: bool = False,
    mask: Any = None,
    basis_dtype: Any = F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """OGPSA with a protected input subspace of dimension ``k`` per weight matrix.

    Args:
      k: columns of each ``V`` (static), >= 1; zero columns project nothing.
      dims: input axis per leaf: ``None`` (`default_dims`: ``-2`` for 2-D/3-D leaves without
        "embed", "norm", "bias" or "scale" in their path), a callable
        ``(path, leaf) -> int | None``, or a pytree of ints/``None`` with the parameters'
        structure. ``None`` = pass through.
      strength: fraction of the component removed, in [0, 1].
      conflict_only: must be False (accepted for symmetry with `ogpsa`): True is a ValueError,
        since an input-space direction carries no sign.
      mask: pytree of bools (or a callable on the params returning one); ``False`` leaves pass
        through with no memory.
      basis_dtype: floating dtype of the stored ``V`` (float32 by default).

    Under ``optax.inject_hyperparams`` pass ``static_args=("k",)`` (plus ``"dims"``,
    ``"mask"`` or ``"basis_dtype"`` when they are callables: it would treat those as
    schedules); ``strength`` can then be changed in ``state.hyperparams``.

    Returns:
      A ``GradientTransformationExtraArgs`` with state `MatrixOGPSAState` (all-zero ``V``:
      identity at first). ``update(updates, state, params=None, *, basis=None)``: a ``basis``
      tree replaces the stored one before use (see `MatrixOGPSAState.with_basis`).

    Example:
      >>> tx = ogpsa_matrix(k=1)
      >>> state = tx.init({"w": jnp.zeros((2, 3))})
      >>> v = {"w": jnp.array([[1.0], [0.0]])}
      >>> g, state = tx.update({"w": jnp.ones((2, 3))}, state, basis=v)
      >>> g["w"]
      Array([[0., 0., 0.],
             [1., 1., 1.]], dtype=float32)
    """
    check_k(k)
    check_strength(strength)
    _check_conflict_only(conflict_only)
    if not callable(dims) and dims is not None:
        jax.tree.flatten(dims, is_leaf=lambda x: x is None)  # must be a valid pytree
    basis_dtype = check_basis_dtype(basis_dtype)

    def init_fn(params: optax.Params) -> MatrixOGPSAState:
        leaves, treedef = jax.tree.flatten(params, is_leaf=is_masked)
        if not jax.tree.leaves(params):  # `optax.tree_map_params`' leafless stand-in
            return MatrixOGPSAState(basis=params)
        axes = resolve_dims(params, dims, mask)
        basis = [
            optax.MaskedNode() if a is None else _zeros_basis(p, a, k, basis_dtype)
            for p, a in zip(leaves, axes, strict=True)
        ]
        return MatrixOGPSAState(basis=jax.tree.unflatten(treedef, basis))

    def update_fn(
        updates: optax.Updates,
        state: MatrixOGPSAState,
        params: optax.Params | None = None,
        *,
        basis: optax.Params | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, MatrixOGPSAState]:
        del params, extra_args
        if basis is not None:
            state = state.with_basis(basis)
        axes = resolve_dims(updates, dims, mask)
        g_leaves, g_def = jax.tree.flatten(updates, is_leaf=is_masked)
        v_leaves = jax.tree.flatten(state.basis, is_leaf=is_masked)[0]
        if len(v_leaves) != len(g_leaves):
            raise ValueError("updates do not match the structure the state was built for")
        out = [
            g if is_masked(v) or a is None else _project_leaf(g, v, a, strength)
            for g, v, a in zip(g_leaves, v_leaves, axes, strict=True)
        ]
        return jax.tree.unflatten(g_def, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ogpsa_matrix_adamw(
    learning_rate: optax.ScalarOrSchedule,
    k: int,
    *,
    max_grad_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    strength: float | jax.Array = 1.0,
    conflict_only: bool = False,
    mask: Any = None,
    dims: DimsSpec = None,
    basis_dtype: Any = F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with matrix OGPSA projection first: project -> clip -> AdamW (as `ogpsa_adamw`).

    Args:
      learning_rate: a float or an optax schedule.
      k: columns of each ``V``.
      max_grad_norm: global-norm clipping after the projection; ``None`` for no clipping.
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      weight_decay: decoupled weight decay.
      strength: see `ogpsa_matrix`.
      conflict_only: see `ogpsa_matrix` (True is a ValueError).
      mask: see `ogpsa_matrix` (masks the projection only; all leaves are optimised).
      dims: see `ogpsa_matrix`.
      basis_dtype: see `ogpsa_matrix`.

    Returns:
      ``optax.chain(ogpsa_matrix(...), [clip_by_global_norm], adamw(...))``; ``update``
      forwards ``basis=`` to the projection.

    Example:
      >>> tx = ogpsa_matrix_adamw(1e-3, k=1)
      >>> params = {"w": jnp.ones((2, 3))}
      >>> state = tx.init(params)
      >>> v = {"w": jnp.array([[1.0], [0.0]])}
      >>> updates, state = tx.update({"w": jnp.ones((2, 3))}, state, params, basis=v)
      >>> bool(jnp.all(updates["w"][0] == 0.0))  # inputs along v see no change
      True
    """
    proj = dict(strength=strength, conflict_only=conflict_only, mask=mask, basis_dtype=basis_dtype)
    adam = dict(max_grad_norm=max_grad_norm, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
    return project_clip_adamw(ogpsa_matrix(k, dims=dims, **proj), learning_rate, **adam)


__all__ = ["ogpsa_matrix", "ogpsa_matrix_adamw", "project_matrix", "residual_max_matrix"]
