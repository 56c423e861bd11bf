"""Flat capability bases: reference gradients -> per-tensor orthonormal directions.

Two methods, both per parameter tensor (leaf) and both free of any parameter-sized SVD/QR:

* ``gram_schmidt`` -- the reference code, generalised to any number N of reference gradients:
  normalise each gradient (``b = g / (||g|| + 1e-10)``, a zero direction when ``||g|| <= eps``),
  then sequential Gram-Schmidt (``u = v / (||v|| + 1e-8)``, zero when ``||v|| + 1e-8 < 1e-6``),
  with a second re-orthogonalisation pass for float32 stability.
* ``svd`` -- the top directions of the span of the N gradients, from the eigendecomposition of
  the small N x N Gram matrix ``G = A A^T`` (A: N x D, the flattened gradients):
  ``u_j = A^T w_j / sqrt(lambda_j)``, k directions or the fewest capturing ``energy``.

All parameter-sized work is elementwise multiply + sum in float32, so everything runs jitted and
on sharded trees (Auto and Explicit meshes); only N x N matrices are replicated. The result is
what `ogpsa_jax.projection.ogpsa` stores (``set_basis`` or ``update(..., basis=)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax._tree import zeros_like

_F32 = jnp.float32
# `svd`: eigenvalues of the Gram matrix below this fraction of the largest are treated as zero
# (their directions carry < 1e-5 of the top energy and would be dominated by float32 noise).
_EIG_RTOL = 1e-5


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.sum(a * b)


def _gram_schmidt_leaf(gs: Sequence[jax.Array], k: int, eps: float) -> list[jax.Array]:
    """The reference normalise + Gram-Schmidt on one leaf; returns min(k, N) directions."""
    us: list[jax.Array] = []
    for g in gs[:k]:
        g = g.astype(_F32)
        norm = jnp.sqrt(_dot(g, g))
        v = jnp.where(norm > eps, g / (norm + 1e-10), 0.0)
        for _ in range(2):  # second pass: re-orthogonalise (float32 loses orthogonality)
            for u in us:
                v = v - _dot(v, u) * u
        v_norm = jnp.sqrt(_dot(v, v))
        us.append(jnp.where(v_norm + 1e-8 < 1e-6, 0.0, v / (v_norm + 1e-8)))
    return us


def _orthonormalise(us: Sequence[jax.Array]) -> list[jax.Array]:
    """Modified Gram-Schmidt clean-up of nearly orthonormal unit-or-zero vectors."""
    out: list[jax.Array] = []
    for u in us:
        v = u
        for w in out:
            v = v - _dot(v, w) * w
        v_norm = jnp.sqrt(_dot(v, v))
        out.append(jnp.where(v_norm > 0.5, v / jnp.maximum(v_norm, 0.5), 0.0))
    return out


def _svd_leaf(gs: Sequence[jax.Array], k: int, energy: float | None) -> list[jax.Array]:
    """Top-rank directions of span(gs) via the N x N Gram matrix; returns min(k, N) directions."""
    a = [g.astype(_F32) for g in gs]
    n = len(a)
    entries = {}
    for i in range(n):
        for j in range(i, n):
            entries[i, j] = _dot(a[i], a[j])
    gram_NxN = jnp.stack(
        [jnp.stack([entries[min(i, j), max(i, j)] for j in range(n)]) for i in range(n)]
    )
    lam_N, w_NxN = jnp.linalg.eigh(gram_NxN)
    lam_N = jnp.maximum(lam_N[::-1], 0.0)  # descending
    w_NxN = w_NxN[:, ::-1]
    keep_N = lam_N > _EIG_RTOL * lam_N[0]
    if energy is not None:
        total = jnp.maximum(jnp.sum(lam_N), jnp.finfo(_F32).tiny)
        captured_N = jnp.cumsum(lam_N) / total
        rank = jnp.sum(captured_N < energy) + 1  # smallest r with captured[r-1] >= energy
        keep_N = keep_N & (jnp.arange(n) < rank)
    scale_N = jnp.where(keep_N, jax.lax.rsqrt(jnp.where(keep_N, lam_N, 1.0)), 0.0)
    us = []
    for j in range(min(k, n)):
        coef_N = w_NxN[:, j] * scale_N[j]
        us.append(sum(coef_N[m] * a[m] for m in range(n)))
    return _orthonormalise(us)


def capability_basis(
    ref_grads: Sequence[optax.Params],
    *,
    k: int | None = None,
    method: str = "gram_schmidt",
    energy: float | None = None,
    eps: float = 1e-10,
) -> tuple[optax.Params, ...]:
    """Orthonormal per-tensor capability directions from N reference gradients.

    Args:
      ref_grads: sequence of N gradient trees with the parameters' structure.
      k: number of directions returned (static); defaults to N. Fewer available directions are
        padded with zero directions; with ``gram_schmidt`` and k < N only the first k gradients
        are used; with ``svd`` the top k.
      method: ``"gram_schmidt"`` (the reference code) or ``"svd"`` (top directions of the span).
      energy: ``svd`` only: keep the smallest rank whose captured energy (sum of the top
        eigenvalues over their total) is >= ``energy`` (in (0, 1]), capped at k.
      eps: ``gram_schmidt``: a gradient leaf with norm <= eps gives a zero direction.

    Returns:
      A tuple of k float32 trees; per leaf the directions are orthonormal or zero.

    Example:
      >>> g_a, g_b = {"w": jnp.array([3.0, 4.0, 0.0])}, {"w": jnp.array([1.0, 0.0, 0.0])}
      >>> u1, u2 = capability_basis([g_a, g_b])  # the reference code's k = 2
      >>> u1["w"], jnp.round(u2["w"], 3)
      (Array([0.6, 0.8, 0. ], dtype=float32), Array([ 0.8, -0.6,  0. ], dtype=float32))
      >>> (u,) = capability_basis([g_a, g_b], k=1, method="svd")  # the top direction
      >>> u["w"].shape
      (3,)
    """
    if not isinstance(ref_grads, (list, tuple)) or len(ref_grads) == 0:
        raise ValueError("ref_grads must be a non-empty list or tuple of gradient trees")
    n = len(ref_grads)
    k = n if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if method not in ("gram_schmidt", "svd"):
        raise ValueError(f"method must be 'gram_schmidt' or 'svd', got {method!r}")
    if energy is not None:
        if method != "svd":
            raise ValueError("energy is only used with method='svd'")
        if isinstance(energy, jax.core.Tracer):
            raise ValueError("energy must be a static Python float (mark it static under jit)")
        if not 0.0 < float(energy) <= 1.0:
            raise ValueError(f"energy must lie in (0, 1], got {energy!r}")
    leaves0, tree_def = jax.tree.flatten(ref_grads[0])
    all_leaves = [leaves0]
    for i, tree in enumerate(ref_grads[1:], start=1):
        leaves, other_def = jax.tree.flatten(tree)
        if other_def != tree_def:
            raise ValueError(
                f"ref_grads[{i}] does not match the structure of ref_grads[0]: {other_def} vs "
                f"{tree_def}"
            )
        for a, b in zip(leaves, leaves0, strict=True):
            if jnp.shape(a) != jnp.shape(b):
                raise ValueError(
                    f"ref_grads[{i}] has a leaf of shape {jnp.shape(a)}, expected {jnp.shape(b)}"
                )
        all_leaves.append(leaves)

    per_leaf = []
    for j in range(len(leaves0)):
        gs = [leaves[j] for leaves in all_leaves]
        if method == "gram_schmidt":
            us = _gram_schmidt_leaf(gs, k, eps)
        else:
            us = _svd_leaf(gs, k, energy)
        us += [zeros_like(gs[0], _F32)] * (k - len(us))
        per_leaf.append(us)
    return tuple(jax.tree.unflatten(tree_def, [us[i] for us in per_leaf]) for i in range(k))


__all__ = ["capability_basis"]
