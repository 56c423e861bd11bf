"""Matrix-factored (GPM-style) OGPSA: protect the input space of each weight matrix.

For a weight ``W`` of shape ``(d_in, d_out)`` (``y = x @ W``) the state holds an orthonormal
``V`` of shape ``(d_in, rank)`` (zero columns allowed) and the gradient becomes::

    G <- G - strength * V (V^T G)

i.e. each column of ``G`` loses its component in the protected input subspace span(V). Inputs
``x`` in that subspace then see (to first order) the same layer output after the step, which is
what Gradient Projection Memory (GPM, Saha et al. 2021) protects. A leaf is a stack of matrices
over its leading ``nb = min(axis, ndim - 2)`` axes (batch axes: a stacked ``(L, d_in, d_out)``
leaf holds one ``V`` per layer, ``(L, d_in, rank)``); every other axis but the input axis is a
column axis sharing that ``V`` (so ``(d_out, d_in)`` with axis 1 works too). Memory is
``sum(d_in * rank)`` over the projected leaves, against ``k`` full parameter copies for the
flat basis.

Which axis is the input axis is given by ``dims`` (a pytree of ints/None or a callable
``(path, leaf) -> int | None``, like optax's Muon dimension numbers); by default 2-D and 3-D
leaves use ``-2`` and every other leaf (1-D leaves, and anything whose path contains "embed",
"norm", "bias" or "scale") passes through with no memory (``optax.MaskedNode``).
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ogpsa_jax.transform import _check_strength, _keep_sharding

logger = logging.getLogger(__name__)

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# A dtype instance, not the callable `jnp.float32`: optax.inject_hyperparams would take a
# callable default for a schedule.
_F32_DTYPE = np.dtype(np.float32)
_LETTERS = "abcdefghjklmnopqstuvwxyz"  # no 'i' (input axis) and no 'r' (rank axis)

DimsSpec = Any  # pytree of int | None, or Callable[[KeyPath, jax.Array], int | None]


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_masked_or_none(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _path_str(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


_SKIP_NAMES = ("embed", "norm", "bias", "scale")


def default_dims(path: tuple[Any, ...], leaf: Any) -> int | None:
    """Default input axis: ``-2`` for 2-D and 3-D (layer-stacked) weights, else ``None``.

    Args:
      path: the leaf's key path (``jax.tree_util`` keys).
      leaf: the parameter (only its ``ndim`` is read).

    Returns:
      ``-2`` for a 2-D ``(d_in, d_out)`` or 3-D ``(L, d_in, d_out)`` leaf whose path contains
      none of "embed", "norm", "bias", "scale" (case-insensitive; so stacked ``(L, D)`` norm
      scales and biases pass through); ``None`` (pass through) otherwise.

    Example:
      >>> default_dims((), jnp.zeros((3, 5)))
      -2
    """
    name = _path_str(path).lower()
    if any(word in name for word in _SKIP_NAMES):
        return None
    return -2 if jnp.ndim(leaf) in (2, 3) else None


def resolve_dims(params: optax.Params, dims: DimsSpec = None, mask: Any = None) -> list:
    """Per-leaf input axes (non-negative int, or ``None`` = pass through), in leaf order.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``s).
      dims: ``None`` (:func:`default_dims`), a callable ``(path, leaf) -> int | None``, or a
        pytree with the structure of ``params`` holding ints or ``None``.
      mask: ``None``, a pytree of bools with the structure of ``params``, or a callable on the
        params returning one; ``False`` leaves pass through.

    Returns:
      A list with one entry per leaf of ``params`` (``jax.tree.leaves`` order).

    Example:
      >>> resolve_dims({"w": jnp.zeros((3, 5)), "b": jnp.zeros(5)})
      [None, 0]
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_masked)
    if dims is None:
        dims = default_dims
    if callable(dims):
        axes = [None if _is_masked(x) else dims(p, x) for p, x in leaves_with_path]
    else:
        axes_leaves, axes_def = jax.tree.flatten(dims, is_leaf=lambda x: x is None)
        if axes_def.num_leaves != treedef.num_leaves or len(axes_leaves) != len(leaves_with_path):
            raise ValueError(
                f"dims must have the parameters' structure: got {axes_def}, expected {treedef}"
            )
        axes = axes_leaves
    if mask is not None:
        mask_tree = mask(params) if callable(mask) else mask
        mask_leaves, mask_def = jax.tree.flatten(mask_tree, is_leaf=_is_masked)
        if len(mask_leaves) != len(leaves_with_path):
            raise ValueError(
                f"mask must have the parameters' structure: got {mask_def}, expected {treedef}"
            )
        axes = [a if m else None for a, m in zip(axes, mask_leaves, strict=True)]
    out = []
    for (path, leaf), axis in zip(leaves_with_path, axes, strict=True):
        if axis is None or _is_masked(leaf):
            out.append(None)
            continue
        ndim = len(jnp.shape(leaf))
        if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
            raise ValueError(
                f"input axis {axis!r} is invalid for leaf {_path_str(path)!r} of shape "
                f"{jnp.shape(leaf)}"
            )
        out.append(axis % ndim)
    return out


def _explicit_spec(x: Any) -> Any:
    """The PartitionSpec of ``x`` if its sharding is known (concrete, or Explicit-mode type)."""
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.are_all_axes_explicit:
            return sharding.spec
        return None
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding.spec
    return None


def batch_ndim(ndim: int, axis: int) -> int:
    """Number of leading batch axes of a leaf with ``ndim`` axes and input axis ``axis``.

    Args:
      ndim: the leaf's number of axes.
      axis: its (non-negative) input axis.

    Returns:
      ``max(0, min(axis, ndim - 2))``: the leaf is a stack of matrices over these axes.

    Example:
      >>> batch_ndim(3, 1), batch_ndim(2, 1)
      (1, 0)
    """
    return max(0, min(axis, ndim - 2))


def basis_shape(shape: tuple[int, ...], axis: int, rank: int) -> tuple[int, ...]:
    """Shape of ``V`` for a leaf of ``shape`` with input axis ``axis``: ``(*batch, d_in, rank)``.

    Args:
      shape: the leaf's shape.
      axis: its (non-negative) input axis.
      rank: columns of ``V``.

    Returns:
      The basis shape.

    Example:
      >>> basis_shape((3, 10, 12), 1, 4)
      (3, 10, 4)
    """
    nb = batch_ndim(len(shape), axis)
    return tuple(shape[:nb]) + (shape[axis], rank)


def _full_spec(spec: Any, ndim: int) -> tuple[Any, ...]:
    return tuple(spec) + (None,) * (ndim - len(tuple(spec)))


def _basis_spec(param_spec: Any, ndim: int, axis: int) -> jax.P:
    """Basis sharding: the parameter's batch and input axes, rank axis replicated."""
    spec = _full_spec(param_spec, ndim)
    return jax.P(*spec[: batch_ndim(ndim, axis)], spec[axis], None)


def _zeros_basis(p: Any, axis: int, rank: int, dtype: Any) -> jax.Array:
    shape = basis_shape(tuple(jnp.shape(p)), axis, rank)
    spec = _explicit_spec(p)
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


class MatrixOGPSAState(NamedTuple):
    """State of :func:`ogpsa_matrix`.

    Attributes:
      basis: tree with the parameters' structure; each projected leaf of shape
        ``(*batch, d_in, *cols)`` holds ``V`` of shape ``(*batch, d_in, rank)`` (dtype
        ``basis_dtype``, orthonormal columns or zero columns); pass-through leaves are
        ``optax.MaskedNode()``.
    """

    basis: optax.Params

    # Protocol read by `ogpsa_jax.transform.set_basis`.
    _carries_ogpsa_basis = True

    def with_basis(self, basis: optax.Params) -> MatrixOGPSAState:
        """Returns this state with a new basis (validated, zero-padded, cast, same shardings).

        Args:
          basis: tree with the parameters' structure; projected leaves hold ``V`` of shape
            ``(*batch, d_in, r)`` with ``r <= rank`` (padded with zero columns to ``rank``);
            pass-through leaves hold ``None`` or ``optax.MaskedNode()``.

        Returns:
          A state of identical structure, shapes, dtypes and shardings.

        Example:
          >>> basis = matrix_basis_from_activations(acts, rank=8)  # doctest: +SKIP
          >>> state = state.with_basis(basis)  # doctest: +SKIP
        """
        old_leaves, old_def = jax.tree.flatten(self.basis, is_leaf=_is_masked)
        new_leaves, new_def = jax.tree.flatten(basis, is_leaf=_is_masked_or_none)
        if len(new_leaves) != len(old_leaves) or new_def.num_nodes != old_def.num_nodes:
            raise ValueError(
                f"basis does not match the parameter structure: got {new_def}, expected {old_def}"
            )
        out = []
        for j, (o, n) in enumerate(zip(old_leaves, new_leaves, strict=True)):
            if _is_masked(o):
                if not _is_masked_or_none(n):
                    raise ValueError(f"basis leaf {j} is given for a leaf this transform skips")
                out.append(o)
                continue
            if _is_masked_or_none(n):
                raise ValueError(f"basis leaf {j} is missing (shape {o.shape} expected)")
            shape, rank = jnp.shape(n), o.shape[-1]
            if len(shape) != o.ndim or shape[:-1] != o.shape[:-1]:
                raise ValueError(
                    f"basis leaf {j} has shape {shape}, expected {o.shape[:-1] + ('r',)} "
                    f"with r <= {rank}"
                )
            if shape[-1] > rank:
                raise ValueError(f"basis leaf {j} has {shape[-1]} columns, more than rank={rank}")
            v = jnp.asarray(n, dtype=o.dtype)
            if shape[-1] < rank:
                v = jnp.pad(v, [(0, 0)] * (o.ndim - 1) + [(0, rank - shape[-1])])
            out.append(_keep_sharding(v, o))
        return MatrixOGPSAState(basis=jax.tree.unflatten(old_def, out))


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
    g_spec = _explicit_spec(g)
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


def residual_max(grads: optax.Updates, basis: optax.Params, *, dims: DimsSpec = None) -> jax.Array:
    """``max |V^T g|`` over every projected leaf: what a projected gradient still has in the
    protected input spaces (0 up to rounding right after :func:`project_matrix`).

    Args:
      grads: gradient tree.
      basis: as for :func:`project_matrix`.
      dims: input axis per leaf, as given to the transform.

    Returns:
      A float32 scalar (0 when no leaf has a basis).

    Example:
      >>> g = {"w": jnp.array([[3.0], [4.0]])}
      >>> float(residual_max(g, {"w": jnp.array([[1.0], [0.0]])}))
      3.0
    """
    g_leaves = jax.tree.flatten(grads, is_leaf=_is_masked)[0]
    v_leaves = jax.tree.flatten(basis, is_leaf=_is_masked_or_none)[0]
    if len(v_leaves) != len(g_leaves):
        raise ValueError("basis does not match the gradient structure")
    out = jnp.zeros((), _F32)
    for g, v, axis in zip(g_leaves, v_leaves, resolve_dims(grads, dims), strict=True):
        if _is_masked_or_none(v) or _is_masked(g) or axis is None:
            continue
        out = jnp.maximum(out, jnp.max(jnp.abs(_coefficients(g, v, axis)[0])))
    return out


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
      basis: tree with the structure of ``grads``: ``V`` of shape ``(*batch, d_in, rank)`` per
        projected leaf (orthonormal or zero columns), ``None``/``optax.MaskedNode`` elsewhere.
      dims: input axis per leaf (see :func:`resolve_dims`); only read for leaves with a basis.
      strength: fraction of the component removed, in [0, 1].

    Returns:
      The projected gradient tree, each leaf in its input dtype.

    Example:
      >>> g = {"w": jnp.ones((2, 3))}
      >>> project_matrix(g, {"w": jnp.array([[1.0], [0.0]])})["w"][0]
      Array([0., 0., 0.], dtype=float32)
    """
    _check_strength(strength)
    g_leaves, g_def = jax.tree.flatten(grads, is_leaf=_is_masked)
    v_leaves, v_def = jax.tree.flatten(basis, is_leaf=_is_masked_or_none)
    if len(v_leaves) != len(g_leaves):
        raise ValueError(
            f"basis does not match the gradient structure: got {v_def}, expected {g_def}"
        )
    axes = resolve_dims(grads, dims)
    out = []
    for j, (g, v, axis) in enumerate(zip(g_leaves, v_leaves, axes, strict=True)):
        if _is_masked_or_none(v) or _is_masked(g):
            out.append(g)
            continue
        if axis is None:
            raise ValueError(f"leaf {j} has a basis but no input axis (dims gives None)")
        want = basis_shape(tuple(g.shape), axis, 1)[:-1]
        if v.ndim != len(want) + 1 or tuple(v.shape[:-1]) != want:
            raise ValueError(
                f"basis leaf {j} has shape {v.shape}, expected {want + ('rank',)} for a "
                f"gradient of shape {g.shape} with input axis {axis}"
            )
        out.append(_project_leaf(g, v, axis, strength))
    return jax.tree.unflatten(g_def, out)


def ogpsa_matrix(
    rank: int,
    *,
    dims: DimsSpec = None,
    strength: float | jax.Array = 1.0,
    mask: Any = None,
    basis_dtype: Any = _F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """OGPSA with a protected input subspace of dimension ``rank`` per weight matrix.

    Args:
      rank: columns of each ``V`` (static), >= 1; zero columns project nothing.
      dims: input axis per leaf: ``None`` (:func:`default_dims`: ``-2`` for 2-D/3-D leaves
        without "embed", "norm", "bias" or "scale" in their path), a callable
        ``(path, leaf) -> int | None``, or a pytree of ints/``None`` with the parameters'
        structure. ``None`` = pass through.
      strength: fraction of the component removed, in [0, 1].
      mask: pytree of bools (or a callable on the params returning one); ``False`` leaves pass
        through with no memory.
      basis_dtype: dtype of the stored ``V`` (float32 by default).

    Under ``optax.inject_hyperparams`` pass ``static_args=("rank",)`` (plus ``"dims"``,
    ``"mask"`` or ``"basis_dtype"`` when they are callables: it would treat those as
    schedules); ``strength`` can then be changed in ``state.hyperparams``.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`MatrixOGPSAState` (all-zero
      ``V``: identity at first). ``update(updates, state, params=None, *, basis=None)``: a
      ``basis`` tree replaces the stored one before use (see
      :meth:`MatrixOGPSAState.with_basis`); ``ogpsa_jax.set_basis`` also works.

    Example:
      >>> tx = optax.chain(ogpsa_matrix(8), optax.adamw(1e-3))
      >>> state = tx.init(params)  # doctest: +SKIP
      >>> state = set_basis(state, matrix_basis_from_activations(acts, rank=8))  # doctest: +SKIP
    """
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    _check_strength(strength)
    if not callable(dims) and dims is not None:
        jax.tree.flatten(dims, is_leaf=lambda x: x is None)  # must be a valid pytree
    basis_dtype = jnp.dtype(basis_dtype)
    if not jnp.issubdtype(basis_dtype, jnp.floating):
        raise ValueError(f"basis_dtype must be a floating dtype, got {basis_dtype}")

    def init_fn(params: optax.Params) -> MatrixOGPSAState:
        leaves, treedef = jax.tree.flatten(params, is_leaf=_is_masked)
        axes = resolve_dims(params, dims, mask)
        basis = [
            optax.MaskedNode() if a is None else _zeros_basis(p, a, rank, basis_dtype)
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
        g_leaves, g_def = jax.tree.flatten(updates, is_leaf=_is_masked)
        v_leaves = jax.tree.flatten(state.basis, is_leaf=_is_masked)[0]
        if len(v_leaves) != len(g_leaves):
            raise ValueError("updates do not match the structure the state was built for")
        out = [
            g if _is_masked(v) or a is None else _project_leaf(g, v, a, strength)
            for g, v, a in zip(g_leaves, v_leaves, axes, strict=True)
        ]
        return jax.tree.unflatten(g_def, out), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def basis_nbytes(state: Any) -> int:
    """Bytes held by the matrix bases of every :class:`MatrixOGPSAState` inside ``state``.

    Args:
      state: an optimiser state (``chain`` tuples and nesting are fine).

    Returns:
      The sum of ``V.nbytes`` (``d_in * rank * itemsize`` per layer).

    Example:
      >>> basis_nbytes(ogpsa_matrix(4).init({"w": jnp.zeros((8, 3))}))
      128
    """
    is_state = lambda x: isinstance(x, MatrixOGPSAState)
    states = [s for s in jax.tree.leaves(state, is_leaf=is_state) if is_state(s)]
    total = 0
    for s in states:
        for v in jax.tree.leaves(s.basis, is_leaf=_is_masked):
            if not _is_masked(v):
                total += int(v.size) * jnp.dtype(v.dtype).itemsize
    return total


__all__: list[str] = [
    "MatrixOGPSAState",
    "basis_nbytes",
    "basis_shape",
    "batch_ndim",
    "default_dims",
    "ogpsa_matrix",
    "project_matrix",
    "residual_max",
    "resolve_dims",
]
