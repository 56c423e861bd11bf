"""Contract tests for the flat OGPSA transform (ogpsa_jax/projection/flat.py, _kernels.py).

Every invariant runs under jax.jit on one device ("jit") and on a 2x4 mesh of the 8 virtual CPU
devices with Auto ("auto") and Explicit ("explicit") axes. Leaf shapes are odd/prime where not
sharded, so a wrong transpose or reshape cannot pass.
"""

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
from ogpsa_jax.projection import residual_max_flat

# Leaf shapes with their 2x4-mesh specs: sharded dims divide, the others are odd/prime.
SPECS = {
    "w": ((8, 13), P("model", None)),
    "e": ((7, 13), P()),
    "b": ((5,), P()),
    "c": {"t": ((2, 11, 3), P("data", None, None))},
}
_is_spec = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], P)
SHAPES = jax.tree.map(lambda s: s[0], SPECS, is_leaf=_is_spec)
PSPECS = jax.tree.map(lambda s: s[1], SPECS, is_leaf=_is_spec)
MODES = ["jit", "auto", "explicit"]
K = 2


def _mesh(mode):
    if mode == "jit":
        return None
    axis_type = AxisType.Auto if mode == "auto" else AxisType.Explicit
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _put(tree, mesh):
    """Places a SHAPES-structured tree (or each tree of a tuple) with the PSPECS shardings."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)
    if isinstance(tree, tuple):
        return tuple(_put(t, mesh) for t in tree)
    return jax.tree.map(
        lambda x, s: jax.device_put(jnp.asarray(x), NamedSharding(mesh, s)), tree, PSPECS
    )


def _ctx(mesh):
    return jax.set_mesh(mesh) if mesh is not None else _Null()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _randn(rng, dtype=np.float32):
    return jax.tree.map(lambda s: rng.standard_normal(s).astype(dtype), SHAPES, is_leaf=_is_tuple)


_is_tuple = lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _orthonormal_basis(rng, k=K, zero_leaf="b"):
    """k trees, per leaf orthonormal (float64 QR); the last direction of `zero_leaf` is zero."""
    leaves, tree_def = jax.tree.flatten(SHAPES, is_leaf=_is_tuple)
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree.flatten_with_path(SHAPES, _is_tuple)[0]]
    per_leaf = []
    for name, shape in zip(names, leaves, strict=True):
        q, _ = np.linalg.qr(rng.standard_normal((int(np.prod(shape)), k)))
        dirs = [q[:, i].reshape(shape) for i in range(k)]
        if zero_leaf and name == f"['{zero_leaf}']":
            dirs[-1] = np.zeros(shape)
        per_leaf.append(dirs)
    return tuple(
        jax.tree.unflatten(tree_def, [d[i].astype(np.float32) for d in per_leaf]) for i in range(k)
    )


def _np_project(g, basis, strength=1.0, conflict_only=False):
    """Float64 NumPy reference: g - strength * sum_i c_i u_i, c_i = <g, u_i> (min(c_i, 0))."""

    def leaf(g_leaf, *us):
        g64 = np.asarray(g_leaf, np.float64)
        out = g64.copy()
        for u in us:
            u64 = np.asarray(u, np.float64)
            c = float(np.sum(g64 * u64))
            if conflict_only:
                c = min(c, 0.0)
            out -= strength * c * u64
        return out

    return jax.tree.map(leaf, g, *basis)


def _shardings_equal(a, b):
    def same(x, y):
        assert x.sharding.is_equivalent_to(y.sharding, x.ndim), (x.sharding, y.sharding)

    jax.tree.map(same, a, b)


_project_jit = jax.jit(og.project, static_argnames=("conflict_only",))


# ---------------------------------------------------------------- projection invariants


@pytest.mark.parametrize("mode", MODES)
def test_projection_invariants(mode):
    rng = np.random.default_rng(0)
    mesh = _mesh(mode)
    g_np, basis_np = _randn(rng), _orthonormal_basis(rng)
    g, basis = _put(g_np, mesh), _put(basis_np, mesh)
    with _ctx(mesh):
        pg = _project_jit(g, basis)
        ppg = _project_jit(pg, basis)
        zero = tuple(jax.tree.map(jnp.zeros_like, b) for b in basis)
        ident = _project_jit(g, zero)
    # Equality with the float64 NumPy reference: float32 sums over <= 91 elements.
    chex.assert_trees_all_close(pg, _np_project(g_np, basis_np), rtol=1e-5, atol=1e-5)
    for g_l, p_l, pp_l, *us in zip(*map(jax.tree.leaves, (g_np, pg, ppg) + basis_np), strict=True):
        g_norm = np.linalg.norm(np.asarray(g_l, np.float64))
        p64 = np.asarray(p_l, np.float64)
        for u in us:  # orthogonality
            assert abs(np.sum(p64 * u)) <= 1e-6 * g_norm
        assert np.linalg.norm(p64) <= g_norm * (1 + 1e-6)  # norm never grows
        # idempotence: a second projection removes only float32 rounding
        np.testing.assert_allclose(pp_l, p_l, rtol=0, atol=1e-6 * g_norm)
    chex.assert_trees_all_equal(ident, g)  # all-zero basis: exact identity
    if mesh is not None:
        _shardings_equal(pg, g)
        # sharded result equals the unsharded one (reduction order may differ: 1e-6)
        chex.assert_trees_all_close(pg, _project_jit(g_np, basis_np), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "mode,strength,conflict_only",
    [("jit", s, c) for s in (1.0, 0.4) for c in (False, True)]
    + [("auto", 0.4, True), ("explicit", 0.4, True)],
)
def test_soft_and_conflict_only(mode, strength, conflict_only):
    rng = np.random.default_rng(1)
    mesh = _mesh(mode)
    basis = _orthonormal_basis(rng, zero_leaf=None)
    # g = (part orthogonal to the basis) + 2 u1 - 1.5 u2: u1 agrees, u2 conflicts.
    r = _randn(rng)
    ortho = jax.tree.map(np.asarray, _np_project(r, basis))
    g = jax.tree.map(lambda o, u1, u2: (o + 2 * u1 - 1.5 * u2).astype(np.float32), ortho, *basis)
    with _ctx(mesh):
        out = _project_jit(
            _put(g, mesh), _put(basis, mesh), strength=strength, conflict_only=conflict_only
        )
    chex.assert_trees_all_close(
        out, _np_project(g, basis, strength, conflict_only), rtol=1e-5, atol=1e-5
    )
    for o, u1, u2 in zip(*map(jax.tree.leaves, (out, *basis)), strict=True):
        c1, c2 = float(jnp.sum(o * u1)), float(jnp.sum(o * u2))
        # agreeing direction kept in conflict-only mode, else scaled by (1 - strength)
        np.testing.assert_allclose(c1, 2.0 if conflict_only else 2.0 * (1 - strength), atol=1e-5)
        np.testing.assert_allclose(c2, -1.5 * (1 - strength), atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_bf16_in_bf16_out(mode):
    rng = np.random.default_rng(2)
    mesh = _mesh(mode)
    g_np, basis_np = _randn(rng), _orthonormal_basis(rng)
    g = _put(jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), g_np), mesh)
    basis = _put(basis_np, mesh)
    with _ctx(mesh):
        out = _project_jit(g, basis)
    chex.assert_trees_all_equal_dtypes(out, g)
    ref = _np_project(jax.tree.map(lambda x: np.asarray(x, np.float32), g), basis_np)
    # one bf16 rounding of the output (eps 2^-8 relative) on values of size <= ~4
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), out), ref, rtol=1e-2, atol=3e-2
    )
    # bf16 basis storage: state dtype bf16, output still bf16
    tx = og.ogpsa(K, basis_dtype=jnp.bfloat16)
    with _ctx(mesh):
        state = jax.jit(tx.init)(g)
        out2, state = jax.jit(tx.update)(g, state, basis=basis)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(state))
    chex.assert_trees_all_equal_dtypes(out2, g)


ROW_SPECS = {  # last axes that are multiples of 64 take the CPU row-blocked coefficient path
    "rows": ((8, 192), P("model", None)),
    "rows_split_last": ((6, 256), P(None, "model")),
    "rows_3d": ((2, 3, 64), P("data", None, None)),
    "vec": ((128,), P("model")),
    "odd": ((5, 7), P()),  # not a multiple: one reduction over the whole leaf
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_one_pass_coefficients_match_float64(mode, k):
    """All k coefficients come from one variadic reduction (on CPU over rows of 64 along the
    last axis, sharded or not, at most 4 per reduction: k = 6 runs as 3 + 3): the projection
    equals the float64 NumPy one to 1e-5 and leaves |<P(g), u_i>| <= 1e-6 ||g||;
    `residual_max_flat` agrees with NumPy. That the CPU really runs the row view is read from
    the compiled HLO text: the view changes only speed, so no behavioural check can show it."""
    rng = np.random.default_rng(7 + k)
    shapes = {name: s for name, (s, _) in ROW_SPECS.items()}
    g = {n: rng.standard_normal(s).astype(np.float32) + 0.5 for n, s in shapes.items()}
    basis = []
    qs = {n: np.linalg.qr(rng.standard_normal((int(np.prod(s)), k)))[0] for n, s in shapes.items()}
    for i in range(k):
        basis.append({n: qs[n][:, i].reshape(s).astype(np.float32) for n, s in shapes.items()})
    basis = tuple(basis)
    ref = _np_project(g, basis)
    mesh = _mesh(mode)
    if mesh is not None:
        put = lambda t: {  # noqa: E731
            n: jax.device_put(t[n], NamedSharding(mesh, ROW_SPECS[n][1])) for n in t
        }
        g, basis = put(g), tuple(put(b) for b in basis)
    with _ctx(mesh):
        out = _project_jit(g, basis)
        raw_residual = float(jax.jit(residual_max_flat)(g, basis))
        residual = float(jax.jit(residual_max_flat)(out, basis))
    chex.assert_trees_all_close(out, ref, rtol=1e-5, atol=1e-5)
    g_norm = max(float(np.linalg.norm(np.asarray(x))) for x in jax.tree.leaves(g))
    assert residual <= 1e-6 * g_norm, (residual, g_norm)
    want = max(
        abs(float(np.sum(np.asarray(g[n], np.float64) * np.asarray(b[n], np.float64))))
        for b in basis
        for n in shapes
    )
    assert raw_residual == pytest.approx(want, rel=1e-5)
    if mode == "jit":  # the row view really is what the CPU runs
        text = _project_jit.lower(g, basis).compile().as_text()
        assert "[8,3,64]" in text and "[6,4,64]" in text, text


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_gpu_tpu_lowering_reads_each_leaf_once_for_all_coefficients(platform):
    """Lowered for GPU / TPU (``jax.export``, no device needed), each leaf's k coefficients are
    one variadic reduction over the whole leaf (no row view, which would relayout a TPU array);
    that branch's numerics are the odd-leaf case of the test above. A module exported for both
    that platform and CPU runs here and equals the float64 projection. The lowering is read as
    text: with no GPU/TPU here, nothing else shows which branch those platforms compile."""
    rng = np.random.default_rng(11)
    shapes = {"w": (8, 128), "b": (5,), "t": (2, 3, 64)}
    g = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in shapes.items()}
    basis = og.capability_basis(
        [jax.tree.map(lambda x: x + rng.standard_normal(x.shape), g) for _ in range(3)]
    )
    exported = jax.export.export(_project_jit, platforms=[platform, "cpu"])(g, basis)
    text = jax.export.export(_project_jit, platforms=[platform])(g, basis).mlir_module()
    reductions = [line for line in text.splitlines() if "stablehlo.reduce(" in line]
    assert len(reductions) == len(shapes), reductions
    for line, shape in zip(reductions, [shapes[n] for n in sorted(shapes)], strict=True):
        operand = f"tensor<{'x'.join(map(str, shape))}xf32>"
        assert line.count(operand) == 3 and line.count("-> (tensor<f32>, ") == 1, line
    ref = _np_project(g, basis)
    chex.assert_trees_all_close(exported.call(g, basis), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("shape", [(64, 96), (64, 128)])  # whole-leaf and CPU row-view paths
def test_compiled_projection_is_in_place_and_never_widens_g(dtype, shape):
    """The compiled projection with a donated gradient writes into that buffer and never
    materialises a copy of g, nor a float32 copy of a bf16 g (the layouts the barrier in
    ``_kernels.fence`` keeps XLA:CPU from; benchmarks/projection.py times them). Read from the
    compiled program's memory analysis: every output byte aliases the donated gradient, and the
    temporaries (the coefficients) are smaller than either gradient leaf."""
    g = {"w": jnp.ones(shape, dtype), "b": jnp.ones((16 * shape[-1],), dtype)}
    basis = tuple(jax.tree.map(lambda x: jnp.full(x.shape, 0.01, jnp.float32), g) for _ in range(2))
    memory = jax.jit(og.project, donate_argnums=0).lower(g, basis).compile().memory_analysis()
    g_bytes = sum(x.nbytes for x in jax.tree.leaves(g))
    assert memory.alias_size_in_bytes == g_bytes, memory  # written in place
    assert memory.temp_size_in_bytes < g["b"].nbytes, memory  # no copy, no float32 copy
    out = jax.jit(og.project)(g, basis)
    ref = _np_project(
        jax.tree.map(lambda x: np.asarray(x, np.float32), g),
        jax.tree.map(lambda x: np.asarray(x, np.float64), basis),
    )
    chex.assert_trees_all_close(
        jax.tree.map(lambda x: x.astype(jnp.float32), out), ref, rtol=1e-2, atol=1e-2
    )


# ---------------------------------------------------------------- the transform in a training step


@pytest.mark.parametrize("mode", MODES)
def test_adamw_step_stable_and_matches_manual_chain(mode):
    rng = np.random.default_rng(3)
    mesh = _mesh(mode)
    params = _put(_randn(rng), mesh)
    grads = [_put(_randn(rng), mesh) for _ in range(2)]
    bases = [_put(_orthonormal_basis(rng), mesh) for _ in range(2)]
    tx = og.ogpsa_adamw(1e-2, K, max_grad_norm=1.0, weight_decay=0.01)
    ref_tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.01))
    traces = []

    @jax.jit
    def step(g, state, p, basis):
        traces.append(1)
        return tx.update(g, state, p, basis=basis)

    with _ctx(mesh):
        state0 = jax.jit(tx.init)(params)
        # the zero basis starts sharded like the parameters
        _shardings_equal(og.get_basis(state0)[0], params)
        upd1, state1 = step(grads[0], state0, params, bases[0])
        upd2, state2 = step(grads[1], state1, params, bases[1])
        ref_state = ref_tx.init(params)
        ref1, ref_state = ref_tx.update(og.project(grads[0], bases[0]), ref_state, params)
    assert len(traces) == 1  # no recompilation on the second call
    for s in (state1, state2):
        chex.assert_trees_all_equal_structs(s, state0)
        chex.assert_trees_all_equal_shapes_and_dtypes(s, state0)
        _shardings_equal(s[0], state0[0])  # the OGPSA state keeps its shardings from init on
    # On an Auto mesh, optax.adamw's jitted init replicates its zero moments (GSPMD has nothing
    # to propagate from), so the whole state is compared from the first update on.
    _shardings_equal(state2, state1 if mode == "auto" else state0)
    chex.assert_trees_all_close(og.get_basis(state2), bases[1], rtol=0, atol=0)
    # same update as projecting by hand then clip + adamw (float32 ordering only: 1e-6)
    chex.assert_trees_all_close(upd1, ref1, rtol=1e-6, atol=1e-6)
    _shardings_equal(upd2, params)


def test_update_without_basis_uses_stored_basis_and_lax_scan():
    rng = np.random.default_rng(4)
    g, basis = _randn(rng), _orthonormal_basis(rng)
    tx = og.ogpsa(K)
    state = og.set_basis(tx.init(g), basis)

    def body(state, g):
        out, state = tx.update(g, state)
        return state, out

    gs = jax.tree.map(lambda x: jnp.stack([x, 2 * x, -x]), g)
    state_out, outs = jax.jit(lambda s, gs: jax.lax.scan(body, s, gs))(state, gs)
    expected = jax.tree.map(np.asarray, _np_project(g, basis))
    for i, scale in enumerate([1, 2, -1]):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x, i=i: x[i], outs),
            jax.tree.map(lambda e, scale=scale: scale * e, expected),
            rtol=1e-5,
            atol=1e-5,
        )
    chex.assert_trees_all_equal(state_out, state)


def test_inject_hyperparams_strength():
    rng = np.random.default_rng(5)
    g, basis = _randn(rng), _orthonormal_basis(rng)
    tx = optax.inject_hyperparams(og.ogpsa, static_args=("k",))(k=K, strength=1.0)
    state = og.set_basis(tx.init(g), basis)
    state.hyperparams["strength"] = jnp.asarray(0.25)
    out, new_state = jax.jit(tx.update)(g, state)
    chex.assert_trees_all_close(out, _np_project(g, basis, 0.25), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal_structs(new_state, state)
    # basis= passes through inject_hyperparams as an extra argument too
    out2, st2 = jax.jit(tx.update)(g, tx.init(g), basis=basis)
    chex.assert_trees_all_close(out2, _np_project(g, basis), rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(og.get_basis(st2), basis, rtol=0, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_mask_passes_through_without_basis_memory(mode):
    rng = np.random.default_rng(6)
    mesh = _mesh(mode)
    g_np, basis_np = _randn(rng), _orthonormal_basis(rng)
    g, basis = _put(g_np, mesh), _put(basis_np, mesh)
    mask_fn = lambda p: {"w": True, "e": False, "b": True, "c": {"t": False}}
    tx = og.ogpsa(K, mask=mask_fn)
    with _ctx(mesh):
        state = tx.init(g)
        assert isinstance(state.basis[0]["e"], optax.MaskedNode)
        assert isinstance(state.basis[1]["c"]["t"], optax.MaskedNode)
        assert len(jax.tree.leaves(state)) == 2 * K  # only w and b carry directions
        out, state = jax.jit(tx.update)(g, state, basis=basis)  # full trees: masked leaves dropped
        out_set = jax.jit(tx.update)(g, jax.jit(og.set_basis)(tx.init(g), basis))[0]
    expected = _np_project(g_np, basis_np)
    chex.assert_trees_all_equal(out["e"], g["e"])
    chex.assert_trees_all_equal(out["c"]["t"], g["c"]["t"])
    chex.assert_trees_all_close(out["w"], expected["w"], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(out["b"], expected["b"], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(out_set, out)
    # optax.tree_map_params sees the basis trees as parameter-shaped (masked leaves skipped)
    mapped = optax.tree_map_params(tx, lambda p: p.shape, state)
    assert mapped.basis[0]["w"] == (8, 13) and isinstance(mapped.basis[0]["e"], optax.MaskedNode)


def test_set_basis_through_inject_and_masked():
    rng = np.random.default_rng(7)
    g, basis = _randn(rng), _orthonormal_basis(rng)
    mask = {"w": True, "e": True, "b": False, "c": {"t": True}}
    injected = optax.chain(
        optax.inject_hyperparams(og.ogpsa, static_args=("k",))(k=K, strength=1.0),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    )
    state = injected.init(g)
    new_state = jax.jit(og.set_basis)(state, basis[:1])  # one tree: padded with zeros
    chex.assert_trees_all_equal_structs(new_state, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
    first = og.get_basis(new_state)
    chex.assert_trees_all_equal(first[0], basis[0])
    chex.assert_trees_all_equal(first[1], jax.tree.map(jnp.zeros_like, basis[0]))
    assert type(new_state[0]) is type(state[0])
    masked = optax.chain(optax.masked(og.ogpsa(K), mask), optax.adamw(1e-3))
    state = masked.init(g)
    new_state = jax.jit(og.set_basis)(state, basis)
    chex.assert_trees_all_equal_structs(new_state, state)
    inner = new_state[0].inner_state
    assert isinstance(inner, og.OGPSAState) and isinstance(inner.basis[0]["b"], optax.MaskedNode)
    chex.assert_trees_all_equal(inner.basis[0]["w"], basis[0]["w"])
    chex.assert_trees_all_equal(og.get_basis(new_state)[1]["c"], basis[1]["c"])
    with pytest.raises(ValueError, match="no OGPSA state"):
        og.set_basis(optax.adam(1e-3).init(g), basis)


def test_basis_argument_reaches_every_ogpsa_state_in_a_chain():
    """``update(..., basis=)`` reaches each OGPSA state of a chain (inject_hyperparams and
    masked ones); get_basis / set_basis refuse such a state as ambiguous."""
    rng = np.random.default_rng(7)
    g, basis = _randn(rng), _orthonormal_basis(rng)
    mask = {"w": True, "e": True, "b": False, "c": {"t": True}}
    tx = optax.chain(
        optax.inject_hyperparams(og.ogpsa, static_args=("k",))(k=K, strength=1.0),
        optax.masked(og.ogpsa(K), mask),
        optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    )
    state = tx.init(g)
    # the masked ogpsa leaves "b" alone, the rest is projected twice (idempotent)
    _, st = jax.jit(lambda g, s: tx.update(g, s, g, basis=basis))(g, state)
    chex.assert_trees_all_equal_structs(st, state)
    chex.assert_trees_all_close(st[0].inner_state.basis, basis, rtol=0, atol=0)
    chex.assert_trees_all_close(st[1].inner_state.basis[1]["w"], basis[1]["w"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 OGPSA states"):
        og.get_basis(st)
    with pytest.raises(ValueError, match="2 OGPSA states"):
        og.set_basis(st, basis)


@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_orbax_roundtrip_abstract_target(mode, tmp_path):
    rng = np.random.default_rng(8)
    mesh = _mesh(mode)
    params = _put(_randn(rng), mesh)
    tx = og.ogpsa_adamw(
        1e-3, K, mask=lambda p: {"w": True, "e": True, "b": False, "c": {"t": True}}
    )
    with _ctx(mesh):
        state = og.set_basis(jax.jit(tx.init)(params), _put(_orthonormal_basis(rng), mesh))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
        )
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(tmp_path / "state", state)
            ckptr.wait_until_finished()
            restored = ckptr.restore(tmp_path / "state", abstract)
    assert isinstance(restored[0], og.OGPSAState)
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal(restored, state)
    _shardings_equal(restored, state)


# ---------------------------------------------------------------- first-order invariance


def test_capability_loss_unchanged_to_first_order():
    """Task-loss descent with the capability gradient projected out leaves the capability loss
    nearly unchanged; the plain optimiser moves it a lot. Tolerance: the projected change must be
    below 2% of the plain one (0.6% seen; the rest is second order in the step size)."""
    rng = np.random.default_rng(9)
    d = {"w": (7, 13), "b": (5,)}
    # capability loss: 0.5 sum_leaf (x - c)^T H (x - c), H = M M^T / n + I
    hs = {n: rng.standard_normal((int(np.prod(s)),) * 2) for n, s in d.items()}
    hs = {
        n: jnp.asarray(m @ m.T / m.shape[0] + np.eye(m.shape[0]), jnp.float32)
        for n, m in hs.items()
    }
    c = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in d.items()}
    t = {n: jnp.asarray(rng.standard_normal(s), jnp.float32) for n, s in d.items()}
    x0 = jax.tree.map(
        lambda ci: ci + 0.1 * jnp.asarray(rng.standard_normal(ci.shape), jnp.float32), c
    )

    def cap_loss(x):
        return sum(0.5 * (x[n] - c[n]).ravel() @ hs[n] @ (x[n] - c[n]).ravel() for n in d)

    task_loss = lambda x: sum(0.5 * jnp.sum((x[n] - t[n]) ** 2) for n in d)

    def run(projected):
        tx = optax.chain(og.ogpsa(1), optax.sgd(0.05))

        def body(carry, _):
            x, state = carry
            basis = og.capability_basis([jax.grad(cap_loss)(x)]) if projected else None
            if basis is None:
                basis = (jax.tree.map(jnp.zeros_like, x),)
            upd, state = tx.update(jax.grad(task_loss)(x), state, x, basis=basis)
            return (optax.apply_updates(x, upd), state), None

        (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), length=60)
        return x

    x_proj, x_plain = jax.jit(lambda: (run(True), run(False)))()
    c0 = cap_loss(x0)
    d_proj, d_plain = abs(cap_loss(x_proj) - c0), abs(cap_loss(x_plain) - c0)
    assert task_loss(x_proj) < 0.9 * task_loss(x0)  # the task still makes progress (0.79 seen)
    assert d_plain > 100.0  # 208 seen
    assert d_proj < 0.02 * d_plain, (d_proj, d_plain)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error():
    rng = np.random.default_rng(10)
    g, basis = _randn(rng), _orthonormal_basis(rng)
    with pytest.raises(ValueError, match="k must be"):
        og.ogpsa(0)
    with pytest.raises(ValueError, match="strength"):
        og.ogpsa(2, strength=1.5)
    with pytest.raises(ValueError, match="strength"):
        og.project(g, basis, strength=-0.1)
    with pytest.raises(ValueError, match="strength"):
        og.ogpsa_adamw(1e-3, 2, strength=2.0)
    state = og.ogpsa(K).init(g)
    with pytest.raises(ValueError, match="more than k=2"):
        state.with_basis(basis + basis[:1])
    with pytest.raises(ValueError, match="does not match the parameter structure"):
        state.with_basis(({"w": basis[0]["w"]},))
    with pytest.raises(ValueError, match="shape"):
        og.set_basis(state, ({**basis[0], "b": np.zeros(6, np.float32)},))
    with pytest.raises(ValueError, match="does not match the gradient structure"):
        og.project(g, ({"w": basis[0]["w"]},))
    with pytest.raises(ValueError, match="tuple or list"):
        og.project(g, basis[0])
    with pytest.raises(ValueError, match="more than k=2"):
        og.ogpsa(K).update(g, state, basis=basis * 2)


def test_ogpsa_adamw_schedule_without_clipping():
    rng = np.random.default_rng(11)
    params, g, basis = _randn(rng), _randn(rng), _orthonormal_basis(rng)
    schedule = optax.cosine_decay_schedule(1e-2, 10)
    tx = og.ogpsa_adamw(schedule, K, max_grad_norm=None)
    state = tx.init(params)
    assert len(state) == 2  # projection + adamw, no clipping stage
    ref = optax.adamw(schedule, weight_decay=0.0)  # ogpsa_adamw's default (the paper's)
    ref_state = ref.init(params)
    for _ in range(2):  # the schedule advances with the adamw count
        upd, state = jax.jit(tx.update)(g, state, params, basis=basis)
        want, ref_state = ref.update(og.project(g, basis), ref_state, params)
        # float32 op ordering only: 1e-6
        chex.assert_trees_all_close(upd, want, rtol=1e-6, atol=1e-6)


def test_alias_state_under_inject_hyperparams_and_masked():
    rng = np.random.default_rng(12)
    params, g, basis = _randn(rng), _randn(rng), _orthonormal_basis(rng)
    plain = og.ogpsa_adamw(1e-2, K)
    want, _ = plain.update(g, og.set_basis(plain.init(params), basis), params)
    injected = optax.inject_hyperparams(og.ogpsa_adamw, static_args=("k",))(learning_rate=1e-2, k=K)
    state = og.set_basis(injected.init(params), basis)
    got, new_state = jax.jit(injected.update)(g, state, params)
    # the same ops, jitted vs eager: 1e-6
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(og.get_basis(new_state), og.get_basis(state))
    state.hyperparams["learning_rate"] = jnp.asarray(5e-3)  # the injected rate drives the step
    half, _ = jax.jit(injected.update)(g, state, params)
    chex.assert_trees_all_close(half, jax.tree.map(lambda x: x / 2, want), rtol=1e-6, atol=1e-6)
    # masked: the alias runs on the masked-in leaves only (full basis trees are accepted), the
    # rest pass through unchanged
    mask = {"w": True, "e": False, "b": True, "c": {"t": False}}
    masked = optax.masked(og.ogpsa_adamw(1e-2, K), mask)
    m_state = og.set_basis(masked.init(params), basis)
    got_m, _ = jax.jit(masked.update)(g, m_state, params)
    sub = lambda t: {"w": t["w"], "b": t["b"]}
    sub_tx = og.ogpsa_adamw(1e-2, K)
    sub_basis = tuple(sub(b) for b in basis)
    sub_want, _ = sub_tx.update(
        sub(g), og.set_basis(sub_tx.init(sub(params)), sub_basis), sub(params)
    )
    chex.assert_trees_all_close(sub(got_m), sub_want, rtol=1e-6, atol=1e-6)  # as above
    chex.assert_trees_all_equal(got_m["e"], g["e"])
    chex.assert_trees_all_equal(got_m["c"], g["c"])
