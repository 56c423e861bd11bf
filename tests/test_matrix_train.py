"""Training with the GPM activation basis (``sft.ogpsa.method=activation``) on the tiny preset.

One SFT run on a 2x4 mesh (4 steps of plain SGD, basis refreshed before steps 1 and 3 with
GPM's energy rule and union, checkpoints after steps 2 and 4) serves every test: the run's
metrics, the applied update's orthogonality to the protected input subspace on every projected
leaf, and the checkpointed basis, restored into a `MatrixOGPSAState`, equal to the basis
recomputed from the reference rows at the step-2 weights. Below them, `inputs_like` (captured
decoder inputs arranged like a parameter tree) feeds the matrix basis of an `nnx.State`.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_capture import CFG, B, T, batch, cap, random_params

from ogpsa_jax.bases import matrix_basis_from_activations
from ogpsa_jax.models import init_random, make_mesh, tiny_config
from ogpsa_jax.models.capture import SITES, stack_rows
from ogpsa_jax.projection import MatrixOGPSAState, get_basis, ogpsa_matrix
from ogpsa_jax.train import apply_overrides, make_optimizer, preset, train, validate
from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.inputs import load_inputs
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.refresh import inputs_like, make_activation_refresh, rows_per_batch
from ogpsa_jax.train.sharding import place, rows_sharding

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

RANK, ENERGY = 11, 0.8
OVERRIDES = [
    "mesh=2,4,1",
    "sft.max_steps=4",
    "sft.optimizer=sgd",
    "sft.schedule=constant",
    # Large unclipped SGD steps: the update must stand far above the float32 rounding of the
    # weights (|w| * 6e-8) for a per-leaf 1e-5 orthogonality check to be meaningful.
    "sft.learning_rate=2.0",
    "sft.max_grad_norm=0",
    "sft.ogpsa.method=activation",
    f"sft.ogpsa.k={RANK}",
    f"sft.ogpsa.energy={ENERGY}",
    "sft.ogpsa.union=true",
    "sft.ogpsa.capture_rows=93",
    "sft.ogpsa.refresh_every=2",
    "checkpoint_every=2",
    "max_to_keep=3",
]


def _name(path):
    parts = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def named(tree):
    """Path -> array for the array leaves (MaskedNode / None leaves drop out)."""
    return {_name(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = apply_overrides(preset("tiny"), OVERRIDES)
    out = tmp_path_factory.mktemp("activation")
    result = train("sft", cfg, out)
    mesh = make_mesh((2, 4, 1))
    inputs = load_inputs("sft", cfg)
    # Abstract targets with the training shardings, to restore the checkpoints as training does.
    model = init_random(
        dataclasses.replace(tiny_config(vocab_size=len(inputs.tokenizer))),
        seed=cfg.seed,
        dtype=jnp.float32,
        mesh=mesh,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer = make_optimizer(cfg.sft, total_steps=4)
    with jax.set_mesh(mesh):
        opt = jax.jit(optimizer.init)(params)
    manager = ckpt.open_manager(out / "checkpoints", max_to_keep=3)
    try:
        restored = {
            s: ckpt.restore(manager, s, ckpt.abstract_like(params), ckpt.abstract_like(opt))
            for s in (2, 4)
        }
    finally:
        manager.close()
    return dict(
        cfg=cfg,
        out=out,
        result=result,
        mesh=mesh,
        inputs=inputs,
        graphdef=graphdef,
        rest=rest,
        restored=restored,
    )


def test_activation_run_refreshes_and_trains(run):
    assert run["result"].step == 4
    recs = read_metrics(run["out"] / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped"] for r in recs] == [0, 0, 0, 0]
    assert [("ref_loss" in r) for r in recs] == [True, False, True, False]
    for r in (recs[0], recs[2]):
        assert np.isfinite(r["ref_loss"]) and r["refresh_s"] > 0
        # GPM's energy rule picks at most RANK directions, and at least one per matrix.
        assert 1.0 <= r["basis_rank"] <= RANK
    # Union: the second refresh keeps every old direction, so no matrix loses rank.
    assert recs[2]["basis_rank"] >= recs[0]["basis_rank"]
    assert all(0.0 < r["frac_removed"] < 1.0 for r in recs)
    # max |V^T Pg| of the matrix bases (float32 rounding: measured ~1e-8 of the grad norm)
    assert all(r["residual_max"] <= 1e-5 * max(r["grad_norm"], 1.0) for r in recs)
    assert recs[-1]["loss"] < recs[0]["loss"], [r["loss"] for r in recs]


def test_applied_update_is_orthogonal_to_the_protected_inputs(run):
    (p2, _, _), (p4, opt4, _) = run["restored"][2], run["restored"][4]
    # Steps 3 and 4 both used the basis of the refresh before step 3 (stored at step 4).
    basis = named(get_basis(opt4))
    assert set(basis) == {
        f"layers/{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
    } | {"layers/down_proj"}  # tied embeddings: no lm_head; norms and embeddings pass through
    w2, w4 = named(p2), named(p4)
    for name, v_LxIxR in basis.items():
        dw_LxIxO = (w4[name] - w2[name]).astype(np.float64)
        coeff = np.einsum("lir,lio->lro", v_LxIxR, dw_LxIxO)
        # float32 weights and projection: measured ~1e-7 with steps of 0.1-5 per leaf.
        assert np.linalg.norm(coeff) <= 1e-5 * np.linalg.norm(dw_LxIxO), name
        assert np.linalg.norm(dw_LxIxO) > 1e-2, f"{name} did not move"
    # Parameters without a basis moved freely (no projection on them).
    assert np.linalg.norm(w4["embed_tokens"] - w2["embed_tokens"]) > 1e-4


def test_checkpointed_basis_round_trips_and_matches_a_recomputation(run):
    (p2, opt2, _), (_, opt4, meta4) = run["restored"][2], run["restored"][4]
    assert meta4["step"] == 4
    proj4 = opt4[0]
    assert isinstance(proj4, MatrixOGPSAState)
    # The refresh before step 3, redone from the step-2 checkpoint with the training code path:
    # same reference rows, same row draw, union with the step-2 basis.
    cfg, mesh = run["cfg"], run["mesh"]
    og = cfg.sft.ogpsa
    groups = run["inputs"].ref_groups["sft"]
    ref_sh = rows_sharding(mesh, groups[0][0]["input_ids"].shape[0], 2, 0)
    with jax.set_mesh(mesh):
        refresh = make_activation_refresh(
            run["graphdef"],
            run["rest"],
            og,
            groups,
            place=lambda b: place(b, ref_sh),
            seed=cfg.seed,
        )
        redone, metrics = refresh(p2, opt2)
    assert metrics["basis_finite"] and metrics["nonfinite_at"] is None
    got, want, old = named(proj4.basis), named(get_basis(redone)), named(get_basis(opt2))
    assert got.keys() == want.keys()
    # Weights sharing an input share its basis (computed once, one buffer per leaf).
    for a, b in (("q_proj", "k_proj"), ("q_proj", "v_proj"), ("gate_proj", "up_proj")):
        np.testing.assert_array_equal(got[f"layers/{a}"], got[f"layers/{b}"])
    for name in got:
        v, w, o = got[name], want[name], old[name]
        cols = lambda x: np.sum(np.sum(x * x, axis=-2) > 0.5, axis=-1)
        np.testing.assert_array_equal(cols(v), cols(w), err_msg=name)
        proj_v = np.einsum("lir,ljr->lij", v, v)
        proj_w = np.einsum("lir,ljr->lij", w, w)
        # Same program on the same mesh; eigenvector signs may differ, projectors may not.
        chex.assert_trees_all_close(proj_v, proj_w, rtol=0, atol=1e-5)
        gram = np.einsum("lir,lis->lrs", v, v)
        diag = np.einsum("lrr->lr", gram)
        chex.assert_trees_all_close(gram, diag[:, :, None] * np.eye(RANK), rtol=0, atol=1e-5)
        # Union: every step-2 direction lies in the step-4 span.
        chex.assert_trees_all_close(np.einsum("lij,ljr->lir", proj_v, o), o, rtol=0, atol=1e-5)
    # Round trip: the arrays restored into MatrixOGPSAState equal what orbax holds on disk.
    raw = ckpt.ocp.StandardCheckpointer().restore(str(run["out"] / "checkpoints" / "4" / "state"))
    raw_basis = raw["opt_state"][0]["basis"]
    for name, v in got.items():
        leaf = raw_basis
        for part in name.split("/"):
            leaf = leaf[part]
        leaf = leaf.get("value", leaf) if isinstance(leaf, dict) else leaf
        np.testing.assert_array_equal(np.asarray(leaf), v, err_msg=name)


def test_activation_config_errors_are_named():
    base = preset("tiny")
    bad_union = apply_overrides(base, ["sft.ogpsa.method=svd", "sft.ogpsa.union=true"])
    with pytest.raises(ValueError, match="sft.ogpsa.union"):
        validate(bad_union, "sft", 8)
    bad_rows = apply_overrides(base, ["sft.ogpsa.method=activation", "sft.ogpsa.capture_rows=0"])
    with pytest.raises(ValueError, match="capture_rows"):
        validate(bad_rows, "sft", 8)
    assert rows_per_batch(93, 4) == 24 and rows_per_batch(3, 4) == 1
    og = dataclasses.replace(base.sft.ogpsa, method="svd")
    with pytest.raises(ValueError, match="activation"):
        make_activation_refresh(None, None, og, [[{}]])


# `inputs_like`: captured decoder inputs arranged like a parameter tree, for a matrix basis, on
# the capture tests' model (Qwen2-style, odd sizes, untied head, biases, O(1) random weights)
# and batch (left and right padding).
@pytest.fixture(scope="module")
def captured():
    params = random_params()
    ids, mask = batch()
    return params, cap(params, ids, mask, rows=7), cap(params, ids, mask)


def test_inputs_like_feeds_the_matrix_basis_of_an_nnx_state(captured):
    params, sampled, full = captured
    _, state, _ = nnx.split(init_random(CFG, dtype=jnp.float32), nnx.Param, ...)  # structure
    rows = stack_rows(c.inputs for c in (sampled, full))
    assert rows["layers"]["up_proj"].shape == (CFG.num_layers, 7 + B * T, CFG.hidden_size)
    no_v = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: "v_proj" not in jax.tree_util.keystr(path), p
    )
    acts = inputs_like(state, rows, mask=no_v)
    # The basis tree is accepted by the transform's state built on the same nnx.State.
    opt = ogpsa_matrix(5, mask=no_v).init(state)
    opt = opt.with_basis(matrix_basis_from_activations(acts, k=5))
    got = {_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(opt.basis)[0]}
    want = {f"layers/{n}" for n in SITES if n != "v_proj"} | {"lm_head"}
    assert set(got) == want
    assert got["layers/down_proj"].shape == (CFG.num_layers, CFG.intermediate_size, 5)
    assert got["layers/o_proj"].shape == (CFG.num_layers, CFG.num_heads * CFG.head_dim, 5)
    assert got["lm_head"].shape == (CFG.hidden_size, 5)
    for v in got.values():  # orthonormal columns (float32 eigh)
        gram = jnp.einsum("...ir,...is->...rs", v, v)
        chex.assert_trees_all_close(gram, jnp.broadcast_to(jnp.eye(5), gram.shape), atol=1e-5)
    # GPM's point: with the full input span protected, a projected change of down_proj leaves
    # that layer's output on every captured row unchanged.
    x = rows["layers"]["down_proj"]  # (L, 40, 71): 40 rows (7 zero) < 71 inputs
    v = matrix_basis_from_activations({"x": x}, k=x.shape[1])["x"]
    g = jax.random.normal(jax.random.key(0), (CFG.num_layers, CFG.intermediate_size, 13))
    pg = g - jnp.einsum("lir,ljr,ljo->lio", v, v, g)
    before = jnp.linalg.norm(jnp.einsum("lni,lio->lno", x, g))
    after = jnp.linalg.norm(jnp.einsum("lni,lio->lno", x, pg))
    assert float(after) < 1e-4 * float(before), (float(after), float(before))


def test_inputs_like_names_a_width_mismatch(captured):
    params, sampled, _ = captured
    dims = jax.tree_util.tree_map_with_path(
        lambda path, x: 2 if x.ndim == 3 and "norm" not in jax.tree_util.keystr(path) else None,
        params,
    )
    with pytest.raises(ValueError, match="has width"):
        inputs_like(params, sampled.inputs, dims=dims)
