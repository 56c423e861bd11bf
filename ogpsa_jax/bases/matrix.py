"""Estimating matrix (input-space) bases for `ogpsa_jax.projection.ogpsa_matrix`.

Two estimators, each jitted per leaf shape, each returning a tree that ``set_basis`` (or
``update(..., basis=)``) accepts:

- `matrix_basis_from_gradients`: per leaf, the top left-singular directions (input axis) of the
  stacked reference-gradient matrix ``M = [G_1 | G_2 | ... | G_N]`` (d_in x N d_out).
- `matrix_basis_from_activations` (GPM): per linear layer, the top right-singular directions of
  its input activations ``X`` (n_samples x d_in) on the reference set, with GPM's
  energy-threshold rank and its accumulation across tasks (``union_with=``); `collect_inputs`
  gathers those activations.

The linear algebra (exact through ``M M^T`` up to ``max_dense_dim``, a randomized range finder
above) is `ogpsa_jax.bases._subspace`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax.bases._subspace import fresh, union
from ogpsa_jax.projection.dims import DimsSpec, batch_ndim, resolve_dims

_F32 = jnp.float32


def _is_skip(x: Any) -> bool:
    return x is None or isinstance(x, optax.MaskedNode)


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
    static_argnames=("axis", "k", "max_dense_dim", "oversample", "power_iters"),
)
def _gradient_leaf(
    grads: tuple[jax.Array, ...],
    key: jax.Array,
    *,
    axis: int,
    k: int,
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
            return fresh(blocks, act, k, energy, max_dense_dim, oversample, power_iters, key)

        return _vmap_n(one, nb)(*grads)

    return _replicated_if_explicit(run)(key, energy, *grads)


@functools.partial(
    jax.jit,
    static_argnames=("k", "max_dense_dim", "oversample", "power_iters"),
)
def _activation_leaf(
    x: jax.Array,
    v_old: jax.Array | None,
    key: jax.Array,
    *,
    k: int,
    energy: jax.Array | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
) -> jax.Array:
    def run(key: jax.Array, energy: jax.Array | None, x: jax.Array, v_old: Any) -> jax.Array:
        if v_old is None:
            one = lambda xb: fresh(
                [xb], True, k, energy, max_dense_dim, oversample, power_iters, key
            )
            return _vmap_n(one, x.ndim - 2)(x)
        one = lambda xb, vb: union(xb, vb, k, energy, max_dense_dim, oversample, power_iters, key)
        return _vmap_n(one, x.ndim - 2)(x, v_old)

    return _replicated_if_explicit(run)(key, energy, x, v_old)


def _check_common(
    k: Any, energy: Any, max_dense_dim: Any, oversample: Any, power_iters: Any
) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
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
    k: int,
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
      k: columns per ``V`` (static); directions beyond the data's rank are zero columns.
      energy: ``None`` for ``k`` directions, or a fraction in (0, 1]: the smallest r whose
        directions carry that fraction of ``||M||_F^2`` (capped at ``k``).
      dims: input axis per leaf, as for `ogpsa_jax.projection.ogpsa_matrix` (use the same).
      mask: as for `ogpsa_jax.projection.ogpsa_matrix`.
      max_dense_dim: largest d_in solved exactly via the d_in x d_in matrix ``M M^T``.
      oversample: extra random directions for the randomized range finder (larger d_in).
      power_iters: power iterations of the randomized range finder.
      seed: seed of the random test matrices.

    Returns:
      A tree with the parameters' structure: ``V`` (float32, ``(*batch, d_in, k)``) per
      projected leaf, ``optax.MaskedNode()`` elsewhere.

    Example:
      >>> g1 = {"w": jnp.array([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])}
      >>> g2 = {"w": jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 0.0]])}
      >>> v = matrix_basis_from_gradients([g1, g2], k=3)["w"]  # (d_in=3, k=3)
      >>> jnp.round(jnp.abs(v), 3)  # the two input directions the gradients use, then zero
      Array([[0., 1., 0.],
             [1., 0., 0.],
             [0., 0., 0.]], dtype=float32)
    """
    _check_common(k, energy, max_dense_dim, oversample, power_iters)
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
                k=k,
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
    k: int,
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
      k: columns per ``V`` (static).
      energy: ``None`` for ``k`` directions, or GPM's threshold in (0, 1]: the smallest r
        whose directions carry that fraction of ``||X||_F^2`` (capped at ``k``).
      union_with: optional previous basis (same tree, ``V`` of shape ``(*batch, d_in, k)``,
        orthonormal or zero columns): GPM's accumulation. The activations are projected off
        it; new residual directions are added until the captured energy reaches ``energy``
        (all free columns when ``energy`` is None), the result re-orthonormalised, capped at
        ``k``; old directions are kept.
      max_dense_dim: largest d_in solved exactly via the d_in x d_in matrix ``X^T X``.
      oversample: extra random directions for the randomized range finder (larger d_in).
      power_iters: power iterations of the randomized range finder.
      seed: seed of the random test matrices.

    Returns:
      A tree with the structure of ``activations``: float32 ``V`` of shape
      ``(*batch, d_in, k)`` per leaf, ``optax.MaskedNode()`` for skipped leaves.

    Example:
      >>> x_a = {"w": jnp.array([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0]])}  # inputs along e1
      >>> x_b = {"w": jnp.array([[0.0, 0.0, 5.0]])}  # a later task's inputs, along e3
      >>> v_a = matrix_basis_from_activations(x_a, k=2)
      >>> v_ab = matrix_basis_from_activations(x_b, k=2, union_with=v_a)
      >>> jnp.round(jnp.abs(v_ab["w"]), 3)  # e1 kept, e3 added
      Array([[1., 0.],
             [0., 0.],
             [0., 1.]], dtype=float32)
    """
    _check_common(k, energy, max_dense_dim, oversample, power_iters)
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
        elif jnp.shape(v_old) != shape[:-2] + (shape[-1], k):
            raise ValueError(
                f"union_with leaf {j} has shape {jnp.shape(v_old)}, expected "
                f"{shape[:-2] + (shape[-1], k)}"
            )
        out.append(
            _activation_leaf(
                jnp.asarray(x),
                v_old,
                key,
                k=k,
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
      >>> w1 = jnp.ones((3, 4))
      >>> inputs = lambda x: {"w1": x, "w2": jax.nn.relu(x @ w1)}  # each layer's input
      >>> acts = collect_inputs(inputs, [jnp.ones((2, 5, 3)), jnp.ones((2, 5, 3))])
      >>> acts["w1"].shape, acts["w2"].shape  # 2 batches x 2 x 5 rows
      ((20, 3), (20, 4))
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
