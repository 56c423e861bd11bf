"""Tests of the matrix (input-space) basis estimators (ogpsa_jax/bases/matrix.py, _subspace.py)
against float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ogpsa_jax.bases import (
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)


def _principal_cosines(a, b):
    """Cosines of the principal angles between span(a) and span(b) (float64)."""
    qa, qb = np.linalg.qr(np.asarray(a, np.float64))[0], np.linalg.qr(np.asarray(b, np.float64))[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def _spectrum_matrix(rng, rows, cols, svals):
    u = np.linalg.qr(rng.normal(size=(rows, len(svals))))[0]
    v = np.linalg.qr(rng.normal(size=(cols, len(svals))))[0]
    return (u * svals) @ v.T


@pytest.mark.parametrize("max_dense_dim", [2048, 4])  # exact d_in x d_in path; randomized path
def test_activation_basis_matches_numpy(max_dense_dim):
    rng = np.random.default_rng(10)
    # Well separated singular values so every energy threshold below is unambiguous.
    x = _spectrum_matrix(rng, 41, 13, np.geomspace(20.0, 0.05, 9))
    s2 = np.linalg.svd(x, compute_uv=False) ** 2
    cum = np.cumsum(s2) / s2.sum()
    acts = {"a": jnp.asarray(x, jnp.float32), "skip": None}
    for energy in (0.5, 0.9, 0.99, 0.9999):
        v = np.asarray(
            matrix_basis_from_activations(
                acts, k=8, energy=energy, max_dense_dim=max_dense_dim, power_iters=3
            )["a"]
        )
        r = int(np.sum(np.linalg.norm(v, axis=0) > 0.5))
        assert r == min(int(np.sum(cum < energy)) + 1, 8), energy
    out = matrix_basis_from_activations(acts, k=5, max_dense_dim=max_dense_dim, power_iters=3)
    assert isinstance(out["skip"], optax.MaskedNode)
    v = np.asarray(out["a"])
    np.testing.assert_allclose(v.T @ v, np.eye(5), atol=1e-5)  # f32 orthonormality
    top = np.linalg.svd(x)[2][:5].T
    # Principal angles ~0: all cosines 1 to f32 accuracy.
    np.testing.assert_allclose(_principal_cosines(top, v), 1.0, atol=1e-5)


def test_activation_union_accumulates():
    rng = np.random.default_rng(11)
    x_a = _spectrum_matrix(rng, 30, 11, np.array([5.0, 3.0]))
    x_b = _spectrum_matrix(rng, 30, 11, np.array([4.0, 2.0, 1.0]))
    v_a = matrix_basis_from_activations({"a": jnp.asarray(x_a, jnp.float32)}, k=6)
    assert int(np.sum(np.linalg.norm(np.asarray(v_a["a"]), axis=0) > 0.5)) == 2  # data rank
    v_ab = np.asarray(
        matrix_basis_from_activations({"a": jnp.asarray(x_b, jnp.float32)}, k=6, union_with=v_a)[
            "a"
        ]
    )
    np.testing.assert_allclose(v_ab[:, :2], np.asarray(v_a["a"])[:, :2], atol=1e-6)  # kept
    keep = np.linalg.norm(v_ab, axis=0) > 0.5
    np.testing.assert_allclose(v_ab[:, keep].T @ v_ab[:, keep], np.eye(keep.sum()), atol=1e-5)
    both = np.concatenate([np.linalg.svd(x_a)[2][:2], np.linalg.svd(x_b)[2][:3]]).T
    assert keep.sum() == np.linalg.matrix_rank(both)
    np.testing.assert_allclose(_principal_cosines(both, v_ab[:, keep]), 1.0, atol=1e-5)
    # GPM's threshold: old basis already holds >= 99.9% of x_a's energy: nothing is added.
    same = matrix_basis_from_activations(
        {"a": jnp.asarray(x_a, jnp.float32)}, k=6, energy=0.999, union_with=v_a
    )
    chex.assert_trees_all_close(same, v_a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_dense_dim", [2048, 4])
def test_gradient_basis_matches_numpy(max_dense_dim):
    rng = np.random.default_rng(12)
    grads = [
        {"w": jnp.asarray(rng.normal(size=(2, 13, 5)), jnp.float32), "b": jnp.ones(5)}
        for _ in range(3)
    ]
    out = matrix_basis_from_gradients(grads, k=6, max_dense_dim=max_dense_dim, power_iters=4)
    assert isinstance(out["b"], optax.MaskedNode)
    for layer in range(2):
        m = np.concatenate([np.asarray(g["w"][layer], np.float64) for g in grads], axis=1)
        top = np.linalg.svd(m)[0][:, :6]
        v = np.asarray(out["w"][layer])
        np.testing.assert_allclose(v.T @ v, np.eye(6), atol=1e-5)
        np.testing.assert_allclose(_principal_cosines(top, v), 1.0, atol=1e-4)
    s2 = (
        np.linalg.svd(np.concatenate([np.asarray(g["w"][0]) for g in grads], 1), compute_uv=False)
        ** 2
    )
    cum = np.cumsum(s2) / s2.sum()
    energy = float((cum[2] + cum[3]) / 2)  # midway between two cumulative ratios: r = 4
    out = matrix_basis_from_gradients(
        grads, k=6, energy=energy, max_dense_dim=max_dense_dim, power_iters=4
    )
    assert int(np.sum(np.linalg.norm(np.asarray(out["w"][0]), axis=0) > 0.5)) == 4


def test_collect_inputs_and_estimator_compile_once(backend_compiles):
    rng = np.random.default_rng(13)
    w1 = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)

    def capture(batch):  # a 2-layer MLP exposing each linear layer's input
        return {"w1": batch, "w2": jax.nn.relu(batch @ w1), "b": None}

    batches = [jnp.asarray(rng.normal(size=(4, 3, 7)), jnp.float32) for _ in range(3)]
    acts = collect_inputs(capture, batches)
    assert acts["w1"].shape == (36, 7) and acts["w2"].shape == (36, 5) and acts["b"] is None
    np.testing.assert_allclose(acts["w1"][12:24], np.asarray(batches[1]).reshape(12, 7))
    sub = collect_inputs(capture, batches, rows_per_batch=5)
    assert sub["w1"].shape == (15, 7)
    other = jax.block_until_ready(jax.tree.map(lambda a: a + 1.0, acts))
    before = len(backend_compiles)
    matrix_basis_from_activations(acts, k=3)
    assert len(backend_compiles) > before  # the listener sees the first compilations
    compiled = len(backend_compiles)
    matrix_basis_from_activations(other, k=3)  # new values, same shapes
    assert len(backend_compiles) == compiled


def test_bad_input_raises():
    with pytest.raises(ValueError, match="energy"):
        matrix_basis_from_activations({"a": jnp.ones((4, 3))}, k=2, energy=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        matrix_basis_from_gradients([], k=2)
    with pytest.raises(ValueError, match="shape"):
        matrix_basis_from_gradients([{"w": jnp.ones((3, 5))}, {"w": jnp.ones((5, 3))}], k=2)
    with pytest.raises(ValueError, match="n_samples"):
        matrix_basis_from_activations({"a": jnp.ones(3)}, k=2)
    with pytest.raises(ValueError, match="k must be"):
        matrix_basis_from_gradients([{"w": jnp.ones((3, 5))}], k=0)
