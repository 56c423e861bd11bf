"""Tests of the one state contract shared by the flat and matrix transforms
(ogpsa_jax/projection/state.py, residual.py): get_basis / set_basis, basis_nbytes, residual_max.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ogpsa_jax as og
from ogpsa_jax.projection import residual_max_flat, residual_max_matrix

# A stacked (L=3, d_in=10, d_out=12) weight, a plain (d_in=12, d_out=7) one, a bias.
SHAPES = {"blocks": (3, 10, 12), "head": (12, 7), "bias": (7,)}


def _tree(rng, dtype=np.float32):
    return {n: jnp.asarray(rng.standard_normal(s), dtype) for n, s in SHAPES.items()}


def _flat_basis(rng, k):
    """k trees, per leaf orthonormal (float64 QR)."""
    qs = {n: np.linalg.qr(rng.standard_normal((int(np.prod(s)), k)))[0] for n, s in SHAPES.items()}
    return tuple(
        {n: jnp.asarray(qs[n][:, i].reshape(s), jnp.float32) for n, s in SHAPES.items()}
        for i in range(k)
    )


def _matrix_basis(rng, k):
    """V per weight matrix (orthonormal columns), None for the bias."""
    ortho = lambda *shape: jnp.asarray(np.linalg.qr(rng.standard_normal(shape))[0], jnp.float32)
    return {"blocks": ortho(3, 10, k), "head": ortho(12, k), "bias": None}


@pytest.mark.parametrize("kind", ["flat", "matrix"])
def test_get_and_set_basis_refuse_no_state_and_two(kind):
    rng = np.random.default_rng(0)
    params = _tree(rng)
    if kind == "flat":
        tx, basis = og.ogpsa(2), _flat_basis(rng, 2)
    else:
        tx, basis = og.ogpsa_matrix(2), _matrix_basis(rng, 2)
    none = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params)
    for call in (lambda: og.get_basis(none), lambda: og.set_basis(none, basis)):
        with pytest.raises(ValueError, match="holds no OGPSA state"):
            call()
    # two states of this kind, and one of each kind: ambiguous, named by their paths
    other = og.ogpsa_matrix(2) if kind == "flat" else og.ogpsa(2)
    for second in (tx, other):
        two = optax.chain(tx, optax.masked(second, jax.tree.map(lambda _: True, params)))
        state = two.init(params)
        for call in (lambda s=state: og.get_basis(s), lambda s=state: og.set_basis(s, basis)):
            with pytest.raises(ValueError, match=r"2 OGPSA states \(at \[0\], \[1\]\.inner_state"):
                call()
        with pytest.raises(ValueError, match="2 OGPSA states"):
            og.residual_max(params, state)
    # exactly one: set then get returns the basis, the state keeps its structure and dtypes
    state = optax.chain(tx, optax.adamw(1e-3)).init(params)
    new_state = jax.jit(og.set_basis)(state, basis)
    chex.assert_trees_all_equal_structs(new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    got = og.get_basis(new_state)
    if kind == "flat":
        chex.assert_trees_all_equal(got, basis)
    else:
        pick = lambda t: {n: t[n] for n in ("blocks", "head")}
        chex.assert_trees_all_equal(pick(got), pick(basis))
        assert isinstance(got["bias"], optax.MaskedNode)


def test_basis_nbytes_counts_both_kinds():
    params = _tree(np.random.default_rng(1))
    n_params = sum(int(np.prod(s)) for s in SHAPES.values())
    # flat: k parameter copies over the projected leaves, in the basis dtype
    assert og.basis_nbytes(og.ogpsa(3).init(params)) == 3 * n_params * 4
    masked = og.ogpsa(2, mask={"blocks": True, "head": False, "bias": True}, basis_dtype="bfloat16")
    assert og.basis_nbytes(masked.init(params)) == 2 * (3 * 10 * 12 + 7) * 2
    # matrix: d_in * k per weight (the bias passes through)
    matrix_bytes = (3 * 10 + 12) * 5 * 4
    assert og.basis_nbytes(og.ogpsa_matrix(5).init(params)) == matrix_bytes
    # inside an alias state, and both kinds in one state: their sum; none: 0
    assert og.basis_nbytes(og.ogpsa_adamw(1e-3, 3).init(params)) == 3 * n_params * 4
    both = optax.chain(og.ogpsa(3), og.ogpsa_matrix(5), optax.adam(1e-3)).init(params)
    assert og.basis_nbytes(both) == 3 * n_params * 4 + matrix_bytes
    assert og.basis_nbytes(optax.adam(1e-3).init(params)) == 0


def test_residual_max_through_an_opt_state_of_each_kind():
    rng = np.random.default_rng(2)
    params, grads = _tree(rng), _tree(rng)
    flat_basis, matrix_basis = _flat_basis(rng, 2), _matrix_basis(rng, 3)
    flat_tx, matrix_tx = og.ogpsa_adamw(1e-3, 2), og.ogpsa_matrix_adamw(1e-3, 3)
    flat_state = og.set_basis(flat_tx.init(params), flat_basis)
    matrix_state = og.set_basis(matrix_tx.init(params), matrix_basis)
    residual = jax.jit(og.residual_max)
    got_flat, got_matrix = residual(grads, flat_state), residual(grads, matrix_state)
    # the same numbers as the basis-level functions (the same computation, jitted both ways)
    chex.assert_trees_all_close(got_flat, residual_max_flat(grads, flat_basis), rtol=1e-6, atol=0)
    chex.assert_trees_all_close(
        got_matrix, residual_max_matrix(grads, matrix_basis), rtol=1e-6, atol=0
    )
    # ... which are max |<g, u_i>| and max |V^T g| (float64 NumPy)
    g64 = {n: np.asarray(x, np.float64) for n, x in grads.items()}
    want_flat = max(abs(np.sum(g64[n] * np.asarray(u[n]))) for u in flat_basis for n in SHAPES)
    v_b, v_h = (np.asarray(matrix_basis[n], np.float64) for n in ("blocks", "head"))
    want_matrix = max(
        np.abs(np.einsum("lir,lio->lro", v_b, g64["blocks"])).max(),
        np.abs(v_h.T @ g64["head"]).max(),
    )
    assert float(got_flat) == pytest.approx(want_flat, rel=1e-5)
    assert float(got_matrix) == pytest.approx(want_matrix, rel=1e-5)
    # after the projection: 0 up to float32 rounding
    projected_flat = og.project(grads, flat_basis)
    projected_matrix = og.project_matrix(grads, matrix_basis)
    assert float(residual(projected_flat, flat_state)) <= 1e-5 * want_flat
    assert float(residual(projected_matrix, matrix_state)) <= 1e-5 * want_matrix
    # no OGPSA state: nothing is protected
    assert float(residual(grads, optax.adam(1e-3).init(params))) == 0.0


@pytest.mark.parametrize("kind", ["flat", "matrix"])
def test_tree_map_params_on_a_masked_state(kind):
    """``optax.tree_map_params`` initialises with a leafless stand-in, which a masked transform
    must pass through (an empty-leaves check): the mapped state keeps its masked leaves."""
    params = _tree(np.random.default_rng(3))
    mask = lambda p: {"blocks": True, "head": False, "bias": True}
    tx = og.ogpsa(2, mask=mask) if kind == "flat" else og.ogpsa_matrix(2, mask=mask)
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda x: x.shape, state)
    basis = mapped.basis[0] if kind == "flat" else mapped.basis
    assert basis["blocks"] == ((3, 10, 12) if kind == "flat" else (3, 10, 2))
    assert isinstance(basis["head"], optax.MaskedNode)
