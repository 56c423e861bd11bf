"""Tests of the matrix-factored (GPM-style) transform (ogpsa_jax/projection/matrix.py, dims.py).

The estimators of its basis are tested in test_bases_matrix.py.
"""

import contextlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import ogpsa_jax as og
from ogpsa_jax.bases import matrix_basis_from_gradients
from ogpsa_jax.projection import (
    MatrixOGPSAState,
    basis_nbytes,
    ogpsa_matrix,
    ogpsa_matrix_adamw,
    project_matrix,
    residual_max_matrix,
    resolve_dims,
    set_basis,
)

K = 4
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
    return ogpsa_matrix(K)


@pytest.fixture(scope="module")
def jit_update(tx):
    return jax.jit(tx.update)


def test_state_layout_and_memory(tx):
    state = tx.init(_tree(np.random.default_rng(0)))
    assert isinstance(state, MatrixOGPSAState)
    assert state.basis["blocks"]["w"].shape == (3, 10, K)
    assert state.basis["head"].shape == (12, K)
    assert isinstance(state.basis["bias"], optax.MaskedNode)
    assert isinstance(state.basis["embed"], optax.MaskedNode)  # "embed" in the path
    assert basis_nbytes((state, optax.EmptyState())) == (3 * 10 + 12) * K * 4


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
    got = float(jax.jit(residual_max_matrix)(grads, basis))
    assert abs(got - want) <= 1e-5 * want, (got, want)
    projected = jax.jit(project_matrix)(grads, basis)
    assert float(residual_max_matrix(projected, basis)) <= 1e-5 * want
    # no basis anywhere: 0
    assert float(residual_max_matrix(grads, jax.tree.map(lambda _: None, grads))) == 0.0


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
    est = matrix_basis_from_gradients([params], k=2, dims={"w_t": 1, "b": None})
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
    tx = ogpsa_matrix(K)
    state = tx.init(grads)
    with pytest.raises(ValueError, match="k must be"):
        ogpsa_matrix(0)
    with pytest.raises(ValueError, match="strength"):
        ogpsa_matrix(2, strength=1.5)
    with pytest.raises(ValueError, match="input axis"):
        ogpsa_matrix(2, dims={"w": 4}).init({"w": jnp.zeros((3, 5))})
    too_many = _basis(rng, cols=K + 1)
    with pytest.raises(ValueError, match="more than k"):
        state.with_basis(too_many)
    bad_shape = _basis(rng)
    bad_shape["head"] = jnp.zeros((10, 2))
    with pytest.raises(ValueError, match="shape"):
        state.with_basis(bad_shape)
    skipped = _basis(rng)
    skipped["bias"] = jnp.zeros((7, 1))
    with pytest.raises(ValueError, match="skips"):
        state.with_basis(skipped)
    with pytest.raises(ValueError, match="floating dtype"):
        ogpsa_matrix(2, basis_dtype=jnp.int32)
    with pytest.raises(ValueError, match="shape"):
        project_matrix(grads, {**_basis(rng), "head": jnp.zeros((10, 2))})


def test_padding_and_no_recompile(backend_compiles):
    rng = np.random.default_rng(6)
    tx = ogpsa_matrix(K)  # a fresh transform: its first jitted update compiles
    update = jax.jit(tx.update)
    grads = _tree(rng)
    state = tx.init(grads).with_basis(_basis(rng, cols=2))
    w = np.asarray(state.basis["blocks"]["w"])
    np.testing.assert_array_equal(w[..., 2:], 0.0)  # padded with zero columns
    other = jax.block_until_ready((_tree(rng), state.with_basis(_basis(rng, cols=3))))
    before = len(backend_compiles)
    update(grads, state)
    assert len(backend_compiles) > before  # the listener sees the first compilation
    compiled = len(backend_compiles)
    update(*other)  # new gradients, a new basis of another width: the same program
    assert len(backend_compiles) == compiled


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
    rng = np.random.default_rng(9)
    grads, basis = _tree(rng), _basis(rng)
    opt = optax.chain(ogpsa_matrix(K), optax.sgd(1.0))
    state = jax.jit(set_basis)(opt.init(grads), basis)
    updates, _ = opt.update(grads, state)
    direct = project_matrix(grads, basis)
    chex.assert_trees_all_close(updates, jax.tree.map(lambda a: -a, direct), atol=1e-6, rtol=0)


def test_inject_hyperparams_strength():
    rng = np.random.default_rng(14)
    grads, basis = _tree(rng), _basis(rng)
    tx = optax.inject_hyperparams(ogpsa_matrix, static_args=("k",))(k=K, strength=1.0)
    state = tx.init(grads)
    state.hyperparams["strength"] = jnp.asarray(0.25)
    out, _ = jax.jit(tx.update)(grads, state, basis=basis)
    chex.assert_trees_all_close(out, project_matrix(grads, basis, strength=0.25), atol=1e-6, rtol=0)


def _put_on_mesh(trees, mode):
    """(trees placed with SPECS on a 2x4 mesh of the given axis type, the mesh), or (trees,
    None) for "jit"."""
    if mode == "jit":
        return trees, None
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    mesh = jax.make_mesh((2, 4), ("x", "y"), axis_types=(axis_type,) * 2)
    put = lambda a, s: jax.device_put(a, NamedSharding(mesh, s))
    return tuple(jax.tree.map(put, t, SPECS) for t in trees), mesh


@pytest.mark.parametrize("mode", ["jit", "auto", "explicit"])
def test_matrix_adamw_equals_manual_chain(mode):
    """``ogpsa_matrix_adamw`` = project by hand, then clip + AdamW, on one device and on a 2x4
    mesh (the manual reference runs unsharded)."""
    rng = np.random.default_rng(15)
    params, grads, basis = _tree(rng), _tree(rng), _basis(rng)
    tx = ogpsa_matrix_adamw(1e-2, K, max_grad_norm=1.0, weight_decay=0.01)
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    ref_state = ref_tx.init(params)
    refs = []
    for _ in range(2):
        ref, ref_state = ref_tx.update(project_matrix(grads, basis), ref_state, params)
        refs.append(ref)
    (s_params, s_grads), mesh = _put_on_mesh((params, grads), mode)
    with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        state0 = set_basis(jax.jit(tx.init)(s_params), basis)
        step = jax.jit(lambda g, s, p: tx.update(g, s, p))
        upd1, state1 = step(s_grads, state0, s_params)
        upd2, state2 = step(s_grads, state1, s_params)
    assert len(state0) == 3  # projection, clip, adamw
    assert isinstance(state0[0], MatrixOGPSAState)
    chex.assert_trees_all_equal_structs(state2, state0)
    chex.assert_trees_all_equal_shapes_and_dtypes(state2, state0)
    # float32 op ordering (and cross-shard reduction order) only: 1e-6
    chex.assert_trees_all_close(upd1, refs[0], rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(upd2, refs[1], rtol=1e-6, atol=1e-6)
    if mesh is not None:
        assert upd2["head"].sharding.spec == P("y", "x")
        assert state2[0].basis["head"].sharding.spec[0] == "y"


def test_conflict_only_is_a_named_error():
    """Accepted by both transforms' signatures; True is a ValueError for the matrix one (an
    input-space direction has no sign), also through the alias and inject_hyperparams."""
    params = _tree(np.random.default_rng(16))
    ogpsa_matrix(K, conflict_only=False).init(params)  # False is accepted
    ogpsa_matrix_adamw(1e-3, K, conflict_only=False).init(params)
    for make in (
        lambda: ogpsa_matrix(K, conflict_only=True),
        lambda: ogpsa_matrix_adamw(1e-3, K, conflict_only=True),
        lambda: optax.inject_hyperparams(ogpsa_matrix, static_args=("k",))(
            k=K, conflict_only=True
        ).init(params),
    ):
        with pytest.raises(ValueError, match="conflict_only=True is not supported by the matrix"):
            make()


def test_matrix_alias_under_inject_hyperparams_and_masked():
    rng = np.random.default_rng(17)
    params, grads, basis = _tree(rng), _tree(rng), _basis(rng)
    plain = ogpsa_matrix_adamw(1e-2, K)
    want, _ = plain.update(grads, set_basis(plain.init(params), basis), params)
    injected = optax.inject_hyperparams(ogpsa_matrix_adamw, static_args=("k",))(
        learning_rate=1e-2, k=K
    )
    state = set_basis(injected.init(params), basis)
    got, new_state = jax.jit(injected.update)(grads, state, params)
    # the same ops, jitted vs eager: 1e-6
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(og.get_basis(new_state), og.get_basis(state))
    state.hyperparams["learning_rate"] = jnp.asarray(5e-3)  # the injected rate drives the step
    half, _ = jax.jit(injected.update)(grads, state, params)
    chex.assert_trees_all_close(half, jax.tree.map(lambda x: x / 2, want), rtol=1e-6, atol=1e-6)
    # masked: the alias runs on the masked-in leaves only, the rest pass through unchanged
    mask = {"blocks": {"w": True}, "head": False, "bias": True, "embed": False}
    masked = optax.masked(ogpsa_matrix_adamw(1e-2, K), mask)
    m_state = set_basis(masked.init(params), {**basis, "head": None})
    assert basis_nbytes(m_state) == 3 * 10 * K * 4  # only the stacked blocks carry a basis
    got_m, _ = jax.jit(masked.update)(grads, m_state, params)
    sub = lambda t: {"blocks": t["blocks"], "bias": t["bias"]}
    sub_tx = ogpsa_matrix_adamw(1e-2, K)
    sub_want, _ = sub_tx.update(
        sub(grads), set_basis(sub_tx.init(sub(params)), sub(basis)), sub(params)
    )
    chex.assert_trees_all_close(sub(got_m), sub_want, rtol=1e-6, atol=1e-6)  # as above
    chex.assert_trees_all_equal(got_m["head"], grads["head"])
    chex.assert_trees_all_equal(got_m["embed"], grads["embed"])


def test_tree_map_params_with_a_mask():
    """``optax.tree_map_params`` initialises with a leafless stand-in: a masked transform must
    not resolve its mask there (an empty-leaves check, not a private class name)."""
    params = _tree(np.random.default_rng(18))
    tx = ogpsa_matrix(K, mask=lambda p: jax.tree.map(lambda _: True, p))
    state = tx.init(params)
    mapped = optax.tree_map_params(tx, lambda v: v.shape, state)
    assert mapped.basis["head"] == (12, K)
    assert isinstance(mapped.basis["bias"], optax.MaskedNode)
