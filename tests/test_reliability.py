"""Reliability (issue 6), fast part: non-finite values, degenerate bases, checkpoint guards,
resume past incomplete checkpoints, and bad input that leaves the output folder untouched.

The kill/preemption drills (SIGKILL during a step, a checkpoint save and a basis refresh;
SIGTERM) run `ogpsa train` as subprocesses in ``tests/fault_drill.py``; its test is imported at
the bottom so ``make test`` runs it too.

Loop-level tests share one short tiny-preset run (``stopped_run``: a checkpoint after every step,
basis refreshes before steps 1 and 4, NaN gradients injected at steps 2, 4 and 5, so it stops at
step 5 after two skips in a row) and copy its folder to stage the faults.
"""

import json
import logging
import os
import re
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import save_file

from ogpsa_jax.bases import capability_basis, matrix_basis_from_gradients
from ogpsa_jax.cli import EXIT_BAD_INPUT, main
from ogpsa_jax.models import make_mesh, tiny_config
from ogpsa_jax.overrides import to_dict
from ogpsa_jax.projection import get_basis, ogpsa, ogpsa_matrix, set_basis
from ogpsa_jax.testing import inject_nonfinite, parse_fault_drill, poisoning_loss, with_poison
from ogpsa_jax.train import (
    NonFiniteError,
    OGPSAConfig,
    Optimizer,
    apply_overrides,
    make_train_step,
    preset,
    train,
)
from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.metrics import MetricsLog, read_metrics
from ogpsa_jax.train.refresh import make_gradient_refresh
from ogpsa_jax.train.run_dir import prepare_output_dir
from ogpsa_jax.train.step import logits_logps

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

F32 = jnp.float32
TIMING_KEYS = {"tokens_per_s", "refresh_s"}


def snapshot(path):
    """Every file under path with its size, mtime and bytes (to show a folder is untouched)."""
    out = {}
    for root, dirs, files in os.walk(path):
        for d in dirs:
            out[os.path.join(root, d)] = "dir"
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            with open(p, "rb") as fh:
                out[p] = (st.st_size, st.st_mtime_ns, fh.read())
    return out


def metric_records(run_dir):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ]


def ckpt_state(run_dir, step):
    path = os.path.join(os.path.abspath(run_dir), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


# ----------------------------------------------------------------------------- non-finite steps


def test_nonfinite_step_changes_nothing_and_names_the_first_bad_leaf():
    rng = np.random.default_rng(0)
    params = {
        "a": jnp.asarray(rng.normal(size=(3, 5)), F32),
        "b": jnp.asarray(rng.normal(size=(5, 7)), F32),
    }

    def micro_loss(p, micro, ref_params):
        del ref_params
        y = micro["x"] @ p["a"] @ p["b"]
        total = jnp.sum(y * y) + jnp.sum(p["b"] * micro["z"]) + jnp.sum(micro["c"])
        return total, (jnp.asarray(micro["x"].shape[0], F32), {})

    opt = Optimizer.chain(ogpsa(2), optax.sgd(0.05))
    refs = [jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), F32), params)] * 1
    refs.append(jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), F32), params))
    opt_state = set_basis(opt.init(params), capability_basis(refs, k=2))
    # The step with `ogpsa_jax.testing`'s poisoning loss: loss and gradient times 1 + poison.
    step = jax.jit(make_train_step(poisoning_loss(micro_loss), opt))

    def batch(z_nan=False, c_inf=False, poison=0.0):
        z = rng.normal(size=(2, 5, 7)).astype(np.float32)
        if z_nan:
            z[1, 3, 4] = np.nan  # only leaf "b" gets a NaN gradient (and the loss is NaN)
        c = np.full((2, 1), np.inf if c_inf else 0.5, np.float32)  # inf loss, finite gradients
        x = rng.normal(size=(2, 4, 3)).astype(np.float32)
        return with_poison({"x": x, "z": z, "c": c}, poison)

    clean, clean_opt, m = step(params, opt_state, batch(), None)
    assert int(m["skipped"]) == 0 and int(m["first_nonfinite_leaf"]) == -2
    assert float(jnp.max(jnp.abs(clean["a"] - params["a"]))) > 1e-4  # a real step moves params

    cases = [  # (batch, poison, first bad leaf: index, -1 = the loss only)
        (batch(poison=np.nan), np.nan, 0),
        (batch(poison=np.inf), np.inf, 0),
        (batch(c_inf=True), 0.0, -1),
        (batch(z_nan=True), 0.0, 1),
    ]
    for b, poison, first in cases:
        new, new_opt, m = step(clean, clean_opt, b, None)
        assert int(m["skipped"]) == 1, (poison, first)
        assert int(m["first_nonfinite_leaf"]) == first, (poison, first)
        chex.assert_trees_all_equal(new, clean)  # params untouched, bitwise
        chex.assert_trees_all_equal(new_opt, clean_opt)  # opt state and basis untouched
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(get_basis(new_opt)))


def _toy_refresh_setup():
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    rng = np.random.default_rng(1)
    rep = NamedSharding(mesh, P())
    params = {
        "emb": jax.device_put(jnp.asarray(rng.normal(size=(11, 5)), F32), rep),
        "out": jax.device_put(jnp.asarray(rng.normal(size=(5, 11)), F32), rep),
    }
    param_sh = jax.tree.map(lambda _: rep, params)
    apply_fn = lambda p, ids, attn: p["emb"][ids] @ p["out"]

    def group(seed):
        r = np.random.default_rng(seed)
        ids = r.integers(0, 11, size=(2, 7)).astype(np.int32)
        ids[:, 1] = 0  # token 0 in every row (its embedding gets the NaN below)
        ones = np.ones_like(ids)
        return [{"input_ids": ids, "attention_mask": ones, "loss_mask": ones}]

    return mesh, params, param_sh, apply_fn, [group(2), group(3)]


def test_nonfinite_reference_gradients_never_reach_the_basis():
    mesh, params, param_sh, apply_fn, groups = _toy_refresh_setup()
    og = OGPSAConfig(method="gram_schmidt", k=2)
    refresh = make_gradient_refresh(logits_logps(apply_fn), og, groups, param_sh, mesh)
    proj, rest = ogpsa(2), optax.sgd(0.1)
    opt0 = (proj.init(params), rest.init(params))
    opt1, m1 = refresh(params, opt0)
    assert m1["basis_finite"] and m1["nonfinite_at"] is None
    basis1 = get_basis(opt1)
    assert float(jnp.sum(jnp.abs(basis1[1]["out"]))) > 0.1  # a real basis was installed
    # A NaN weight makes the reference loss and every reference gradient NaN. Gram-Schmidt
    # alone would turn NaN gradients into zero directions (finite), silently replacing the basis.
    bad = dict(params, emb=params["emb"].at[0, 2].set(jnp.nan))
    opt2, m2 = refresh(bad, opt1)
    assert not m2["basis_finite"] and m2["nonfinite_at"] == "'emb'"
    chex.assert_trees_all_equal(get_basis(opt2), basis1)


# ----------------------------------------------------------------------------- degenerate bases


def _degenerate_refs(rng):
    v = rng.normal(size=(7,)).astype(np.float32)
    full = [rng.normal(size=(3, 5)).astype(np.float32) for _ in range(3)]
    return [
        {
            "zero": jnp.zeros((4, 6), F32),  # zero reference gradient on this leaf
            "tiny": jnp.asarray(1e-30 * rng.normal(size=(5, 3)), F32),  # squares underflow
            "rank1": jnp.asarray(c * v),  # 3 gradients, 1 independent direction (< k)
            "full": jnp.asarray(full[i]),
        }
        for i, c in enumerate((1.0, -2.0, 0.5))
    ], v


@pytest.mark.parametrize(
    ("method", "energy", "k"), [("gram_schmidt", None, 3), ("svd", None, 4), ("svd", 0.999, 3)]
)
def test_degenerate_basis_projects_nothing_and_has_no_nan(method, energy, k):
    rng = np.random.default_rng(4)
    refs, v = _degenerate_refs(rng)
    basis = jax.jit(lambda r: capability_basis(r, k=k, method=method, energy=energy))(refs)
    assert len(basis) == k
    for tree in basis:
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))
        for name in ("zero", "tiny"):
            assert not bool(jnp.any(tree[name] != 0)), name  # exactly zero directions
    norms = [float(jnp.linalg.norm(t["rank1"])) for t in basis]
    assert sum(n > 0.5 for n in norms) == 1 and sum(n == 0.0 for n in norms) == k - 1, norms
    u = basis[int(np.argmax(norms))]["rank1"]
    assert abs(abs(float(u @ v)) / np.linalg.norm(v) - 1.0) < 1e-5  # the one direction is +-v

    g = {name: jnp.asarray(rng.normal(size=x.shape), F32) for name, x in refs[0].items()}
    for conflict_only in (False, True):
        tx = ogpsa(k, strength=1.0, conflict_only=conflict_only)
        state = set_basis(tx.init(g), basis)
        pg, _ = jax.jit(tx.update)(g, state)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(pg))
        for name in ("zero", "tiny"):  # nothing projected there: bitwise the input
            chex.assert_trees_all_equal(pg[name], g[name])
        # rank-1 leaf: the component along u removed (or kept, in conflict-only mode when it
        # does not conflict); float32 sums over 7 terms.
        c = float(jnp.sum(u * g["rank1"]))
        want = g["rank1"] - (min(c, 0.0) if conflict_only else c) * u
        chex.assert_trees_all_close(pg["rank1"], want, rtol=1e-5, atol=1e-6)
    # A zero gradient through a zero basis stays zero (no 0/0 anywhere).
    zeros = jax.tree.map(jnp.zeros_like, g)
    pz, _ = ogpsa(k).update(zeros, set_basis(ogpsa(k).init(g), basis))
    assert all(not bool(jnp.any(x != 0)) for x in jax.tree.leaves(pz))


def test_degenerate_matrix_basis_and_all_masked_leaves(tmp_path):
    rng = np.random.default_rng(5)
    col = rng.normal(size=(6, 1)).astype(np.float32)
    grads = [
        {"w_zero": jnp.zeros((6, 4), F32), "w_rank1": jnp.asarray(col * rng.normal(size=(1, 4)))}
        for _ in range(3)
    ]
    vb = matrix_basis_from_gradients(grads, k=3)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(vb))
    assert not bool(jnp.any(vb["w_zero"] != 0))
    col_norms = np.linalg.norm(np.asarray(vb["w_rank1"]), axis=0)
    assert np.sum(col_norms > 0.5) == 1 and np.sum(col_norms == 0.0) == 2, col_norms
    g = {name: jnp.asarray(rng.normal(size=(6, 4)), F32) for name in ("w_zero", "w_rank1")}
    tx = ogpsa_matrix(3)
    pg, _ = tx.update(g, set_basis(tx.init(g), vb))
    chex.assert_trees_all_equal(pg["w_zero"], g["w_zero"])
    assert bool(jnp.all(jnp.isfinite(pg["w_rank1"])))

    # All leaves masked: no basis memory, set_basis accepts the basis (a full one for the flat
    # transform; for the matrix one, estimated with the same mask), the update is the identity,
    # and the (basis-free) optimizer state checkpoints and restores.
    none = lambda p: jax.tree.map(lambda _: False, p)
    full_basis = capability_basis([g, jax.tree.map(lambda x: 2 * x + 1, g)], k=2)
    masked_vb = matrix_basis_from_gradients(grads, k=3, mask=none)
    for tx, basis in ((ogpsa(2, mask=none), full_basis), (ogpsa_matrix(3, mask=none), masked_vb)):
        state = set_basis(tx.init(g), basis)
        assert jax.tree.leaves(state) == []
        pg, _ = jax.jit(tx.update)(g, state)
        chex.assert_trees_all_equal(pg, g)
    opt = (ogpsa(2, mask=none).init(g), optax.adam(0.1).init(g))
    manager = ckpt.open_manager(tmp_path / "ck", max_to_keep=2)
    ckpt.save(manager, 1, g, opt, {"x": 1})
    params, restored, meta = ckpt.restore(
        manager, 1, ckpt.abstract_like(g), ckpt.abstract_like(opt)
    )
    manager.close()
    chex.assert_trees_all_equal(restored, opt)
    chex.assert_trees_all_equal(params, g)
    assert meta["x"] == 1


# ----------------------------------------------------------------------------- checkpoint guards


def test_incomplete_checkpoints_are_never_used_and_mismatches_are_named(tmp_path, caplog):
    rng = np.random.default_rng(6)
    tree = lambda: {
        "a": jnp.asarray(rng.normal(size=(3, 5)), F32),
        "b": jnp.asarray(rng.normal(size=(7,)), F32),
    }
    proj = ogpsa(2)
    states = {}
    d = tmp_path / "checkpoints"
    manager = ckpt.open_manager(d, max_to_keep=5)
    for step in (1, 2, 3):
        p = tree()
        opt = set_basis((proj.init(p), optax.adam(0.1).init(p)), capability_basis([tree()], k=2))
        ckpt.save(manager, step, p, opt, {"step_note": step})
        states[step] = (p, opt)
    manager.close()
    assert ckpt.complete_steps(d) == [1, 2, 3]
    # Step 3 as a save killed before its commit marker (a step folder without the marker),
    # step 2 with one item unfinished, and an orbax temporary folder of a step 4 being written.
    os.remove(d / "3" / "commit_success.txt")
    os.remove(d / "2" / "state" / "commit_success.txt")
    shutil.copytree(d / "1", d / "4.orbax-checkpoint-tmp-1234")
    before = snapshot(d)
    assert ckpt.complete_steps(d) == [1]
    found = ckpt.read_meta(d)
    assert found is not None and found[0] == 1 and found[1]["step_note"] == 1
    assert snapshot(d) == before  # looking is read only
    with caplog.at_level(logging.WARNING, logger="ogpsa_jax.train.checkpoint"):
        manager = ckpt.open_manager(d, max_to_keep=5)
    assert sorted(os.listdir(d)) == ["1"]
    assert len(re.findall("removing the incomplete checkpoint", caplog.text)) == 3
    assert manager.latest_step() == 1
    p1, opt1 = states[1]
    params, opt, meta = ckpt.restore(manager, 1, ckpt.abstract_like(p1), ckpt.abstract_like(opt1))
    chex.assert_trees_all_equal((params, opt), (p1, opt1))

    # Another model (a transposed leaf) or another optimizer (k=3): named, not an orbax error.
    other = {"a": jax.ShapeDtypeStruct((5, 3), F32), "b": ckpt.abstract_like(p1)["b"]}
    with pytest.raises(ValueError, match=r"different model \(a: checkpoint \[3, 5\] vs this run"):
        ckpt.restore(manager, 1, other, ckpt.abstract_like(opt1))
    opt_k3 = (ogpsa(3).init(p1), optax.adam(0.1).init(p1))
    with pytest.raises(ValueError, match=r"different optimizer state \(0/basis/2/a: checkpoint "):
        ckpt.restore(manager, 1, ckpt.abstract_like(p1), ckpt.abstract_like(opt_k3))
    manager.close()
    assert ckpt.read_meta(tmp_path / "nothing") is None and not (tmp_path / "nothing").exists()


def test_metrics_log_drops_a_cut_off_line_and_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in (1, 2, 3)]
    path.write_text("\n".join(lines) + '\n{"step": 4, "lo')  # killed mid-write
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    log = MetricsLog(tmp_path, resume_step=2, tensorboard=False)
    log.write(3, {"loss": 0.25})
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 0.5), (3, 0.25)]
    path.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_metrics(path)


def test_fault_drill_spec_is_checked():
    assert parse_fault_drill("")("save", 3) is None
    for bad in ("save@x+1", "boom@3+0.1", "save@3"):
        with pytest.raises(ValueError, match=rf"fault drill {re.escape(repr(bad))}"):
            parse_fault_drill(bad)


def test_overwrite_replaces_the_folder_only_when_asked(tmp_path):
    out = tmp_path / "run"
    prepare_output_dir(str(out), {"config": {"seed": 0}}, overwrite=False)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match=r"different config \(config.seed: 0 -> 1\).*--overwrite"):
        prepare_output_dir(str(out), {"config": {"seed": 1}}, overwrite=False)
    assert json.loads((out / "config.json").read_text()) == {"config": {"seed": 0}}
    prepare_output_dir(str(out), {"config": {"seed": 1}}, overwrite=True)
    assert sorted(os.listdir(out)) == ["config.json"]
    assert json.loads((out / "config.json").read_text()) == {"config": {"seed": 1}}


# ----------------------------------------------------------------------------- training loop

# NaN gradients at steps 2, 4 and 5: step 2 is skipped, step 3 resets the run of skips, steps 4
# and 5 are two in a row = max_consecutive_skips, so the run stops at step 5.
NAN_AT = (2, 4, 5)
STOP = r"sft step 5: 2 consecutive non-finite steps \(last at parameter 'embed_tokens'\)"


def run_cfg(*extra):
    return apply_overrides(
        preset("tiny"),
        [
            "sft.max_steps=6",
            "sft.ogpsa.refresh_every=3",
            "checkpoint_every=1",
            "max_to_keep=10",
            "max_consecutive_skips=2",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """The shared run: checkpoints 1-4, basis refreshes before steps 1 and 4, stopped at 5."""
    out = tmp_path_factory.mktemp("rel") / "stopped"
    with pytest.raises(NonFiniteError, match=STOP), inject_nonfinite(NAN_AT):
        train("sft", run_cfg(), out)
    return out


def copy_run(src, dst, keep_steps):
    """A copy of a run folder as a crash would leave it: only the given checkpoints."""
    shutil.copytree(src, dst)
    for name in os.listdir(dst / "checkpoints"):
        if int(name) not in keep_steps:
            shutil.rmtree(dst / "checkpoints" / name)
    return dst


def leaves_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb, strict=True))


def test_skipped_steps_are_counted_never_reach_params_or_basis_and_stop(stopped_run):
    recs = read_metrics(stopped_run / "metrics.jsonl")
    # The stopping step raises before its metrics line and before any checkpoint.
    assert [(r["step"], r["skipped"], r["skips"]) for r in recs] == [
        (1, 0, 0), (2, 1, 1), (3, 0, 1), (4, 1, 2),
    ]  # fmt: skip
    assert ckpt.complete_steps(stopped_run / "checkpoints") == [1, 2, 3, 4]
    assert not (stopped_run / "final").exists()
    s1, s2, s3, s4 = (ckpt_state(stopped_run, s) for s in (1, 2, 3, 4))
    # Step 2 skipped: its checkpoint equals step 1's bitwise (params, Adam moments, basis).
    chex.assert_trees_all_equal(s1, s2)
    # Step 4 skipped after a basis refresh: params and Adam moments as after step 3, the new
    # basis (computed from finite reference gradients) installed. The opt state is that of
    # ogpsa_adamw: (projection, clip (no arrays), adamw (scale_by_adam first)).
    chex.assert_trees_all_equal(s3["params"], s4["params"])
    assert len(s3["opt_state"]) == 3 and set(s3["opt_state"][2][0]) == {"count", "mu", "nu"}
    chex.assert_trees_all_equal(s3["opt_state"][1:], s4["opt_state"][1:])
    assert not leaves_equal(s3["opt_state"][0], s4["opt_state"][0])
    assert not leaves_equal(s2["params"], s3["params"])  # step 3 did move the weights
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(s4))


def test_resume_skips_incomplete_checkpoints_and_equals_uninterrupted(stopped_run, tmp_path):
    run = copy_run(stopped_run, tmp_path / "crashed", keep_steps=(3, 4))
    cks = run / "checkpoints"
    os.remove(cks / "4" / "commit_success.txt")  # a step folder without its commit marker
    shutil.copytree(cks / "3", cks / "5.orbax-checkpoint-tmp-1700000000")  # a save cut short
    with pytest.raises(NonFiniteError, match=STOP), inject_nonfinite(NAN_AT):
        train("sft", run_cfg(), run)
    assert sorted(os.listdir(cks)) == ["3", "4"]  # 4 rewritten complete, the rest removed
    # Resumed from step 3, so the refresh before step 4 ran again at the restored weights and
    # the skip counters came from the checkpoint: bitwise the uninterrupted checkpoint 4 and
    # metrics (step 4 rewritten once).
    chex.assert_trees_all_equal(ckpt_state(run, 4), ckpt_state(stopped_run, 4))
    assert metric_records(run) == metric_records(stopped_run)


def test_checkpoint_of_another_config_is_named_before_compute(stopped_run, tmp_path):
    # config.json says one thing, the checkpoints were written by another config (a copied or
    # edited folder): a named mismatch before anything is computed, folder untouched.
    run = copy_run(stopped_run, tmp_path / "mixed", keep_steps=(4,))
    cfg = run_cfg("sft.ogpsa.k=3")
    (run / "config.json").write_text(json.dumps({"command": "sft", "config": to_dict(cfg)}))
    before = snapshot(run)
    with pytest.raises(
        ValueError,
        match=r"checkpoint .*/checkpoints/4 was written by a different config "
        r"\(sft.ogpsa.k: 2 -> 3\)",
    ):
        train("sft", cfg, run)
    assert snapshot(run) == before


def cli(out, *args, command="sft"):
    return main(["train", command, "--preset", "tiny", "--output-dir", str(out), *args])


def _model_folder(tmp_path, kind):
    path = tmp_path / f"model_{kind}"
    path.mkdir()
    cfg = tiny_config(vocab_size=101).to_hf_dict()
    if kind == "bad_json":
        (path / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
        return path
    if kind == "bad_arch":
        cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    if kind == "no_weights":
        return path
    if kind == "bad_weights":
        (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header")
        return path
    save_file(
        {"model.embed_tokens.weight": np.zeros((101, 64), np.float32)},
        str(path / "model.safetensors"),
    )
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "seed=1.5"], r"seed: expected an int, got '1.5'"),
        (["--set", "sft.ogpsa.enabled=maybe"], r"expected a bool"),
        (["--set", "mesh=2,4"], r"mesh: expected 3 comma-separated values"),
        (["--set", "mesh=2,2,1"], r"mesh \(2, 2, 1\) has 4 devices but 8 are used"),
        (["--set", "num_devices=16"], r"num_devices=16 but only 8 devices"),
        (["--set", "sft.ogpsa.k=-1"], r"'sft.ogpsa.k' must be >= 1, got -1"),
        (["--set", "sft.ogpsa.strength=-0.5"], r"strength' must be in \[0, 1\], got -0.5"),
        (["--set", "sft.max_length=-3"], r"'sft.max_length' must be > 0, got -3"),
        (["--set", "sft.ogpsa.method=qr"], r"'sft.ogpsa.method' must be one of"),
        (["--set", "model.dtype=float16"], r"'model.dtype' must be one of"),
        (["--set", "sft=3"], r"'sft' is a group of fields"),
        (["--set", "no_such_field=1"], r"unknown config field 'no_such_field'"),
        # a smaller budget (a larger one extends the run: tests/test_cli_extend.py)
        (["--max-steps", "5"], r"different config \(config.sft.max_steps: 6 -> 5"),
        (["--set", "sft.learning_rate=0.1"], r"different config \(config.sft.learning_rate"),
    ],
)
def test_bad_config_leaves_an_existing_run_untouched(stopped_run, capsys, args, message):
    before = snapshot(stopped_run)
    sets = sum(
        (
            ["--set", s]
            for s in (
                "sft.ogpsa.refresh_every=3",
                "checkpoint_every=1",
                "max_to_keep=10",
                "max_consecutive_skips=2",
            )
        ),
        [],
    )
    assert cli(stopped_run, "--max-steps", "6", *sets, *args) == EXIT_BAD_INPUT
    assert re.search(message, capsys.readouterr().err), message
    assert snapshot(stopped_run) == before


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("bad_json", r"config.json is malformed"),
        ("bad_arch", r"config.json is malformed: unknown model_type 'gpt2'"),
        ("no_weights", r"cannot read the weights"),
        ("bad_weights", r"cannot read the weights"),
        ("missing_tensors", r"missing tensors \['model.layers.0.input_layernorm.weight'"),
    ],
)
def test_malformed_model_folder_is_named_before_compute(tmp_path, capsys, kind, message):
    model = _model_folder(tmp_path, kind)
    out = tmp_path / "never"
    args = ["--set", f"model.path={model}"]
    assert cli(out, *args) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(model) in err and re.search(message, err), err
    assert not out.exists()


def test_bad_dpo_and_reference_data_are_named_before_compute(tmp_path, capsys):
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(
        '{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "x", "chosen": "y"}\n'
    )
    ref = tmp_path / "ref.jsonl"
    ref.write_text('{"prompt": "a", "response": "b"}\n{"response": "no prompt"}\n')
    out = tmp_path / "never"
    cases = [
        ("dpo", ["--set", f"dpo.data={prefs}"], rf"{prefs}.*row 1: field 'rejected' is missing"),
        ("sft", ["--set", f"sft.ogpsa.reference={ref}"], rf"{ref}.*row 1: field 'prompt'"),
        ("sft-dpo", ["--set", "dpo.max_length=0"], r"'dpo.max_length' must be > 0"),
        (
            "sft-dpo",
            ["--set", "dpo.truncation=error", "--set", "dpo.max_length=40"],
            r"has \d+ tokens > max_length=40",
        ),
    ]
    for command, args, message in cases:
        assert cli(out, *args, command=command) == EXIT_BAD_INPUT, args
        err = capsys.readouterr().err
        assert re.search(message, err), (message, err)
        assert not out.exists()


# The slow subprocess drills (SIGKILL during a step / a save / a refresh, SIGTERM), collected
# here so `make test` runs them; `python -m pytest tests/fault_drill.py` runs them alone.
from fault_drill import test_kill_and_preempt_then_resume_equals_uninterrupted  # noqa: E402,F401
