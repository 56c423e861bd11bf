"""Tests of the flat capability-basis estimator (ogpsa_jax/bases/flat.py) against float64 NumPy.

Runs jitted on one device and on a 2x4 mesh of 8 virtual CPU devices (Auto and Explicit axes).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ogpsa_jax as og

SHAPES = {"w": (8, 13), "e": (7, 13), "b": (5,), "t": (2, 11, 3)}
PSPECS = {"w": P("model", None), "e": P(), "b": P(), "t": P("data", None, None)}
MODES = ["jit", "auto", "explicit"]


def _mesh(mode):
    if mode == "jit":
        return None
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _put(trees, mesh):
    if mesh is None:
        return [jax.tree.map(jnp.asarray, t) for t in trees]
    return [
        {n: jax.device_put(jnp.asarray(x), NamedSharding(mesh, PSPECS[n])) for n, x in t.items()}
        for t in trees
    ]


def _stack(trees, name):
    """N x D float64 matrix of one leaf across trees."""
    return np.stack([np.asarray(t[name], np.float64).ravel() for t in trees])


def _spectrum_grads(rng, sing=(8.0, 4.0, 2.0, 1.0, 0.5)):
    """N gradient trees whose per-leaf N x D matrix has the given singular values."""
    n = len(sing)
    out = [{} for _ in range(n)]
    for name, shape in SHAPES.items():
        d = int(np.prod(shape))
        left, _ = np.linalg.qr(rng.standard_normal((n, n)))
        right, _ = np.linalg.qr(rng.standard_normal((d, n)))
        a = left @ np.diag(sing) @ right.T
        for i in range(n):
            out[i][name] = a[i].reshape(shape).astype(np.float32)
    return out


def _np_reference_gs(trees, name, eps=1e-10):
    """NumPy transcription of the reference code's per-tensor normalise + Gram-Schmidt,
    generalised to N sets by subtracting the projections on all previous directions."""
    us = []
    for g in _stack(trees, name):
        n = np.linalg.norm(g)
        b = g / (n + 1e-10) if n > eps else np.zeros_like(g)
        v = b - sum((np.dot(b, u) * u for u in us), np.zeros_like(b))
        vn = np.linalg.norm(v)
        us.append(np.zeros_like(v) if vn + 1e-8 < 1e-6 else v / (vn + 1e-8))
    return np.stack(us)


_basis_jit = jax.jit(og.capability_basis, static_argnames=("k", "method", "energy", "eps"))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("method", ["gram_schmidt", "svd"])
def test_orthonormal_and_sharded(mode, method):
    rng = np.random.default_rng(0)
    mesh = _mesh(mode)
    trees_np = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(3)
    ]
    trees = _put(trees_np, mesh)
    ctx = jax.set_mesh(mesh) if mesh is not None else None
    if ctx:
        with ctx:
            basis = _basis_jit(trees, k=4, method=method)
    else:
        basis = _basis_jit(trees, k=4, method=method)
    assert len(basis) == 4
    for name in SHAPES:
        u = _stack(basis, name)
        # three independent gradients: 3 orthonormal directions, the 4th padded with zeros
        np.testing.assert_allclose(u @ u.T, np.diag([1.0, 1.0, 1.0, 0.0]), atol=1e-6)
        # the directions span the gradients (float32 rounding of the residual: 1e-5)
        a = _stack(trees_np, name)
        resid = a - (a @ u.T) @ u
        assert np.linalg.norm(resid) <= 1e-5 * np.linalg.norm(a)
        if mesh is not None:
            for b in basis:
                assert b[name].sharding.is_equivalent_to(trees[0][name].sharding, b[name].ndim)
        assert basis[0][name].dtype == jnp.float32 and basis[0][name].shape == SHAPES[name]


def test_gram_schmidt_matches_reference_formulas():
    rng = np.random.default_rng(1)
    trees = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(3)
    ]
    trees[0]["b"] = np.zeros(5, np.float32)  # ||g|| <= eps: dropped, zero direction
    trees[1]["e"] = (2.0 * trees[0]["e"]).astype(np.float32)  # parallel: u2 = 0 by threshold
    trees[2]["t"] = (1e3 * trees[2]["t"]).astype(np.float32)  # scale does not matter
    basis = _basis_jit(trees)
    for name in SHAPES:
        # float32 vs float64 (and our second re-orthogonalisation pass): 2e-6
        np.testing.assert_allclose(_stack(basis, name), _np_reference_gs(trees, name), atol=2e-6)
    assert not np.any(np.asarray(basis[0]["b"]))
    assert not np.any(np.asarray(basis[1]["e"]))
    # the reference's k = 2 case is the first two directions; k = 1 is the normalised gradient
    b2 = _basis_jit(trees, k=2)
    chex.assert_trees_all_close(b2, basis[:2], atol=1e-7, rtol=0)
    b1 = _basis_jit(trees, k=1)[0]
    np.testing.assert_allclose(
        b1["w"], trees[0]["w"] / np.linalg.norm(trees[0]["w"].astype(np.float64)), atol=1e-7
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "explicit"])
def test_svd_span_and_energy_match_numpy(mode):
    rng = np.random.default_rng(2)
    mesh = _mesh(mode)
    trees_np = _spectrum_grads(rng)
    trees = _put(trees_np, mesh)

    def run(**kw):
        if mesh is None:
            return _basis_jit(trees, method="svd", **kw)
        with jax.set_mesh(mesh):
            return _basis_jit(trees, method="svd", **kw)

    top3, by_energy = run(k=3), run(k=4, energy=0.9)
    for name in SHAPES:
        a = _stack(trees_np, name)
        _, s, vt = np.linalg.svd(a, full_matrices=False)
        u = _stack(top3, name)
        # same top-3 subspace as float64 SVD (projector difference; gaps are 2x: 1e-5)
        np.testing.assert_allclose(u.T @ u, vt[:3].T @ vt[:3], atol=1e-5)
        # energy 0.9: smallest rank with captured energy >= 0.9 (here 2), rest zero
        energy = np.cumsum(s**2) / np.sum(s**2)
        rank = int(np.argmax(energy >= 0.9)) + 1
        assert rank == 2
        ue = _stack(by_energy, name)
        np.testing.assert_allclose(
            np.linalg.norm(ue, axis=1), [1.0] * rank + [0.0] * (4 - rank), atol=1e-6
        )
        np.testing.assert_allclose(ue[:rank].T @ ue[:rank], vt[:rank].T @ vt[:rank], atol=1e-5)


def test_svd_rank_deficient_and_zero_leaf():
    rng = np.random.default_rng(3)
    trees = [
        {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()} for _ in range(3)
    ]
    trees.append({n: (trees[0][n] - 0.5 * trees[1][n]).astype(np.float32) for n in SHAPES})
    for t in trees:
        t["b"] = np.zeros(5, np.float32)
    basis = _basis_jit(trees, method="svd")
    for name in ("w", "e", "t"):
        u = _stack(basis, name)
        # rank 3: the 4th eigenvalue is float32 noise, below the relative tolerance
        np.testing.assert_allclose(u @ u.T, np.diag([1.0, 1.0, 1.0, 0.0]), atol=1e-6)
    assert not np.any(_stack(basis, "b"))  # all-zero gradients: zero directions, no NaN


def test_bad_input_raises_value_error():
    rng = np.random.default_rng(5)
    t = {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}
    with pytest.raises(ValueError, match="non-empty"):
        og.capability_basis([])
    with pytest.raises(ValueError, match="k must be"):
        og.capability_basis([t], k=0)
    with pytest.raises(ValueError, match="method"):
        og.capability_basis([t], method="qr")
    with pytest.raises(ValueError, match="energy must lie"):
        og.capability_basis([t], method="svd", energy=1.5)
    with pytest.raises(ValueError, match="only used with method='svd'"):
        og.capability_basis([t], energy=0.9)
    with pytest.raises(ValueError, match="does not match the structure"):
        og.capability_basis([t, {"w": t["w"]}])
    with pytest.raises(ValueError, match="shape"):
        og.capability_basis([t, {**t, "b": np.zeros(6, np.float32)}])
