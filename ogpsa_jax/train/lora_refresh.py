"""OGPSA's matrix (input-space) basis on LoRA adapters: which of A and B to constrain, and how.

An adapted projection computes ``y = x W + s (x A) B`` (``A`` [d_in, r], ``B`` [r, d_out], ``W``
frozen). Let ``V`` [d_in, k] be an orthonormal basis of the inputs to protect (GPM's activation
basis of that layer, or the ``gradient`` method's). After a step ``(A, B) -> (A + dA, B + dB)``
the output on an input ``x`` changes by ``s (x dA (B + dB) + x A dB)``. For every x in span(V)
this is exactly zero when

1. ``V^T dA = 0``: A's gradient is projected off span(V) (the matrix transform on A's input
   axis, with ``V``), and
2. ``(x A) dB = 0``: B's gradient is projected off the inputs that protected x give B, the
   span of ``A^T V`` (the matrix transform on B's input axis, the rank axis, with an
   orthonormal basis of ``A^T V``). By 1, ``A^T V`` does not change between refreshes.

InfLoRA (Liang & Li, CVPR 2024) reaches the same guarantee by designing the down-projection
(our ``A``) with its columns orthogonal to the old tasks' subspace and training only the
up-projection (our ``B``, initialised at zero): then ``A^T V = 0`` and B moves freely. We take
that design where it costs nothing: at a refresh, every layer whose ``B`` is exactly zero (a
fresh adapter; its output is ``x W`` whatever A is) has ``A`` replaced by ``A - V V^T A``, which
changes no output. Unlike InfLoRA, A keeps training (inside the complement of span(V), by 1),
so the adapter keeps its full rank of directions. At a later refresh ``V`` is recomputed at the
current weights and B is no longer zero: A is left alone (changing it would change the model)
and rule 2 restricts B to the complement of ``A^T V_new`` -- exact, but B loses every direction
that A's columns reach in the new span, however little (logged as ``lora_b_rank``, out of r).
``ogpsa.lora_tol`` trades exactness for B's freedom: directions that protected unit inputs
reach with ``||x A|| <= lora_tol * ||A||_2`` are left free, so those inputs' outputs may change
by at most that fraction of the largest change the step can make.

Example:
    >>> a = jnp.eye(4)[None, :, :2]  # A: 1 layer, d_in 4, r 2
    >>> v = jnp.eye(4)[None, :, 1:2]  # V protects e_1, which A's second column hits
    >>> rank_basis(a, v, k=3)[0]  # B's protected rank direction: the second one
    Array([[0., 0., 0.],
           [1., 0., 0.]], dtype=float32)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax._tree import is_masked, leaf_paths
from ogpsa_jax.projection import get_basis, ogpsa_matrix, set_basis
from ogpsa_jax.train.optimizer import param_mask
from ogpsa_jax.train.schema import OGPSAConfig

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# A direction of A^T V counts when its singular value exceeds this fraction of ||A||_2 (at
# least): above the float32 round-off of an A made orthogonal to V (~1e-7).
RANK_TOL = 1e-5
_A_PATH = re.compile(r"_lora/a$")

# refresh(params, opt_state) -> (params, opt_state, metrics): this refresh may change params.
LoRARefresh = Callable[[Any, Any], tuple[Any, Any, dict]]


def _ein(sub: str, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.einsum(sub, x.astype(_F32), y.astype(_F32), precision=_HIGHEST)


def orthogonal_to(a_LxIxR: jax.Array, v_LxIxK: jax.Array) -> jax.Array:
    """``A - V V^T A`` per layer: A's columns with their span(V) component removed (float32).

    Example:
        >>> orthogonal_to(jnp.ones((1, 2, 1)), jnp.eye(2)[None, :, :1])[0, :, 0]
        Array([0., 1.], dtype=float32)
    """
    return a_LxIxR.astype(_F32) - _ein(
        "lik,lkr->lir", v_LxIxK, _ein("lik,lir->lkr", v_LxIxK, a_LxIxR)
    )


def rank_basis(a_LxIxR: jax.Array, v_LxIxK: jax.Array, *, k: int, tol: float = 0.0) -> jax.Array:
    """An orthonormal basis of span(``A^T V``) in B's input (rank) space, per layer.

    Args:
        a_LxIxR: the adapter's A, (L, d_in, r).
        v_LxIxK: the layer's protected input basis (orthonormal or zero columns), (L, d_in, k).
        k: columns of the result (zero-padded; at most ``min(r, k)`` are non-zero).
        tol: keep the directions whose singular value exceeds ``max(tol, RANK_TOL)`` times
            that layer's ``||A||_2`` (0: all but round-off, the exact rule).

    Returns:
        U, float32 (L, r, k): the kept left singular vectors of ``A^T V``; zero columns
        elsewhere. A protected unit input x then reaches the dropped directions with
        ``||x A|| <= max(tol, RANK_TOL) * ||A||_2``.
    """
    a_LxIxR = a_LxIxR.astype(_F32)
    m_LxRxK = _ein("lir,lik->lrk", a_LxIxR, v_LxIxK)
    u_LxRxS, s_LxS, _ = jnp.linalg.svd(m_LxRxK, full_matrices=False)
    scale_L = jnp.linalg.svd(a_LxIxR, compute_uv=False)[:, 0]  # ||A||_2 per layer
    keep_LxS = s_LxS > max(tol, RANK_TOL) * scale_L[:, None]
    u_LxRxS = jnp.where(keep_LxS[:, None, :], u_LxRxS, 0.0)
    n = u_LxRxS.shape[-1]
    return u_LxRxS[..., :k] if n >= k else jnp.pad(u_LxRxS, [(0, 0), (0, 0), (0, k - n)])


def _finish(
    pairs: list[tuple[int, int]], k: int, tol: float, leaves: list, bases: list
) -> tuple[list, list, jax.Array, jax.Array]:
    """(new leaves, the basis leaves of B, fraction of (layer, adapter) reset, mean B rank)."""
    leaves, b_bases, resets, ranks = list(leaves), [], [], []
    for ia, ib in pairs:
        a, b, v = leaves[ia], leaves[ib], bases[ia]
        fresh_L = jnp.all(b == 0, axis=(1, 2))  # B = 0: A may change, the output cannot
        a = jnp.where(fresh_L[:, None, None], orthogonal_to(a, v).astype(a.dtype), a)
        u = rank_basis(a, v, k=k, tol=tol)
        leaves[ia] = a
        b_bases.append(u)
        resets.append(fresh_L.astype(_F32))
        ranks.append(jnp.sum(jnp.sum(jnp.square(u), axis=1) > 0.5, axis=-1).astype(_F32))
    return leaves, b_bases, jnp.mean(jnp.concatenate(resets)), jnp.mean(jnp.concatenate(ranks))


def adapter_mask(og: OGPSAConfig, params: Any) -> Any:
    """The leaves of an adapter tree whose basis is estimated: the A matrices that
    ``og.mask`` selects (B's basis follows from A's).

    Raises:
        ValueError: ``og.mask`` selects an adapter's A without its B, or the other way round.
    """
    user = param_mask(og.mask)
    chosen = jax.tree.leaves(user(params)) if user is not None else None
    paths = leaf_paths(params)
    chosen = chosen if chosen is not None else [True] * len(paths)
    by_path = dict(zip(paths, chosen, strict=True))
    for path, on in by_path.items():
        if _A_PATH.search(path) and by_path.get(path[:-1] + "b") != on:
            raise ValueError(
                f"ogpsa.mask {og.mask!r} selects one of {path} and {path[:-1]}b: with LoRA "
                "adapters a matrix basis needs both matrices of an adapter or neither"
            )
    flags = [on and bool(_A_PATH.search(p)) for p, on in zip(paths, chosen, strict=True)]
    return jax.tree.unflatten(jax.tree.structure(params), flags)


def make_lora_refresh(
    og: OGPSAConfig, inner: Callable[..., Any], params: Any, mesh: jax.sharding.Mesh
) -> LoRARefresh:
    """The matrix-basis refresh of an adapter tree: estimate V for each A, then rules 1 and 2.

    Args:
        og: the stage's OGPSA config (a matrix method: ``gradient`` or ``activation``).
        inner: ``inner(mask) -> refresh`` building the method's refresh (e.g. `make_refresh`)
            for the leaves ``mask`` selects; it is run on a state holding the A bases only.
        params: the adapter tree (its structure and shardings).
        mesh: the training mesh.

    Returns:
        ``refresh(params, opt_state) -> (params, opt_state, metrics)``: the inner refresh's
        metrics plus ``lora_reset`` (fraction of the (layer, adapter) pairs whose B was zero and
        whose A was made orthogonal to V) and ``lora_b_rank`` (mean non-zero columns of B's
        basis, out of r). A non-finite basis changes neither params nor the state.
    """
    a_mask = adapter_mask(og, params)
    paths = leaf_paths(params)
    flags = jax.tree.leaves(a_mask)
    index = {p: i for i, p in enumerate(paths)}
    pairs = [
        (i, index[p[:-1] + "b"]) for i, (p, on) in enumerate(zip(paths, flags, strict=True)) if on
    ]
    a_tx = ogpsa_matrix(og.k, mask=a_mask)
    a_init = jax.jit(a_tx.init)
    inner_refresh = inner(a_mask)
    replicated = NamedSharding(mesh, P())
    leaves_sh = [x.sharding for x in jax.tree.leaves(params)]

    @jax.jit
    def finish(leaves: list, bases: list) -> Any:
        return _finish(pairs, og.k, og.lora_tol, leaves, bases)

    def refresh(params: Any, opt_state: Any) -> tuple[Any, Any, dict]:
        a_state = a_init(params)
        old = jax.tree.leaves(get_basis(opt_state), is_leaf=is_masked)
        if og.union:  # the previous A bases, for GPM's accumulation
            keep = [v if on else None for v, on in zip(old, flags, strict=True)]
            a_state = set_basis(a_state, jax.tree.unflatten(jax.tree.structure(params), keep))
        a_state, metrics = inner_refresh(params, a_state)
        if not metrics["basis_finite"]:
            return params, opt_state, metrics
        bases = jax.tree.leaves(get_basis(a_state), is_leaf=is_masked)
        leaves, treedef = jax.tree.flatten(params)
        put = lambda xs: [x if is_masked(x) else jax.device_put(x, replicated) for x in xs]
        new_leaves, b_bases, reset, rank = finish(put(leaves), put(bases))
        new_leaves = [jax.device_put(x, s) for x, s in zip(new_leaves, leaves_sh, strict=True)]
        full = [v if on else optax.MaskedNode() for v, on in zip(bases, flags, strict=True)]
        for (_, ib), u in zip(pairs, b_bases, strict=True):
            full[ib] = u
        opt_state = set_basis(opt_state, jax.tree.unflatten(treedef, full))
        metrics.update(lora_reset=float(reset), lora_b_rank=float(rank))
        return jax.tree.unflatten(treedef, new_leaves), opt_state, metrics

    return refresh


__all__ = [
    "RANK_TOL",
    "LoRARefresh",
    "adapter_mask",
    "make_lora_refresh",
    "orthogonal_to",
    "rank_basis",
]
