"""The linear algebra of the matrix basis estimators: top input-space directions of a matrix.

A matrix ``M`` (d_in x m) is given as blocks: gradients ``G`` (d_in x C, ``M_b = G``) or
activations ``X`` (n x d_in, ``M_b = X^T``); products with ``M`` are einsums over the blocks as
given, so no concatenated copy is formed. Its top left-singular directions come from the
d_in x d_in matrix ``M M^T`` when ``d_in <= max_dense_dim`` (exact), and otherwise from a
randomized range finder with power iterations whose only dense factorisation is an l x l
eigendecomposition (l = k + oversample). GPM's energy rule picks the rank; `union` is GPM's
accumulation across tasks. Everything is float32 with HIGHEST-precision matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_F32 = jnp.float32
_HIGHEST = jax.lax.Precision.HIGHEST
# Directions whose squared singular value is below this fraction of the largest are dropped
# (zero columns): in float32 they are numerical noise and carry < 1e-6 of the energy.
_REL_EIG_TOL = 1e-6


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


def _pad_cols(v: jax.Array, k: int) -> jax.Array:
    return jnp.pad(v, [(0, 0), (0, k - v.shape[1])]) if v.shape[1] < k else v


def fresh(
    blocks: Sequence[jax.Array],
    act: bool,
    k: int,
    energy: float | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
    key: jax.Array,
) -> jax.Array:
    """The top directions of M = [blocks]: at most k columns (d_in x k), zero-padded.

    Args:
      blocks: the blocks of M: gradients G (d_in x C) or, with ``act``, activations X
        (n x d_in, whose transposes are the blocks).
      act: whether the blocks are activations.
      k: columns of the result.
      energy: None for min(k, rank) directions, or GPM's threshold in (0, 1].
      max_dense_dim: largest d_in solved exactly through the d_in x d_in matrix M M^T.
      oversample: extra random directions of the randomized range finder.
      power_iters: its power iterations.
      key: its random key.

    Returns:
      V (d_in x k), float32, orthonormal or zero columns.
    """
    d_in = blocks[0].shape[-1 if act else 0]
    m = sum(b.shape[0 if act else 1] for b in blocks)
    r_max = min(k, d_in, m)
    n_dirs = r_max if d_in <= max_dense_dim else min(r_max + oversample, d_in, m)
    u_IxL, s2 = _top_left(blocks, act, n_dirs, max_dense_dim, power_iters, key)
    total = sum(jnp.sum(jnp.square(b.astype(_F32))) for b in blocks)
    r = _energy_count(s2, total, energy, r_max)
    idx = jnp.arange(n_dirs)
    keep = (idx < r) & (s2 > _REL_EIG_TOL * s2[0]) & (s2 > 0)
    v = jnp.where(keep[None, :], u_IxL, 0.0)[:, :r_max]
    return _pad_cols(v, k)


def union(
    x_NxI: jax.Array,
    v_old: jax.Array,
    k: int,
    energy: float | None,
    max_dense_dim: int,
    oversample: int,
    power_iters: int,
    key: jax.Array,
) -> jax.Array:
    """GPM accumulation: the old basis plus the top directions of the inputs' residual.

    Args:
      x_NxI: activations (n x d_in).
      v_old: the previous basis (d_in x k, orthonormal or zero columns); its directions are
        kept.
      k: columns of the result.
      energy: None to fill every free column, or GPM's threshold in (0, 1]: add directions
        until the captured energy of ``x_NxI`` reaches it.
      max_dense_dim: as for `fresh`.
      oversample: as for `fresh`.
      power_iters: as for `fresh`.
      key: as for `fresh`.

    Returns:
      V (d_in x k), float32, re-orthonormalised, zero-padded.
    """
    d_in = x_NxI.shape[1]
    v_old = v_old.astype(_F32)
    old_keep = jnp.sum(jnp.square(v_old), axis=0) > 0.5
    v_old = jnp.where(old_keep[None, :], v_old, 0.0)
    r_old = jnp.sum(old_keep)
    x = x_NxI.astype(_F32)
    resid_NxI = x - _ein("nr,ir->ni", _ein("ni,ir->nr", x, v_old), v_old)
    total = jnp.sum(jnp.square(x))
    captured = total - jnp.sum(jnp.square(resid_NxI))
    r_max = min(k, d_in, x.shape[0])
    n_dirs = r_max if d_in <= max_dense_dim else min(r_max + oversample, d_in, x.shape[0])
    u_IxL, s2 = _top_left([resid_NxI], True, n_dirs, max_dense_dim, power_iters, key)
    cap = jnp.maximum(min(k, d_in) - r_old, 0)
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
    order = jnp.argsort(jnp.where(keep, 0, 1), stable=True)[: min(k, d_in)]
    cand_IxC, keep = cand_IxC[:, order], keep[order]
    q_IxC, r_CxC = jnp.linalg.qr(jnp.where(keep[None, :], cand_IxC, 0.0))
    q_IxC = q_IxC * jnp.where(jnp.diagonal(r_CxC) < 0, -1.0, 1.0)[None, :]
    return _pad_cols(jnp.where(keep[None, :], q_IxC, 0.0), k)


__all__ = ["fresh", "union"]
