"""Basis refreshes: recompute the capability basis at the current weights, in jitted pieces.

Every refresh returns ``(opt_state with the new basis, metrics)`` and keeps the old basis when
anything it computed is not finite (``basis_finite=False``; the loop then skips or stops).

* `make_gradient_refresh` (methods ``gram_schmidt``, ``svd``, ``gradient``): gradients of the
  token NLL on the reference batches (``gram_schmidt``: one mean gradient per reference set, the
  reference code; ``svd`` and ``gradient``: one per batch), then `capability_basis` (flat) or
  `matrix_basis_from_gradients`. The gradients are checked too: Gram-Schmidt would turn a NaN
  gradient into a finite zero direction.
* `make_activation_refresh` (GPM, ``activation``): the decoder runs on the reference batches
  with its capture path on (`ogpsa_jax.models.capture`), ``capture_rows`` token rows in total
  are kept (spread evenly over the batches; the same positions every refresh), and
  `matrix_basis_from_activations` turns each projected weight's input rows into ``V``
  (``ogpsa.k`` columns, or fewer by GPM's ``energy`` rule). With ``ogpsa.union`` the new
  directions are added to the previous basis instead of replacing it.

`inputs_like` is the glue between the model and the projection layers: it arranges the
decoder's captured inputs like the parameter tree the transform sees, for the input axes and
mask the transform uses.

Example:
    >>> refresh = make_refresh(  # doctest: +SKIP
    ...     og, apply_fn=apply_fn, graphdef=graphdef, rest=rest, groups=groups,
    ...     param_shardings=param_sh, mesh=mesh, seed=0)
    >>> opt_state, metrics = refresh(params, opt_state)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax._tree import is_masked, leaf_paths, path_str
from ogpsa_jax.bases import (
    capability_basis,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)
from ogpsa_jax.models.capture import capture_inputs, stack_rows
from ogpsa_jax.projection import get_basis, resolve_dims, set_basis
from ogpsa_jax.train.first_order import FirstOrder
from ogpsa_jax.train.losses import token_nll
from ogpsa_jax.train.optimizer import param_mask
from ogpsa_jax.train.schema import FLAT_METHODS, OGPSAConfig
from ogpsa_jax.train.sharding import as_argument, rows_sharding, shardings_of
from ogpsa_jax.train.sharding import place as place_batch
from ogpsa_jax.train.step import ApplyFn, make_ref_grad_fn

# refresh(params, opt_state) -> (opt_state with the new basis, metrics)
Refresh = Callable[[Any, Any], tuple[Any, dict]]


def rows_per_batch(capture_rows: int, n_batches: int) -> int:
    """Rows captured per reference batch: ``ceil(capture_rows / n_batches)``.

    Args:
        capture_rows: rows wanted over the whole reference set.
        n_batches: reference batches.

    Returns:
        The per-batch count (>= 1).

    Example:
        >>> rows_per_batch(512, 25)
        21
    """
    if capture_rows < 1 or n_batches < 1:
        raise ValueError(
            f"need capture_rows >= 1 and batches >= 1, got {capture_rows}, {n_batches}"
        )
    return -(-capture_rows // n_batches)


def inputs_like(params: Any, inputs: dict[str, Any], *, dims: Any = None, mask: Any = None) -> Any:
    """Arranges captured inputs like ``params`` (e.g. an nnx.State), for a given basis layout.

    Args:
        params: the parameter tree the basis is for (leaf paths "layers/q_proj", "lm_head", ...
            as in `Decoder.params()`; nnx Variables are fine).
        inputs: `ogpsa_jax.models.capture.CapturedInputs.inputs` (or rows stacked over
            batches with `stack_rows`, same structure).
        dims: input axis per leaf as given to `ogpsa_matrix` (None = its default).
        mask: as given to `ogpsa_matrix`; leaves it skips get None.

    Returns:
        A tree with the structure of ``params``: the captured rows for every leaf that
        `ogpsa_matrix(dims=dims, mask=mask)` projects, None elsewhere.

    Raises:
        ValueError: a projected leaf has no captured input, or its input width is not the
            width of the leaf's input axis.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> cap = capture_inputs(model.params(), model.config, jnp.ones((2, 7), jnp.int32))
        >>> acts = inputs_like(nnx.state(model, nnx.Param), cap.inputs)
        >>> acts["layers"]["up_proj"][...].shape  # (num_layers, rows, hidden_size)
        (3, 14, 64)
    """
    flat: dict[str, Any] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        flat[path_str(path)] = x
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)
    axes = resolve_dims(params, dims, mask)
    out = []
    for (path, leaf), axis in zip(leaves, axes, strict=True):
        if axis is None:
            out.append(None)
            continue
        name = path_str(path)
        if name not in flat:
            raise ValueError(f"parameter {name!r} is projected but the decoder has no input for it")
        x, width = flat[name], jnp.shape(leaf)[axis]
        if jnp.shape(x)[-1] != width:
            raise ValueError(
                f"captured input of {name!r} has width {jnp.shape(x)[-1]} but the leaf's input "
                f"axis {axis} has size {width} (shape {jnp.shape(leaf)}): use the default dims"
            )
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def make_activation_refresh(
    graphdef: Any,
    rest: Any,
    og: OGPSAConfig,
    groups: Sequence[Sequence[dict]],
    *,
    place: Callable[[dict], dict] = lambda b: b,
    seed: int = 0,
    mask: Any = None,
) -> Callable[[Any, Any], tuple[Any, dict]]:
    """``refresh(params, opt_state) -> (opt_state with a new activation basis, metrics)``.

    Args:
        graphdef: the decoder's graphdef (`nnx.split(model, nnx.Param, ...)`).
        rest: the non-parameter state of that split.
        og: the stage's OGPSA config (``k``, ``energy``, ``mask``, ``capture_rows``, ``union``).
        groups: reference sets, each a list of host batches (``input_ids``,
            ``attention_mask``, ``loss_mask``), all of one shape.
        place: puts a host batch on the devices (e.g. with the rows sharding).
        seed: seed of the row draw (fixed: the same token positions at every refresh).
        mask: the leaves to estimate a basis for (default: ``param_mask(og.mask)``); the
            transform's state must project exactly these.

    Returns:
        The refresh function. Its metrics: ``ref_loss`` (token-mean NLL of the reference
        set), ``refresh_s``, ``basis_rank`` (mean non-zero columns per projected matrix),
        ``basis_finite`` and ``nonfinite_at`` (None, or what was not finite).

    Example:
        >>> refresh = make_activation_refresh(g, r, og, groups, seed=0)  # doctest: +SKIP
    """
    if og.method != "activation":
        raise ValueError(
            f"make_activation_refresh needs ogpsa.method='activation', got {og.method}"
        )
    batches = [place(b) for group in groups for b in group]
    if not batches:
        raise ValueError("the activation basis needs at least one reference batch")
    rows = rows_per_batch(og.capture_rows, len(batches))
    mask = param_mask(og.mask) if mask is None else mask
    energy = og.energy or None

    # Weights that share an input (q/k/v, gate/up) share one captured array inside the jitted
    # capture; only the distinct ones leave it, are stacked and are decomposed (the same key
    # for every leaf makes equal inputs give equal bases). `layout` maps each parameter leaf
    # to its distinct input (None: not projected); it is filled while tracing.
    layout: dict[str, Any] = {}

    @jax.jit  # `rest` is an argument: a closed-over array would be embedded as a constant
    def capture_jit(rest: Any, params: Any, batch: dict, key: jax.Array) -> tuple:
        model = nnx.merge(graphdef, params, rest)
        ids, attn = batch["input_ids"], batch["attention_mask"]
        cap = capture_inputs(
            model.params(),
            model.config,
            ids,
            attn,
            dtype=model.dtype,
            rows=rows,
            key=key,
            with_logits=True,
        )
        nll, count = token_nll(cap.logits, ids, batch["loss_mask"])
        acts = inputs_like(params, cap.inputs, mask=mask)
        leaves, treedef = jax.tree.flatten(acts, is_leaf=lambda x: x is None)
        distinct: list[jax.Array] = []
        index: list[int | None] = []
        for x in leaves:
            if x is None:
                index.append(None)
                continue
            j = next((j for j, d in enumerate(distinct) if d is x), None)
            if j is None:
                j = len(distinct)
                distinct.append(x)
            index.append(j)
        layout.update(index=index, treedef=treedef)
        return distinct, nll, count

    base_key = jax.random.key(seed)

    def refresh(params: Any, opt_state: Any) -> tuple[Any, dict]:
        t0 = time.perf_counter()
        per_batch, nll, count = [], 0.0, 0.0
        for i, batch in enumerate(batches):
            distinct, s, c = capture_jit(rest, params, batch, jax.random.fold_in(base_key, i))
            per_batch.append(distinct)
            nll, count = nll + float(s), count + float(c)
        index, treedef = layout["index"], layout["treedef"]
        old = None
        if og.union:  # one previous V per distinct input (the leaves sharing it hold equal V)
            old_leaves = jax.tree.leaves(
                get_basis(opt_state), is_leaf=lambda x: x is None or is_masked(x)
            )
            old = [None] * len(per_batch[0])
            for j, v in zip(index, old_leaves, strict=True):
                if j is not None and old[j] is None:
                    old[j] = v
        distinct_basis = matrix_basis_from_activations(
            stack_rows(per_batch), k=og.k, energy=energy, union_with=old, seed=seed
        )
        # each leaf gets its own buffer: the train step donates the basis leaf by leaf
        used: set[int] = set()
        leaves = []
        for j in index:
            if j is None:
                leaves.append(optax.MaskedNode())
            else:
                leaves.append(distinct_basis[j] if j not in used else jnp.copy(distinct_basis[j]))
                used.add(j)
        basis = jax.tree.unflatten(treedef, leaves)
        vs = [v for v in jax.tree.leaves(basis, is_leaf=is_masked) if not is_masked(v)]
        finite = all(bool(jnp.all(jnp.isfinite(v))) for v in vs)
        ok = finite and math.isfinite(nll)
        if ok:
            opt_state = set_basis(opt_state, basis)
        ranks = [jnp.sum(jnp.sum(jnp.square(v), axis=-2) > 0.5, axis=-1).reshape(-1) for v in vs]
        metrics = {
            "ref_loss": nll / max(count, 1.0),
            "refresh_s": time.perf_counter() - t0,
            "basis_rank": float(jnp.mean(jnp.concatenate(ranks))) if ranks else 0.0,
            "basis_finite": ok,
            "nonfinite_at": None if ok else ("the basis" if not finite else "the reference loss"),
        }
        return opt_state, metrics

    return refresh


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


def make_gradient_refresh(
    apply_fn: ApplyFn,
    og: OGPSAConfig,
    groups: Sequence[Sequence[dict]],
    param_shardings: Any,
    mesh: jax.sharding.Mesh,
    *,
    mask: Any = None,
) -> Refresh:
    """The refresh of a basis estimated from reference gradients (flat methods, ``gradient``).

    Args:
        apply_fn: ``(params, input_ids, attention_mask) -> logits``; passed to the jitted
            gradient as an argument (`as_argument`): a Partial's bound arrays stay inputs.
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
        >>> refresh = make_gradient_refresh(apply_fn, og, groups, param_sh, mesh)  # doctest: +SKIP
    """
    if og.method not in (*FLAT_METHODS, "gradient"):
        raise ValueError(
            f"ogpsa.method {og.method!r} is not estimated from gradients (activation bases need "
            f"the model's layer inputs: make_activation_refresh); use gram_schmidt, svd or gradient"
        )
    replicated = NamedSharding(mesh, P())
    rows_sh = rows_sharding(mesh, groups[0][0]["input_ids"].shape[0], 2, 0)
    groups = [[place_batch(b, rows_sh) for b in group] for group in groups]
    fn = as_argument(apply_fn)
    grad_jit = jax.jit(
        lambda f, p, b: make_ref_grad_fn(f)(p, b),
        in_shardings=(shardings_of(fn), param_shardings, rows_sh),
        out_shardings=(param_shardings, replicated, replicated),
    )
    add_jit = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    scale_jit = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a), donate_argnums=0)
    mask = param_mask(og.mask) if mask is None else mask
    basis_jit = jax.jit(partial(_finite_basis, og, mask), out_shardings=None)
    per_batch = og.method in ("svd", "gradient")

    def reference_grads(params: Any) -> tuple[list, list, float, float]:
        grads, tokens, nll, count = [], [], 0.0, 0.0
        for group in groups:
            acc, n = None, 0.0
            for b in group:
                g, s, c = grad_jit(fn, params, b)
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
    apply_fn: ApplyFn,
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
        apply_fn: ``(params, input_ids, attention_mask) -> logits`` (gradient methods).
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
    return make_gradient_refresh(apply_fn, og, groups, param_shardings, mesh, mask=mask)
