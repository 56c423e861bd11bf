"""The OGPSA optax transform: project gradients off a per-tensor capability subspace.

Per parameter tensor (leaf) the state holds k directions ``u_1..u_k`` of the leaf's shape,
orthonormal per leaf (zero directions allowed; they project nothing). The update removes the
gradient's component in their span::

    g <- g - strength * sum_i <g, u_i> u_i

with inner products in float32 and the result cast back to the gradient's dtype. To first order
the step then leaves the capability (reference) loss unchanged.

The basis is stored as a tuple of k parameter-shaped trees, so every basis leaf inherits its
parameter's sharding; leaves excluded by ``mask`` hold :class:`optax.MaskedNode` (no memory, and
orbax never sees a zero-size array).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

logger = logging.getLogger(__name__)

Basis = tuple[optax.Params, ...]
_F32 = jnp.float32
# Default basis dtype as a dtype *instance*: `jnp.float32` is callable, and
# optax.inject_hyperparams would mistake a callable default for a schedule.
_F32_DTYPE = np.dtype(np.float32)


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _check_strength(strength: Any) -> None:
    """Eagerly rejects a Python/NumPy strength outside [0, 1] (traced values pass)."""
    if isinstance(strength, jax.core.Tracer):
        return
    try:
        value = float(strength)
    except (TypeError, ValueError):
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}")


def _zeros_like(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Zeros shaped and sharded like ``x``, also inside a trace on an Auto (GSPMD) mesh.

    ``jnp.zeros_like`` of a tracer is a constant with no sharding of its own there, so jit would
    replicate it; a select that depends on ``x`` lets sharding propagation give it x's sharding
    (and stays zero even where x is NaN).
    """
    dtype = x.dtype if dtype is None else dtype
    if isinstance(x, jax.core.Tracer):
        return jnp.where(x == x, 0, 0).astype(dtype)
    return jnp.zeros_like(x, dtype=dtype)


def _is_placeholder(params: Any) -> bool:
    """True for the leafless stand-in ``optax.tree_map_params`` passes to ``init``."""
    return type(params).__name__ == "_ParamsPlaceholder"


def _keep_sharding(new: jax.Array, old: jax.Array) -> jax.Array:
    """Gives ``new`` the sharding of ``old`` where that sharding is known."""
    if isinstance(old, jax.core.Tracer):
        # Inside a trace: only an Explicit-mode sharding is part of the type.
        old_sharding = jax.typeof(old).sharding
        mesh = getattr(old_sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.are_all_axes_explicit:
            if jax.typeof(new).sharding.spec != old_sharding.spec:
                new = jax.sharding.reshard(new, old_sharding.spec)
        return new
    if isinstance(new, jax.core.Tracer):
        return new
    sharding = getattr(old, "sharding", None)
    if sharding is None or getattr(new, "sharding", None) == sharding:
        return new
    return jax.device_put(new, sharding)


class OGPSAState(NamedTuple):
    """State of :func:`ogpsa`: the capability basis.

    Attributes:
      basis: tuple of k parameter-shaped trees; in tree i, each leaf is the i-th direction of
        that parameter (same shape, dtype ``basis_dtype``), orthonormal per leaf or zero.
        Masked-out leaves are ``optax.MaskedNode()``.
    """

    basis: Basis

    # Protocol read by `set_basis`: any NamedTuple state with this flag and a `with_basis`
    # method carries an OGPSA basis.
    _carries_ogpsa_basis = True

    def with_basis(self, basis: Sequence[optax.Params]) -> OGPSAState:
        """Returns this state with a new basis (validated, padded, cast, same shardings).

        Args:
          basis: a tuple or list of at most k trees, each matching the parameter tree (full
            trees are fine for a masked transform: masked leaves are dropped). Fewer than k
            trees are padded with zero directions.

        Returns:
          A state of identical structure, shapes, dtypes and shardings.

        Example:
          >>> state = state.with_basis((u1_tree, u2_tree))  # doctest: +SKIP
        """
        return OGPSAState(basis=_replace_basis(self.basis, basis))


def _replace_basis(old: Basis, basis: Sequence[optax.Params]) -> Basis:
    """Validates ``basis`` against the stored ``old`` basis and returns it in the old layout."""
    k = len(old)
    if not isinstance(basis, (tuple, list)):
        raise ValueError(
            f"basis must be a tuple or list of parameter-shaped trees, got {type(basis).__name__}"
        )
    if len(basis) > k:
        raise ValueError(f"basis has {len(basis)} directions, more than k={k}")
    ref_def = jax.tree.structure(old[0], is_leaf=_is_masked)
    old_leaves = ref_def.flatten_up_to(old[0])
    for i, tree in enumerate(basis):  # validate everything before touching any array
        tree_def = jax.tree.structure(tree, is_leaf=_is_masked)
        if tree_def != ref_def:
            raise ValueError(
                f"basis tree {i} does not match the parameter structure: got {tree_def}, "
                f"expected {ref_def}"
            )
        for o, n in zip(old_leaves, ref_def.flatten_up_to(tree), strict=True):
            if _is_masked(o):
                continue
            if _is_masked(n):
                raise ValueError(f"basis tree {i} masks a leaf that this transform projects")
            if jnp.shape(n) != o.shape:
                raise ValueError(
                    f"basis tree {i} has a leaf of shape {jnp.shape(n)}, expected {o.shape}"
                )
    convert = lambda o, n: o if _is_masked(o) else _keep_sharding(jnp.asarray(n, o.dtype), o)
    new_trees = [
        jax.tree.map(convert, old[i], tree, is_leaf=_is_masked) for i, tree in enumerate(basis)
    ]
    for i in range(len(basis), k):
        new_trees.append(
            jax.tree.map(
                lambda o: o if _is_masked(o) else _zeros_like(o), old[i], is_leaf=_is_masked
            )
        )
    return tuple(new_trees)


# On CPU the coefficient reduction views each leaf as rows of this many elements along its last
# axis (a free reshape), and one reduction carries at most _CPU_GROUP coefficients (see
# `_coefficients`).
_CPU_ROW = 64
_CPU_GROUP = 4


def _add_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def _reduce_products(
    g: jax.Array, us: Sequence[jax.Array], shape: tuple[int, ...], axes: Sequence[int]
) -> tuple[jax.Array, ...]:
    """The sums over ``axes`` of ``g * u_i`` (all viewed with ``shape``) for every ``u_i``, in
    float32, as one variadic reduction: g is read once for all of them."""
    g32 = g.astype(_F32).reshape(shape)
    products = tuple(g32 * u.astype(_F32).reshape(shape) for u in us)
    zeros = tuple(jnp.zeros((), _F32) for _ in us)
    return tuple(jax.lax.reduce(products, zeros, _add_tuples, tuple(axes)))


def _row_view_ok(x: jax.Array) -> bool:
    """Whether ``x`` can be viewed as rows of ``_CPU_ROW`` along its last axis: that axis is a
    multiple of it and, where its sharding is known (always on Explicit axes), every shard of
    that axis holds whole rows: an Explicit-mode reshape refuses anything else, and under Auto
    axes GSPMD would have to move data."""
    if x.ndim == 0 or x.shape[-1] % _CPU_ROW:
        return False
    sharding = jax.typeof(x).sharding
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or mesh.empty or spec is None:
        return True
    last = spec[x.ndim - 1] if len(spec) >= x.ndim else None
    if last is None:
        return True
    names = last if isinstance(last, tuple) else (last,)
    shards = int(np.prod([mesh.shape[name] for name in names]))
    return (x.shape[-1] // _CPU_ROW) % shards == 0


def _coefficients(g: jax.Array, us: Sequence[jax.Array]) -> list[jax.Array]:
    """All k coefficients ``<g, u_i>`` in float32, reading g once (on CPU once per 4).

    One variadic reduction computes the k sums together, so g is read once (a bf16 g converted
    inside the loop) where k separate sums read it k times: at k = 2 the coefficients move 3
    leaf-sized arrays instead of 4, at k = 8 9 (CPU: 10) instead of 16. On CPU the leaf is
    viewed as rows of ``_CPU_ROW`` elements along its last axis (a reshape that moves nothing
    and keeps the sharding of the leading axes) and the row sums are added afterwards: XLA:CPU's row
    reductions vectorise there, and one reduction over the whole leaf runs ~1.5x slower at
    k = 2 (``benchmarks/projection.py``). A CPU reduction also carries at most 4 coefficients
    (k = 8 as 4 + 4 re-reads g once but runs ~1.2x faster than one 8-way loop). Elsewhere the
    whole leaf is one reduction (a minor-axis split would relayout a TPU array). The sums stay
    float32 throughout.
    """

    def whole() -> tuple[jax.Array, ...]:
        return _reduce_products(g, us, g.shape, tuple(range(g.ndim)))

    if not all(_row_view_ok(x) for x in (g, *us)):
        return list(whole())

    def rows() -> tuple[jax.Array, ...]:
        shape = (*g.shape[:-1], g.shape[-1] // _CPU_ROW, _CPU_ROW)
        groups = np.array_split(np.arange(len(us)), -(-len(us) // _CPU_GROUP))
        out = []
        for group in groups:
            g_i, us_i = g, [us[j] for j in group]
            if len(groups) > 1:  # one reduction per group, each converting g in its own loop
                g_i, us_i = jax.lax.optimization_barrier((g_i, us_i))
            out.extend(jnp.sum(p) for p in _reduce_products(g_i, us_i, shape, (g.ndim,)))
        return tuple(out)

    return list(jax.lax.platform_dependent(cpu=rows, default=whole))


def residual_max(grads: optax.Updates, basis: Sequence[optax.Params]) -> jax.Array:
    """``max |<g, u_i>|`` over every leaf and direction: what a projected gradient still has
    along the basis (0 up to rounding right after :func:`project`).

    Args:
      grads: gradient tree.
      basis: tuple of k trees with the structure of ``grads`` (``MaskedNode`` = not projected).

    Returns:
      A float32 scalar (0 when no leaf has a basis).

    Example:
      >>> float(residual_max({"w": jnp.array([3.0, 4.0])}, ({"w": jnp.array([1.0, 0.0])},)))
      3.0
    """
    g_leaves = jax.tree.leaves(grads, is_leaf=_is_masked)
    basis_leaves = [jax.tree.leaves(tree, is_leaf=_is_masked) for tree in basis]
    out = jnp.zeros((), _F32)
    for j, g in enumerate(g_leaves):
        us = [leaves[j] for leaves in basis_leaves if not _is_masked(leaves[j])]
        if us and not _is_masked(g):
            for c in _coefficients(g, us):
                out = jnp.maximum(out, jnp.abs(c))
    return out


def _project_leaf(
    g: jax.Array, us: Sequence[jax.Array], strength: Any, conflict_only: bool
) -> jax.Array:
    """Projects one leaf: all k coefficients in float32, then one fused subtract."""
    if not us:
        return g
    coeffs_K = _coefficients(g, us)
    if isinstance(conflict_only, bool):
        if conflict_only:
            coeffs_K = [jnp.minimum(c, 0.0) for c in coeffs_K]
    else:  # an injected (array) flag
        coeffs_K = [jnp.where(conflict_only, jnp.minimum(c, 0.0), c) for c in coeffs_K]
    # The coefficients are global reductions over the leaf: the subtract waits for all of them.
    # g goes through the same barrier so that its float32 view is recomputed inside the
    # subtract's loop, never materialised. Left to itself XLA:CPU fuses reduce -> broadcast ->
    # subtract into one library fusion that cannot write in place (a donated gradient then
    # costs an extra copy) and runs 1.5-4x slower (benchmarks/projection.py). Barriers move
    # no data; on GPU/TPU the reductions are separate kernels anyway.
    coeffs_K, g = jax.lax.optimization_barrier((coeffs_K, g))
    removed = sum(c * u.astype(_F32) for c, u in zip(coeffs_K, us, strict=True))
    return (g.astype(_F32) - jnp.asarray(strength, _F32) * removed).astype(g.dtype)


def project(
    grads: optax.Updates,
    basis: Sequence[optax.Params],
    *,
    strength: float | jax.Array = 1.0,
    conflict_only: bool = False,
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
    _check_strength(strength)
    if not isinstance(basis, (tuple, list)):
        raise ValueError(
            f"basis must be a tuple or list of parameter-shaped trees, got {type(basis).__name__}"
        )
    g_leaves, g_def = jax.tree.flatten(grads, is_leaf=_is_masked)
    basis_leaves = []
    for i, tree in enumerate(basis):
        leaves, tree_def = jax.tree.flatten(tree, is_leaf=_is_masked)
        if tree_def != g_def:
            raise ValueError(
                f"basis tree {i} does not match the gradient structure: got {tree_def}, "
                f"expected {g_def}"
            )
        for leaf, g in zip(leaves, g_leaves, strict=True):
            if not _is_masked(leaf) and not _is_masked(g) and jnp.shape(leaf) != jnp.shape(g):
                raise ValueError(
                    f"basis tree {i} has a leaf of shape {jnp.shape(leaf)} for a gradient of "
                    f"shape {jnp.shape(g)}"
                )
        basis_leaves.append(leaves)
    out = []
    for j, g in enumerate(g_leaves):
        us = [leaves[j] for leaves in basis_leaves]
        if _is_masked(g) or any(_is_masked(u) for u in us):
            out.append(g)
        else:
            out.append(_project_leaf(g, us, strength, conflict_only))
    return jax.tree.unflatten(g_def, out)


def _resolve_mask(mask: Any, params: optax.Params) -> Any:
    return mask(params) if callable(mask) else mask


def ogpsa(
    k: int,
    *,
    strength: float | jax.Array = 1.0,
    conflict_only: bool = False,
    mask: Any = None,
    basis_dtype: Any = _F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """Orthogonal gradient projection onto the complement of a per-tensor capability subspace.

    Args:
      k: number of basis directions per parameter tensor (static), >= 1.
      strength: fraction of the component removed, in [0, 1] (1 = the paper's full removal).
        May be injected with ``optax.inject_hyperparams(ogpsa, static_args=("k",))``.
      conflict_only: remove a direction only where ``<g, u_i> < 0`` ("threshold" mode).
      mask: pytree of bools with the parameters' structure, or a callable on the params
        returning one; ``False`` leaves pass through unchanged and carry no basis memory.
      basis_dtype: dtype in which the basis is stored (float32 by default).

    Under ``optax.inject_hyperparams`` pass ``static_args=("k",)`` (plus ``"basis_dtype"`` and
    ``"mask"`` when you give a dtype class or a callable: it would treat those as schedules);
    ``strength`` can then be changed in ``state.hyperparams``.

    Returns:
      A ``GradientTransformationExtraArgs``. Its state is an :class:`OGPSAState` whose basis
      starts as all-zero directions (identity). ``update(updates, state, params=None, *,
      basis=None)``: a ``basis`` (tuple of <= k trees) replaces the stored basis before use.

    Example:
      >>> tx = ogpsa(2)
      >>> state = tx.init(params)  # doctest: +SKIP
      >>> g, state = tx.update(grads, state, basis=(u1, u2))  # doctest: +SKIP
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(
            f"k must be a Python integer >= 1, got {k!r} (under optax.inject_hyperparams pass "
            "static_args=('k', 'basis_dtype'))"
        )
    _check_strength(strength)
    if isinstance(basis_dtype, jax.Array):
        raise ValueError(
            "basis_dtype must be a dtype, got an array (under optax.inject_hyperparams pass "
            "static_args=('k', 'basis_dtype'))"
        )
    basis_dtype = jnp.dtype(basis_dtype)

    def init_fn(params: optax.Params) -> OGPSAState:
        if mask is not None and not _is_placeholder(params):
            mask_tree = _resolve_mask(mask, params)
            params = jax.tree.map(
                lambda m, p: p if m else optax.MaskedNode(),
                mask_tree,
                params,
                is_leaf=_is_masked,
            )
        zeros = lambda p: p if _is_masked(p) else _zeros_like(p, basis_dtype)
        return OGPSAState(
            basis=tuple(jax.tree.map(zeros, params, is_leaf=_is_masked) for _ in range(k))
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


def set_basis(opt_state: Any, basis: Sequence[optax.Params]) -> Any:
    """Replaces the basis in every OGPSA-carrying state nested inside ``opt_state``.

    Works on any optax state (``chain`` tuples, ``inject_hyperparams``, ``masked``, nested) and
    under ``jax.jit``: every NamedTuple whose class sets ``_carries_ogpsa_basis = True`` gets
    ``.with_basis(basis)``. Structure, dtypes and shardings are unchanged.

    Args:
      opt_state: the optimiser state.
      basis: tuple of <= k parameter-shaped trees (full trees; masked leaves are dropped).

    Returns:
      The optimiser state with the new basis.

    Example:
      >>> opt_state = set_basis(opt_state, capability_basis(ref_grads))  # doctest: +SKIP
    """
    found = []

    def replace(node: Any) -> Any:
        if getattr(type(node), "_carries_ogpsa_basis", False):
            found.append(True)
            return node.with_basis(basis)
        return node

    new_state = jax.tree.map(replace, opt_state, is_leaf=_carries_basis)
    if not found:
        raise ValueError("opt_state contains no OGPSA state (nothing carries a basis)")
    return new_state


def _carries_basis(node: Any) -> bool:
    return getattr(type(node), "_carries_ogpsa_basis", False) is True


def get_basis(opt_state: Any) -> Basis:
    """Returns the basis of the first OGPSA-carrying state found in ``opt_state``.

    Args:
      opt_state: any optax state containing an OGPSA state.

    Returns:
      Its ``basis`` field (tuple of k trees; masked leaves are ``optax.MaskedNode``).

    Example:
      >>> u1 = get_basis(opt_state)[0]  # doctest: +SKIP
    """
    carriers = [n for n in jax.tree.leaves(opt_state, is_leaf=_carries_basis) if _carries_basis(n)]
    if not carriers:
        raise ValueError("opt_state contains no OGPSA state (nothing carries a basis)")
    return carriers[0].basis


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
    conflict_only: bool = False,
    mask: Any = None,
    basis_dtype: Any = _F32_DTYPE,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with OGPSA projection first, as in the paper: project -> clip -> AdamW.

    Args:
      learning_rate: a float or an optax schedule.
      k: basis directions per tensor.
      max_grad_norm: global-norm clipping after the projection; ``None`` for no clipping.
      b1: Adam first-moment decay.
      b2: Adam second-moment decay.
      eps: Adam epsilon.
      weight_decay: decoupled weight decay.
      strength: see :func:`ogpsa`.
      conflict_only: see :func:`ogpsa`.
      mask: see :func:`ogpsa` (masks the projection only; all leaves are optimised).
      basis_dtype: see :func:`ogpsa`.

    Returns:
      ``optax.chain(ogpsa(...), [clip_by_global_norm], adamw(...))``; ``update`` forwards
      ``basis=`` to the projection.

    Example:
      >>> tx = ogpsa_adamw(optax.cosine_decay_schedule(1e-6, 100), k=2)
      >>> updates, state = tx.update(grads, state, params, basis=basis)  # doctest: +SKIP
    """
    parts: list[optax.GradientTransformation] = [
        ogpsa(k, strength=strength, conflict_only=conflict_only, mask=mask, basis_dtype=basis_dtype)
    ]
    if max_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.chain(*parts)


__all__: list[str] = [
    "OGPSAState",
    "ogpsa",
    "ogpsa_adamw",
    "project",
    "set_basis",
    "get_basis",
]
