"""Tests of the matrix-factored (GPM-style) transform and its basis estimators."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax.matrix import (
    MatrixOGPSAState,
    basis_nbytes,
    ogpsa_matrix,
    project_matrix,
    residual_max,
    resolve_dims,
)
from ogpsa_jax.matrix_basis import (
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)

RANK = 4
# Stacked (L=3, d_in=10, d_out=12) and plain (d_in=12, d_out=10) matrices: sharding-friendly
# sizes whose input and output dims differ, so a wrong transpose fails; plus leaves that must
# pass through (1-D bias, 2-D embedding).
SHAPES = {"blocks": {"w": (3, 10, 12)}, "head": (12, 10), "bias": (7,), "embed": (11, 5)}
SPECS = {"blocks": {"w": P(None, "x", "y")}, "head": P("y", "x"), "bias": P(), "embed": P()}


def _tree(rng, dtype=jnp.float32):
    return jax.tree.map(
        lambda s: jnp.asarray(rng.normal(size=s), dtype),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _orthonormal(rng, shape, cols):
    q = np.linalg.qr(rng.normal(size=shape[:-1] + (shape[-1], cols)))[0]
    return jnp.asarray(q, jnp.float32)


def _basis(rng, cols=3):
    return {
        "blocks": {"w": _orthonormal(rng, (3, 10), cols)},
        "head": _orthonormal(rng, (12,), cols),
        "bias": None,
        "embed": None,
    }


def _principal_cosines(a, b):
    """Cosines of the principal angles between span(a) and span(b) (float64)."""
    qa, qb = np.linalg.qr(np.asarray(a, np.float64))[0], np.linalg.qr(np.asarray(b, np.float64))[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


@pytest.fixture(scope="module")
def tx():
    return ogpsa_matrix(RANK)


@pytest.fixture(scope="module")
def jit_update(tx):
    return jax.jit(tx.update)


def test_state_layout_and_memory(tx):
    state = tx.init(_tree(np.random.default_rng(0)))
    assert isinstance(state, MatrixOGPSAState)
    assert state.basis["blocks"]["w"].shape == (3, 10, RANK)
    assert state.basis["head"].shape == (12, RANK)
    assert isinstance(state.basis["bias"], optax.MaskedNode)
    assert isinstance(state.basis["embed"], optax.MaskedNode)  # "embed" in the path
    assert basis_nbytes((state, optax.EmptyState())) == (3 * 10 + 12) * RANK * 4


def test_default_dims_on_decoder_layout():
    # Our decoder's layout: stacked (L, D) norms and (L, Q) biases must not be read as matrices.
    L, D, Q, F, V = 2, 5, 6, 7, 11
    params = {
        "embed_tokens": jnp.zeros((V, D)),
        "layers": {
            "attn_norm": jnp.zeros((L, D)),
            "q_proj": jnp.zeros((L, D, Q)),
            "q_bias": jnp.zeros((L, Q)),
            "o_proj": jnp.zeros((L, Q, D)),
            "down_proj": jnp.zeros((L, F, D)),
        },
        "final_norm": jnp.zeros(D),
        "lm_head": jnp.zeros((D, V)),
    }
    masked = lambda x: isinstance(x, optax.MaskedNode)
    basis = ogpsa_matrix(3).init(params).basis
    shapes = jax.tree.map(lambda v: "skip" if masked(v) else v.shape, basis, is_leaf=masked)
    assert shapes == {
        "embed_tokens": "skip",
        "layers": {
            "attn_norm": "skip",
            "q_proj": (L, D, 3),
            "q_bias": "skip",
            "o_proj": (L, Q, 3),
            "down_proj": (L, F, 3),
        },
        "final_norm": "skip",
        "lm_head": (D, 3),
    }


def test_update_is_orthogonal_to_protected_subspace(tx, jit_update):
    rng = np.random.default_rng(1)
    grads, basis = _tree(rng), _basis(rng)
    out, _ = jit_update(grads, tx.init(grads), basis=basis)
    for v, g, p in [
        (basis["head"], grads["head"], out["head"]),
        (basis["blocks"]["w"][1], grads["blocks"]["w"][1], out["blocks"]["w"][1]),
    ]:
        v64, g64, p64 = (np.asarray(a, np.float64) for a in (v, g, p))
        assert np.linalg.norm(v64.T @ p64) <= 1e-6 * np.linalg.norm(g64)
        # The removed part lies in span(V): exactly the float64 projection.
        np.testing.assert_allclose(p64, g64 - v64 @ (v64.T @ g64), atol=1e-5)
    # Pass-through leaves are untouched, bit for bit.
    np.testing.assert_array_equal(out["bias"], grads["bias"])
    np.testing.assert_array_equal(out["embed"], grads["embed"])


def test_residual_max_matches_numpy_and_vanishes_after_projection():
    rng = np.random.default_rng(7)
    grads, basis = _tree(rng), _basis(rng)
    g_w, v_w = (np.asarray(a, np.float64) for a in (grads["blocks"]["w"], basis["blocks"]["w"]))
    g_h, v_h = (np.asarray(a, np.float64) for a in (grads["head"], basis["head"]))
    want = max(np.abs(np.einsum("lir,lio->lro", v_w, g_w)).max(), np.abs(v_h.T @ g_h).max())
    got = float(jax.jit(residual_max)(grads, basis))
    assert abs(got - want) <= 1e-5 * want, (got, want)
    projected = jax.jit(project_matrix)(grads, basis)
    assert float(residual_max(projected, basis)) <= 1e-5 * want
    # no basis anywhere: 0
    assert float(residual_max(grads, jax.tree.map(lambda _: None, grads))) == 0.0


def test_idempotent_and_protected_outputs_unchanged(tx, jit_update):
    rng = np.random.default_rng(2)
    grads, params, basis = _tree(rng), _tree(rng), _basis(rng)
    state = tx.init(grads)
    once, state = jit_update(grads, state, basis=basis)
    twice, _ = jit_update(once, state)
    # f32 round-off of two projections of O(1) entries.
    chex.assert_trees_all_close(twice, once, atol=2e-6, rtol=0)
    # Inputs in the protected span see the same layer output after a step.
    x = np.asarray(rng.normal(size=(5, 3)) @ np.asarray(basis["head"]).T, np.float32)
    new_w = params["head"] - 0.1 * once["head"]
    np.testing.assert_allclose(x @ new_w, x @ params["head"], atol=1e-5)


def test_strength_and_bf16():
    rng = np.random.default_rng(3)
    grads, basis = _tree(rng), _basis(rng)
    full = project_matrix(grads, basis)
    soft = project_matrix(grads, basis, strength=0.3)
    removed = jax.tree.map(lambda g, p: g - p, grads, full)
    expect = jax.tree.map(lambda g, r: g - 0.3 * r, grads, removed)
    chex.assert_trees_all_close(soft, expect, atol=1e-6, rtol=0)
    chex.assert_trees_all_close(project_matrix(grads, basis, strength=0.0), grads, atol=0, rtol=0)
    g16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
    out16 = project_matrix(g16, basis)
    assert jax.tree.map(lambda a: a.dtype, out16) == jax.tree.map(lambda a: a.dtype, g16)
    # bf16 output of a float32 computation: bf16 rounding (2^-8 relative) of O(1) entries.
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), out16),
        project_matrix(jax.tree.map(lambda a: a.astype(jnp.float32), g16), basis),
        atol=3e-2,
        rtol=1e-2,
    )


def test_dims_and_mask_specs():
    rng = np.random.default_rng(4)
    params = {"w_t": jnp.asarray(rng.normal(size=(7, 5)), jnp.float32), "b": jnp.zeros(3)}
    # Input axis 1 (a torch-style (d_out, d_in) weight) given as a pytree.
    tx = ogpsa_matrix(2, dims={"w_t": 1, "b": None})
    state = tx.init(params)
    assert state.basis["w_t"].shape == (5, 2)
    v = _orthonormal(rng, (5,), 2)
    out, _ = tx.update(params, state, basis={"w_t": v, "b": None})
    np.testing.assert_allclose(np.asarray(out["w_t"]) @ np.asarray(v), 0.0, atol=1e-6)
    # The gradient estimator reads the same dims: here the row space of the (7, 5) matrix.
    est = matrix_basis_from_gradients([params], rank=2, dims={"w_t": 1, "b": None})
    top = np.linalg.svd(np.asarray(params["w_t"], np.float64))[2][:2].T
    np.testing.assert_allclose(_principal_cosines(top, est["w_t"]), 1.0, atol=1e-5)
    # Callable dims and a mask: the mask wins.
    tx_masked = ogpsa_matrix(
        2, dims=lambda path, leaf: 1 if leaf.ndim == 2 else None, mask={"w_t": False, "b": True}
    )
    assert isinstance(tx_masked.init(params).basis["w_t"], optax.MaskedNode)
    assert resolve_dims(params, lambda path, leaf: -1 if leaf.ndim == 2 else None) == [None, 1]


def test_bad_input_raises():
    rng = np.random.default_rng(5)
    grads = _tree(rng)
    tx = ogpsa_matrix(RANK)
    state = tx.init(grads)
    with pytest.raises(ValueError, match="rank"):
        ogpsa_matrix(0)
    with pytest.raises(ValueError, match="strength"):
        ogpsa_matrix(2, strength=1.5)
    with pytest.raises(ValueError, match="input axis"):
        ogpsa_matrix(2, dims={"w": 4}).init({"w": jnp.zeros((3, 5))})
    too_many = _basis(rng, cols=RANK + 1)
    with pytest.raises(ValueError, match="more than rank"):
        state.with_basis(too_many)
    bad_shape = _basis(rng)
    bad_shape["head"] = jnp.zeros((10, 2))
    with pytest.raises(ValueError, match="shape"):
        state.with_basis(bad_shape)
    skipped = _basis(rng)
    skipped["bias"] = jnp.zeros((7, 1))
    with pytest.raises(ValueError, match="skips"):
        state.with_basis(skipped)
    with pytest.raises(ValueError, match="energy"):
        matrix_basis_from_activations({"a": jnp.ones((4, 3))}, rank=2, energy=1.5)
    with pytest.raises(ValueError, match="non-empty"):
        matrix_basis_from_gradients([], rank=2)
    with pytest.raises(ValueError, match="shape"):
        matrix_basis_from_gradients([{"w": jnp.ones((3, 5))}, {"w": jnp.ones((5, 3))}], rank=2)
    with pytest.raises(ValueError, match="n_samples"):
        matrix_basis_from_activations({"a": jnp.ones(3)}, rank=2)


def test_padding_and_no_recompile(tx, jit_update):
    rng = np.random.default_rng(6)
    grads = _tree(rng)
    state = tx.init(grads).with_basis(_basis(rng, cols=2))
    w = np.asarray(state.basis["blocks"]["w"])
    np.testing.assert_array_equal(w[..., 2:], 0.0)  # padded with zero columns
    jit_update(grads, state)
    size = jit_update._cache_size()
    jit_update(_tree(rng), state.with_basis(_basis(rng, cols=3)))
    assert jit_update._cache_size() == size


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_sharded_equals_unsharded(tx, axis_type):
    rng = np.random.default_rng(7)
    grads, basis = _tree(rng), _basis(rng)
    ref, _ = tx.update(grads, tx.init(grads), basis=basis)
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(axis_type,) * 2)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    with jax.set_mesh(mesh):
        s_grads = jax.tree.map(put, grads, SPECS)
        state = jax.jit(tx.init)(s_grads).with_basis(basis)
        assert state.basis["blocks"]["w"].sharding.spec[:2] == (None, "x")
        out, new_state = jax.jit(tx.update)(s_grads, state)
    # Same f32 math, different reduction order across shards.
    chex.assert_trees_all_close(out, ref, atol=1e-6, rtol=1e-6)
    assert out["head"].sharding.spec == P("y", "x")
    assert new_state.basis["head"].sharding.spec[0] == "y"


def test_orbax_round_trip(tx, tmp_path):
    rng = np.random.default_rng(8)
    grads = _tree(rng)
    opt = optax.chain(tx, optax.adam(1e-3))
    state = opt.init(grads)
    state = (state[0].with_basis(_basis(rng)), state[1])
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "state", state)
        ckpt.wait_until_finished()
        target = jax.eval_shape(lambda: state)
        restored = ckpt.restore(tmp_path / "state", target)
    assert isinstance(restored[0], MatrixOGPSAState)
    chex.assert_trees_all_close(restored, state, atol=0, rtol=0)


def test_set_basis_through_chain():
    set_basis = pytest.importorskip("ogpsa_jax.transform").set_basis
    rng = np.random.default_rng(9)
    grads, basis = _tree(rng), _basis(rng)
    opt = optax.chain(ogpsa_matrix(RANK), optax.sgd(1.0))
    state = jax.jit(set_basis)(opt.init(grads), basis)
    updates, _ = opt.update(grads, state)
    direct = project_matrix(grads, basis)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda a: -a, direct), atol=1e-6, rtol=0)


def test_inject_hyperparams_strength():
    rng = np.random.default_rng(14)
    grads, basis = _tree(rng), _basis(rng)
    tx = optax.inject_hyperparams(ogpsa_matrix, static_args=("rank",))(rank=RANK, strength=1.0)
    state = tx.init(grads)
    state.hyperparams["strength"] = jnp.asarray(0.25)
    out, _ = jax.jit(tx.update)(grads, state, basis=basis)
    chex.assert_trees_all_close(out, project_matrix(grads, basis, strength=0.25), atol=1e-6, rtol=0)


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
                acts, rank=8, energy=energy, max_dense_dim=max_dense_dim, power_iters=3
            )["a"]
        )
        r = int(np.sum(np.linalg.norm(v, axis=0) > 0.5))
        assert r == min(int(np.sum(cum < energy)) + 1, 8), energy
    out = matrix_basis_from_activations(acts, rank=5, max_dense_dim=max_dense_dim, power_iters=3)
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
    v_a = matrix_basis_from_activations({"a": jnp.asarray(x_a, jnp.float32)}, rank=6)
    assert int(np.sum(np.linalg.norm(np.asarray(v_a["a"]), axis=0) > 0.5)) == 2  # data rank
    v_ab = np.asarray(
        matrix_basis_from_activations({"a": jnp.asarray(x_b, jnp.float32)}, rank=6, union_with=v_a)[
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
        {"a": jnp.asarray(x_a, jnp.float32)}, rank=6, energy=0.999, union_with=v_a
    )
    chex.assert_trees_all_close(same, v_a, atol=1e-6, rtol=0)


@pytest.mark.parametrize("max_dense_dim", [2048, 4])
def test_gradient_basis_matches_numpy(max_dense_dim):
    rng = np.random.default_rng(12)
    grads = [
        {"w": jnp.asarray(rng.normal(size=(2, 13, 5)), jnp.float32), "b": jnp.ones(5)}
        for _ in range(3)
    ]
    out = matrix_basis_from_gradients(grads, rank=6, max_dense_dim=max_dense_dim, power_iters=4)
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
        grads, rank=6, energy=energy, max_dense_dim=max_dense_dim, power_iters=4
    )
    assert int(np.sum(np.linalg.norm(np.asarray(out["w"][0]), axis=0) > 0.5)) == 4


def test_collect_inputs_and_estimator_compile_once():
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
    from ogpsa_jax import matrix_basis

    matrix_basis_from_activations(acts, rank=3)
    size = matrix_basis._activation_leaf._cache_size()
    matrix_basis_from_activations(jax.tree.map(lambda a: a + 1.0, acts), rank=3)
    assert matrix_basis._activation_leaf._cache_size() == size


def test_permuted_digits_smoke():
    """One seed, few steps, two methods: the experiment runs and its records are consistent."""
    import importlib.util
    import pathlib
    import sys

    path = pathlib.Path(__file__).parents[1] / "experiments" / "permuted_digits.py"
    spec = importlib.util.spec_from_file_location("permuted_digits", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    cfg = mod.Config(
        seeds=(0,), methods=("naive", "matrix_activation"), hidden=32, steps_a=40, steps_b=40
    )
    records = mod.run(cfg)
    assert [r["method"] for r in records] == ["naive", "matrix_activation"]
    for r in records:
        assert 0.0 <= r["old_acc"] <= 1.0 and 0.0 <= r["new_acc"] <= 1.0
        assert r["acc"] == pytest.approx((r["old_acc"] + r["new_acc"]) / 2)
    # Both start task B from the same task-A model, so BWT differences equal old-acc ones.
    diff_bwt = records[1]["bwt"] - records[0]["bwt"]
    assert diff_bwt == pytest.approx(records[1]["old_acc"] - records[0]["old_acc"], abs=1e-9)
    assert "| matrix_activation |" in mod.table(records)
    with pytest.raises(ValueError, match="unknown methods"):
        mod.run(mod.Config(methods=("bogus",)))
