"""Estimating matrix (input-space) bases for :func:`ogpsa_jax.matrix.ogpsa_matrix`.

Two estimators, each jitted per leaf shape, each returning a tree that ``set_basis`` (or
``update(..., basis=)``) accepts:

- :func:`matrix_basis_from_gradients`: per leaf, the top left-singular directions (input axis)
  of the stacked reference-gradient matrix ``M = [G_1 | G_2 | ... | G_N]`` (d_in x N d_out).
- :func:`matrix_basis_from_activations` (GPM): per linear layer, the top right-singular
  directions of its input activations ``X`` (n_samples x d_in) on the reference set, with
  GPM's energy-threshold rank and its accumulation across tasks (``union_with=``).

Both work through ``M M^T`` only when ``d_in <= max_dense_dim`` (exact; a d_in x d_in matrix),
and otherwise through a randomized range finder with power iterations whose only dense
factorisation is an l x l eigendecomposition (l = rank + oversample). Products with ``M`` are
einsums over the blocks as given, so no concatenated copy of the gradients is formed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax.matrix import DimsSpec, batch_ndim, resolve_dims

logger = logging.getLogger(__name__)

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# Directions whose squared singular value is below this fraction of the largest are dropped
# (zero columns): in float32 they are numerical noise and carry < 1e-6 of the energy.
_REL_EIG_TOL = 1e-6


def _is_skip(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


def _ein(sub: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(sub, a, b, precision=_HIGHEST, preferred_element_type=_F32)


# A block of M is either a gradient G (d_in x C: M_b = G) or activations X (n x d_in:
# M_b = X^T). These three products are all the estimators need.
def _cov(block: jax.Array, act: bool) -> jax.Array:
    return _ein("ni,nj->ij" if act else "ic,jc->ij", block, block)


def _m_times(block: jax.Array, omega: jax.Array, act: bool) -> jax.Array:
    return _ein("ni,nk->ik" if act else "ic,ck->ik", block, omega)


def _mt_times(block: jax.Array, q_IxL: jax.Array, act: bool) -> jax.Array:
    return _ein("ni,ik->nk" if act else "ic,ik->ck", block, q_IxL)


def _top_left(
    blocks: Sequence[jax.Array],
    act: bool,
    n_dirs: int,
    max_dense_dim: int,
    power_iters: int,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Top-``n_dirs`` left singular vectors (d_in x n_dirs) and squared singular values of M."""
    d_in = blocks[0].shape[-1 if act else 0]
    if d_in <= max_dense_dim:
        cov_IxI = sum(_cov(b, act) for b in blocks)
        eig_I, vec_IxI = jnp.linalg.eigh(cov_IxI)
        return vec_IxI[:, ::-1][:, :n_dirs], jnp.maximum(eig_I[::-1][:n_dirs], 0.0)
    keys = jax.random.split(key, len(blocks))
    y_IxL = sum(
        _m_times(b, jax.random.normal(k, (b.shape[0 if act else 1], n_dirs), _F32), act)
        for b, k in zip(blocks, keys, strict=True)
    )
    q_IxL = jnp.linalg.qr(y_IxL)[0]
    for _ in range(power_iters):
        y_IxL = sum(_m_times(b, _mt_times(b, q_IxL, act), act) for b in blocks)
        q_IxL = jnp.linalg.qr(y_IxL)[0]
    zs = [_mt_times(b, q_IxL, act) for b in blocks]
    gram_LxL = sum(_ein("ck,cj->kj", z, z) for z in zs)
    eig_L, w_LxL = jnp.linalg.eigh(gram_LxL)
    u_IxL = _ein("ik,kj->ij", q_IxL, w_LxL[:, ::-1])
    return u_IxL, jnp.maximum(eig_L[::-1], 0.0)


def _energy_count(s2: jax.Array, total: jax.Array, energy: float | None, cap: int) -> jax.Array:
    """GPM's rule: smallest r with cumulative energy >= energy * total (capped)."""
    if energy is None:
        return jnp.asarray(cap)
    below = jnp.sum(jnp.cumsum(s2) < energy * total)
    return jnp.minimum(below + 1, cap)


def _pad_cols(v: jax.Array, rank: int) -> jax.Array:
    return jnp.pad(v, [(0, 0), (0, rank - v.shape[1])]) if v.shape[1] < rank else v


def _fresh(
    blocks: Sequence[jax.Array],
    act: bool,
    rank: int,
    energy: float | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
    key: jax.Array,
) -> jax.Array:
    d_in = blocks[0].shape[-1 if act else 0]
    m = sum(b.shape[0 if act else 1] for b in blocks)
    r_max = min(rank, d_in, m)
    n_dirs = r_max if d_in <= max_dense_dim else min(r_max + oversample, d_in, m)
    u_IxL, s2 = _top_left(blocks, act, n_dirs, max_dense_dim, power_iters, key)
    total = sum(jnp.sum(jnp.square(b.astype(_F32))) for b in blocks)
    r = _energy_count(s2, total, energy, r_max)
    idx = jnp.arange(n_dirs)
    keep = (idx < r) & (s2 > _REL_EIG_TOL * s2[0]) & (s2 > 0)
    v = jnp.where(keep[None, :], u_IxL, 0.0)[:, :r_max]
    return _pad_cols(v, rank)


def _union(
    x_NxI: jax.Array,
    v_old: jax.Array,
    rank: int,
    energy: float | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
    key: jax.Array,
) -> jax.Array:
    """GPM accumulation: add the residual's top directions to the old basis, capped at rank."""
    d_in = x_NxI.shape[1]
    v_old = v_old.astype(_F32)
    old_keep = jnp.sum(jnp.square(v_old), axis=0) > 0.5
    v_old = jnp.where(old_keep[None, :], v_old, 0.0)
    r_old = jnp.sum(old_keep)
    x = x_NxI.astype(_F32)
    resid_NxI = x - _ein("nr,ir->ni", _ein("ni,ir->nr", x, v_old), v_old)
    total = jnp.sum(jnp.square(x))
    captured = total - jnp.sum(jnp.square(resid_NxI))
    r_max = min(rank, d_in, x.shape[0])
    n_dirs = r_max if d_in <= max_dense_dim else min(r_max + oversample, d_in, x.shape[0])
    u_IxL, s2 = _top_left([resid_NxI], True, n_dirs, max_dense_dim, power_iters, key)
    cap = jnp.maximum(min(rank, d_in) - r_old, 0)
    if energy is None:
        r_add = cap
    else:
        need = energy * total - captured
        r_add = jnp.where(need > 0, jnp.sum(jnp.cumsum(s2) < need) + 1, 0)
        r_add = jnp.minimum(r_add, cap)
    idx = jnp.arange(n_dirs)
    new_keep = (idx < r_add) & (s2 > _REL_EIG_TOL * total)
    cand_IxC = jnp.concatenate([v_old, u_IxL], axis=1)
    keep = jnp.concatenate([old_keep, new_keep])
    order = jnp.argsort(jnp.where(keep, 0, 1), stable=True)[: min(rank, d_in)]
    cand_IxC, keep = cand_IxC[:, order], keep[order]
    q_IxC, r_CxC = jnp.linalg.qr(jnp.where(keep[None, :], cand_IxC, 0.0))
    q_IxC = q_IxC * jnp.where(jnp.diagonal(r_CxC) < 0, -1.0, 1.0)[None, :]
    return _pad_cols(jnp.where(keep[None, :], q_IxC, 0.0), rank)


def _replicated_if_explicit(fn: Callable) -> Callable:
    """`fn` under GSPMD propagation with a replicated result when the ambient mesh has Explicit
    axes: the estimators contract sharded dimensions (covariances, QR), which Explicit typing
    refuses without per-op output shardings. The bases they return are small and replicated.
    Used inside the jitted leaf estimators (jit's cache is keyed by the ambient mesh), with
    every array an argument: a traced value closed over from outside keeps its Explicit type."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or jax.sharding.AxisType.Explicit not in mesh.axis_types:
        return fn
    return jax.sharding.auto_axes(fn, out_sharding=jax.P())


def _vmap_n(fn: Callable, n: int) -> Callable:
    for _ in range(n):
        fn = jax.vmap(fn)
    return fn


@functools.partial(
    jax.jit,
    static_argnames=("axis", "rank", "max_dense_dim", "oversample", "power_iters"),
)
def _gradient_leaf(
    grads: tuple[jax.Array, ...],
    key: jax.Array,
    *,
    axis: int,
    rank: int,
    energy: jax.Array | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
) -> jax.Array:
    nb = batch_ndim(grads[0].ndim, axis)

    def run(key: jax.Array, energy: jax.Array | None, *grads: jax.Array) -> jax.Array:
        def one(*gs: jax.Array) -> jax.Array:
            if axis == nb:  # (d_in, *cols)
                blocks, act = [g.reshape(g.shape[0], -1) for g in gs], False
            else:  # (cols, d_in): the input axis is last
                blocks, act = list(gs), True
            return _fresh(blocks, act, rank, energy, max_dense_dim, oversample, power_iters, key)

        return _vmap_n(one, nb)(*grads)

    return _replicated_if_explicit(run)(key, energy, *grads)


@functools.partial(
    jax.jit,
    static_argnames=("rank", "max_dense_dim", "oversample", "power_iters"),
)
def _activation_leaf(
    x: jax.Array,
    v_old: jax.Array | None,
    key: jax.Array,
    *,
    rank: int,
    energy: jax.Array | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
) -> jax.Array:
    def run(key: jax.Array, energy: jax.Array | None, x: jax.Array, v_old: Any) -> jax.Array:
        if v_old is None:
            one = lambda xb: _fresh(
                [xb], True, rank, energy, max_dense_dim, oversample, power_iters, key
            )
            return _vmap_n(one, x.ndim - 2)(x)
        one = lambda xb, vb: _union(
            xb, vb, rank, energy, max_dense_dim, oversample, power_iters, key
        )
        return _vmap_n(one, x.ndim - 2)(x, v_old)

    return _replicated_if_explicit(run)(key, energy, x, v_old)


def _check_common(
    rank: Any, energy: Any, max_dense_dim: Any, oversample: Any, power_iters: Any
) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"rank must be an integer >= 1, got {rank!r}")
    if energy is not None and not (isinstance(energy, (int, float)) and 0.0 < energy <= 1.0):
        raise ValueError(f"energy must be None or a float in (0, 1], got {energy!r}")
    for name, value in (
        ("max_dense_dim", max_dense_dim),
        ("oversample", oversample),
        ("power_iters", power_iters),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def matrix_basis_from_gradients(
    ref_grads: Sequence[optax.Params],
    *,
    rank: int,
    energy: float | None = None,
    dims: DimsSpec = None,
    mask: Any = None,
    max_dense_dim: int = 2048,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> optax.Params:
    """Input-space basis per leaf from N reference gradients (top left-singular directions).

    Args:
      ref_grads: list/tuple of N gradient trees with the parameters' structure (e.g. from
        ``reference_gradients``; one per reference batch or set).
      rank: columns per ``V`` (static); directions beyond the data's rank are zero columns.
      energy: ``None`` for ``rank`` directions, or a fraction in (0, 1]: the smallest r whose
        directions carry that fraction of ``||M||_F^2`` (capped at ``rank``).
      dims: input axis per leaf, as for :func:`ogpsa_jax.matrix.ogpsa_matrix` (use the same).
      mask: as for :func:`ogpsa_jax.matrix.ogpsa_matrix`.
      max_dense_dim: largest d_in solved exactly via the d_in x d_in matrix ``M M^T``.
      oversample: extra random directions for the randomized range finder (larger d_in).
      power_iters: power iterations of the randomized range finder.
      seed: seed of the random test matrices.

    Returns:
      A tree with the parameters' structure: ``V`` (float32, ``(*batch, d_in, rank)``) per
      projected leaf, ``optax.MaskedNode()`` elsewhere.

    Example:
      >>> grads = [jax.grad(loss)(params, b) for b in ref_batches]  # doctest: +SKIP
      >>> state = set_basis(state, matrix_basis_from_gradients(grads, rank=8))  # doctest: +SKIP
    """
    _check_common(rank, energy, max_dense_dim, oversample, power_iters)
    if not isinstance(ref_grads, (list, tuple)) or not ref_grads:
        raise ValueError("ref_grads must be a non-empty list or tuple of gradient trees")
    leaves0, treedef = jax.tree.flatten(ref_grads[0], is_leaf=_is_skip)
    per_tree = []
    for i, tree in enumerate(ref_grads):
        leaves, tdef = jax.tree.flatten(tree, is_leaf=_is_skip)
        if tdef != treedef:
            raise ValueError(f"ref_grads[{i}] does not match the structure of ref_grads[0]")
        for a, b in zip(leaves, leaves0, strict=True):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"ref_grads[{i}] has a leaf of shape {jnp.shape(a)}, expected {jnp.shape(b)}"
                )
        per_tree.append(leaves)
    axes = resolve_dims(ref_grads[0], dims, mask)
    key = jax.random.key(seed)
    out = []
    for j, axis in enumerate(axes):
        if axis is None or _is_skip(leaves0[j]):
            out.append(optax.MaskedNode())
            continue
        grads = tuple(jnp.asarray(leaves[j]) for leaves in per_tree)
        out.append(
            _gradient_leaf(
                grads,
                key,
                axis=axis,
                rank=rank,
                energy=None if energy is None else jnp.float32(energy),
                max_dense_dim=max_dense_dim,
                oversample=oversample,
                power_iters=power_iters,
            )
        )
    return jax.tree.unflatten(treedef, out)


def matrix_basis_from_activations(
    activations: Any,
    *,
    rank: int,
    energy: float | None = None,
    union_with: Any = None,
    max_dense_dim: int = 2048,
    oversample: int = 8,
    power_iters: int = 2,
    seed: int = 0,
) -> Any:
    """GPM basis per layer: top right-singular directions of its input activations.

    Args:
      activations: tree (usually the parameters' structure) whose leaves are the inputs ``X``
        of a linear layer, shape ``(*batch, n_samples, d_in)`` (``*batch`` = the parameter's
        batch axes, e.g. the stacked layer axis); ``None``/``MaskedNode`` leaves are skipped.
        Zero rows (padding) carry no energy and change nothing.
      rank: columns per ``V`` (static).
      energy: ``None`` for ``rank`` directions, or GPM's threshold in (0, 1]: the smallest r
        whose directions carry that fraction of ``||X||_F^2`` (capped at ``rank``).
      union_with: optional previous basis (same tree, ``V`` of shape ``(*batch, d_in, rank)``,
        orthonormal or zero columns): GPM's accumulation. The activations are projected off
        it; new residual directions are added until the captured energy reaches ``energy``
        (all free columns when ``energy`` is None), the result re-orthonormalised, capped at
        ``rank``; old directions are kept.
      max_dense_dim: largest d_in solved exactly via the d_in x d_in matrix ``X^T X``.
      oversample: extra random directions for the randomized range finder (larger d_in).
      power_iters: power iterations of the randomized range finder.
      seed: seed of the random test matrices.

    Returns:
      A tree with the structure of ``activations``: float32 ``V`` of shape
      ``(*batch, d_in, rank)`` per leaf, ``optax.MaskedNode()`` for skipped leaves.

    Example:
      >>> acts = collect_inputs(capture_fn, ref_batches)  # doctest: +SKIP
      >>> basis_a = matrix_basis_from_activations(acts, rank=32, energy=0.97)  # doctest: +SKIP
      >>> basis_b = matrix_basis_from_activations(acts_b, rank=32, energy=0.97,
      ...                                         union_with=basis_a)  # doctest: +SKIP
    """
    _check_common(rank, energy, max_dense_dim, oversample, power_iters)
    leaves, treedef = jax.tree.flatten(activations, is_leaf=_is_skip)
    olds = [None] * len(leaves)
    if union_with is not None:
        olds, odef = jax.tree.flatten(union_with, is_leaf=_is_skip)
        if len(olds) != len(leaves):
            raise ValueError(
                f"union_with has structure {odef}, expected that of activations {treedef}"
            )
    key = jax.random.key(seed)
    out = []
    for j, (x, v_old) in enumerate(zip(leaves, olds, strict=True)):
        if _is_skip(x):
            out.append(optax.MaskedNode())
            continue
        shape = jnp.shape(x)
        if len(shape) < 2 or shape[-2] < 1:
            raise ValueError(f"activation leaf {j} must be (*batch, n_samples, d_in), got {shape}")
        if _is_skip(v_old):
            v_old = None
        elif jnp.shape(v_old) != shape[:-2] + (shape[-1], rank):
            raise ValueError(
                f"union_with leaf {j} has shape {jnp.shape(v_old)}, expected "
                f"{shape[:-2] + (shape[-1], rank)}"
            )
        out.append(
            _activation_leaf(
                jnp.asarray(x),
                v_old,
                key,
                rank=rank,
                energy=None if energy is None else jnp.float32(energy),
                max_dense_dim=max_dense_dim,
                oversample=oversample,
                power_iters=power_iters,
            )
        )
    return jax.tree.unflatten(treedef, out)


def collect_inputs(
    capture_fn: Callable[[Any], Any],
    batches: Iterable[Any],
    *,
    batch_axes: int = 0,
    rows_per_batch: int | None = None,
    seed: int = 0,
) -> Any:
    """Runs ``capture_fn`` on every batch and stacks each layer's inputs as sample rows.

    What a model must provide: ``capture_fn(batch)`` returns a tree (ideally with the
    parameters' structure, ``None`` for leaves without a basis) whose leaves are the inputs of
    each linear layer, shape ``(*batch_axes, *sample_axes, d_in)``, with padded positions
    zeroed. With Flax NNX: ``self.sow(nnx.Intermediate, "inputs", x)`` in each linear layer,
    then ``nnx.pop(model, nnx.Intermediate)`` after the forward pass; in a layer stack under
    ``nnx.scan`` the sown values get the leading layer axis (``batch_axes=1``). A pure-JAX
    model can simply return its layer inputs.

    Args:
      capture_fn: ``batch -> tree of activations`` (jitted here once).
      batches: iterable of batches.
      batch_axes: leading axes of every leaf that are parameter batch axes (kept as is).
      rows_per_batch: keep at most this many (random, without replacement) rows per batch.
      seed: seed of that subsampling.

    Returns:
      The tree with leaves of shape ``(*batch_axes, n_samples, d_in)``, float32.

    Example:
      >>> acts = collect_inputs(lambda b: mlp_inputs(params, b), batches)  # doctest: +SKIP
    """
    if not isinstance(batch_axes, int) or batch_axes < 0:
        raise ValueError(f"batch_axes must be an integer >= 0, got {batch_axes!r}")
    if rows_per_batch is not None and (not isinstance(rows_per_batch, int) or rows_per_batch < 1):
        raise ValueError(f"rows_per_batch must be None or an integer >= 1, got {rows_per_batch}")
    capture = jax.jit(capture_fn)
    key = jax.random.key(seed)
    chunks: list[list[jax.Array]] = []
    treedef = None
    for b, batch in enumerate(batches):
        leaves, tdef = jax.tree.flatten(capture(batch), is_leaf=_is_skip)
        if treedef is None:
            treedef = tdef
        elif tdef != treedef:
            raise ValueError(f"capture_fn returned a different structure on batch {b}")
        rows = []
        for j, x in enumerate(leaves):
            if _is_skip(x):
                rows.append(None)
                continue
            if x.ndim < batch_axes + 2:
                raise ValueError(
                    f"captured leaf {j} of shape {x.shape} needs >= {batch_axes + 2} axes"
                )
            x = x.reshape(x.shape[:batch_axes] + (-1, x.shape[-1])).astype(_F32)
            if rows_per_batch is not None and x.shape[-2] > rows_per_batch:
                pick = jax.random.choice(
                    jax.random.fold_in(key, b * 1009 + j),
                    x.shape[-2],
                    (rows_per_batch,),
                    replace=False,
                )
                x = jnp.take(x, pick, axis=-2)
            rows.append(x)
        chunks.append(rows)
    if treedef is None:
        raise ValueError("batches is empty")
    out = [
        None if chunks[0][j] is None else jnp.concatenate([c[j] for c in chunks], axis=-2)
        for j in range(len(chunks[0]))
    ]
    return jax.tree.unflatten(treedef, out)


__all__: list[str] = [
    "collect_inputs",
    "matrix_basis_from_activations",
    "matrix_basis_from_gradients",
]
