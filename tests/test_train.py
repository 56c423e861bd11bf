"""Training loop tests on the tiny preset with 8 virtual CPU devices.

Runs are short (4 steps) and shared through module fixtures; together they check that losses
fall, a 2x4-sharded run equals a one-device run, one seed gives bitwise-identical results, a
SIGTERM-stopped run resumes to exactly the uninterrupted result, non-finite steps are skipped
and counted, the final folder loads with ``load_hf``, and (with plain SGD) the applied update is
orthogonal to the capability basis on every projected leaf.
"""

import dataclasses
import math
import os
import re
import signal

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import ogpsa_jax as og
from ogpsa_jax.bases import capability_basis
from ogpsa_jax.models import init_random, load_hf, make_mesh, tiny_config
from ogpsa_jax.projection import get_basis, set_basis
from ogpsa_jax.testing import inject_nonfinite, poisoning_loss, with_poison
from ogpsa_jax.train import (
    EXIT_PREEMPTED,
    DPOConfig,
    NonFiniteError,
    StageConfig,
    apply_overrides,
    make_optimizer,
    make_train_step,
    preset,
    train,
)
from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.losses import token_nll
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.step import dpo_micro_loss, logits_logps, sft_micro_loss

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

TIMING_KEYS = {"tokens_per_s", "refresh_s"}


def tiny_cfg(*extra):
    return apply_overrides(
        preset("tiny"),
        [
            "sft.max_steps=4",
            "sft.ogpsa.refresh_every=3",
            "dpo.max_steps=4",
            "checkpoint_every=100",
            *extra,
        ],
    )


def final_params(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def ckpt_state(run_dir, step):
    path = os.path.join(run_dir, "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(os.path.abspath(path))


def metric_records(run_dir):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    ]


NAN_AT = (2,)  # fault drill in every run here: step 2 of each stage gets a NaN gradient


def train_with_nan(*args, **kwargs):
    """`train` with a NaN gradient injected at the steps NAN_AT of every stage."""
    with inject_nonfinite(NAN_AT):
        return train(*args, **kwargs)


@pytest.fixture(scope="module")
def sft_dpo_run(tmp_path_factory):
    """One sft-dpo run on a 2x4 mesh: SFT stage in DIR/sft, DPO stage in DIR."""
    out = tmp_path_factory.mktemp("sft_dpo")
    result = train_with_nan("sft-dpo", tiny_cfg("mesh=2,4,1"), out)
    return out, result


@pytest.fixture(scope="module")
def sharded_run(sft_dpo_run):
    out, _ = sft_dpo_run
    return out / "sft", None


def test_sft_loss_falls_and_final_loads(sharded_run):
    out, _ = sharded_run
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert [r["skipped"] for r in recs] == [0, 1, 0, 0]  # the injected NaN step
    assert recs[1]["loss"] == "nan" and recs[3]["skips"] == 1
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.05, [r["loss"] for r in recs]
    # The basis was refreshed before steps 1 and 4 and the reference loss logged there.
    assert "ref_loss" in recs[0] and "ref_loss" in recs[3] and "ref_loss" not in recs[1]
    # Projection invariant on the raw gradient: <Pg, u_i> ~ 0 (float32 sums over ~1e4 terms).
    ok = [r for r in recs if not r["skipped"]]
    assert all(r["residual_max"] < 1e-5 * max(r["grad_norm"], 1.0) for r in ok)
    assert all(0.0 <= r["frac_removed"] <= 1.0 for r in ok)
    model = load_hf(out / "final", dtype=jnp.float32)
    saved = final_params(out)
    chex.assert_trees_all_close(
        np.asarray(model.embed_tokens[...]), saved["model.embed_tokens.weight"], rtol=0, atol=0
    )
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (out / "final" / name).is_file()


def test_one_device_equals_sharded(sharded_run, tmp_path):
    out, _ = sharded_run
    single = tmp_path / "single"
    train_with_nan("sft", tiny_cfg("num_devices=1", "mesh=1,1,1"), single)
    a, b = final_params(out), final_params(single)
    assert a.keys() == b.keys()
    # Different reduction orders across 8 shards vs 1: float32 round-off, amplified a little by
    # Adam's normalisation over 4 steps of lr 3e-3.
    chex.assert_trees_all_close(a, b, rtol=1e-4, atol=2e-5)
    la = [r["loss"] for r in metric_records(out) if not r["skipped"]]
    lb = [r["loss"] for r in metric_records(single) if not r["skipped"]]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_preempted_resume_equals_uninterrupted_bitwise(sharded_run, tmp_path):
    out, _ = sharded_run
    run = tmp_path / "resumed"
    cfg = tiny_cfg("mesh=2,4,1")

    def sigterm_at_2(step, metrics):
        if step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train_with_nan("sft", cfg, run, step_callback=sigterm_at_2)
    assert first.preempted and first.step == 2 and EXIT_PREEMPTED == 75
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]
    assert not (run / "final").exists()
    second = train_with_nan("sft", cfg, run)
    assert second.step == 4 and not second.preempted
    # Same seed, same device count: bitwise identical params, opt state (basis included) and
    # metrics, although the second half ran in a new process state from a checkpoint.
    chex.assert_trees_all_equal(final_params(out), final_params(run))
    chex.assert_trees_all_equal(ckpt_state(out, 4), ckpt_state(run, 4))
    assert metric_records(out) == metric_records(run)


def test_dpo_loss_falls_and_nonfinite_step_is_skipped(sft_dpo_run):
    out, res = sft_dpo_run
    assert res.step == 4
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["skipped"] for r in recs] == [0, 1, 0, 0]
    assert [r["skips"] for r in recs] == [0, 1, 1, 1]
    assert recs[1]["loss"] == "nan"
    assert recs[-1]["loss"] < recs[0]["loss"] - 0.05
    assert recs[-1]["accuracy"] > 0.5 and recs[-1]["margins"] > 0
    for r in recs:
        if r["skipped"] == 0:
            assert np.isfinite(r["grad_norm"])
    params = final_params(out)
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_sft_then_dpo_starts_from_and_references_the_sft_model(sft_dpo_run):
    run, res = sft_dpo_run
    assert res.final_dir == str(run / "final") and (run / "sft" / "final").is_dir()
    recs = read_metrics(run / "metrics.jsonl")
    # DPO starts at the SFT weights with the SFT model as reference: h = 0, loss = log 2.
    assert recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert recs[0]["margins"] == pytest.approx(0.0, abs=1e-4)
    assert (run / "final" / "model.safetensors").is_file()


def _tiny_model_and_batch(seed=0):
    model = init_random(tiny_config(vocab_size=101), seed=seed, dtype=jnp.float32)
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 101, size=(2, 3, 19)).astype(np.int32)  # [A, B, L], odd sizes
    attn = np.ones_like(ids)
    attn[:, :, 15:] = 0
    loss = attn.copy()
    loss[:, :, :5] = 0
    return model, {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def test_sgd_update_is_orthogonal_to_basis_and_nan_is_skipped():
    model, batch = _tiny_model_and_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = lambda p, ids, attn: nnx.merge(graphdef, p, rest)(ids, attn)
    stage = StageConfig(optimizer="sgd", learning_rate=0.5, max_grad_norm=1.0, schedule="constant")
    stage = dataclasses.replace(stage, ogpsa=dataclasses.replace(stage.ogpsa, k=3))
    opt = make_optimizer(stage, total_steps=10)

    @jax.jit
    def make_basis(p):
        # Three random "reference gradients" (fresh random trees), orthonormalised per leaf.
        keys = jax.random.split(jax.random.key(7), 3)
        refs = [jax.tree.map(lambda x, k=k: jax.random.normal(k, x.shape), p) for k in keys]
        return capability_basis(refs, k=3, method="svd")

    basis = make_basis(params)
    opt_state = set_basis(opt.init(params), basis)
    step = jax.jit(make_train_step(sft_micro_loss(logits_logps(apply_fn)), opt))
    new, new_opt, m = step(params, opt_state, batch, None)
    # The naive step: the same program with the initial all-zero basis (projects nothing).
    plain, _, _ = step(params, opt.init(params), batch, None)
    assert int(m["skipped"]) == 0 and 0 < float(m["frac_removed"]) < 1

    @jax.jit
    def dots(basis, new, plain, old):
        """max over leaves and directions of |<u_i, update>| (projected and naive), norms."""
        upd, naive = jax.tree.map(jnp.subtract, new, old), jax.tree.map(jnp.subtract, plain, old)
        norm = lambda t: jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(t)))
        worst = lambda t: jnp.max(
            jnp.stack(
                [
                    jnp.abs(jnp.sum(u * d))
                    for tree in basis
                    for u, d in zip(jax.tree.leaves(tree), jax.tree.leaves(t), strict=True)
                ]
            )
        )
        return worst(upd), norm(upd), worst(naive), norm(naive)

    worst, unorm, worst_naive, nnorm = map(float, dots(get_basis(new_opt), new, plain, params))
    assert unorm > 1e-3
    # float32 dots over <= 3e4 terms: round-off ~1e-7 of the update norm; the unprojected SGD
    # step has components along the basis many orders larger (so this check can fail).
    assert worst <= 1e-5 * unorm, worst
    assert worst_naive > 1e-3 * nnorm, worst_naive
    # A NaN-poisoned step (the same step with `ogpsa_jax.testing`'s poisoning loss) changes
    # nothing and names the first bad leaf.
    poisoned = jax.jit(make_train_step(poisoning_loss(sft_micro_loss(logits_logps(apply_fn))), opt))
    same, same_opt, m2 = poisoned(new, new_opt, with_poison(batch, np.nan), None)
    assert int(m2["skipped"]) == 1 and int(m2["first_nonfinite_leaf"]) == 0
    chex.assert_trees_all_equal(same, new)
    chex.assert_trees_all_equal(same_opt, new_opt)


def _alias_of(stage, total_steps):
    """The tiny preset's SFT optimiser written by a user from the public API alone."""
    assert stage.optimizer == "adamw" and stage.schedule == "cosine" and not stage.warmup_steps
    schedule = optax.cosine_decay_schedule(stage.learning_rate, total_steps)
    return og.ogpsa_adamw(schedule, k=stage.ogpsa.k, max_grad_norm=stage.max_grad_norm)


def test_users_own_loop_with_the_public_alias_equals_the_cli_step():
    stage = preset("tiny").sft  # AdamW, clip 1.0, lr 3e-3 cosine, flat basis with k = 2
    model, batch = _tiny_model_and_batch()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = lambda p, ids, attn: nnx.merge(graphdef, p, rest)(ids, attn)
    refs = [jax.tree.map(lambda x, i=i: jnp.sin(x + i), params) for i in range(3)]
    basis = jax.jit(lambda r: capability_basis(r, k=2, method="svd"))(refs)

    # The user's loop: ogpsa_adamw + set_basis, gradients accumulated over the micro-batches
    # and divided once by the token count (the token-mean NLL of the step's batch).
    tx = _alias_of(stage, total_steps=10)
    user_state = og.set_basis(tx.init(params), basis)

    @jax.jit
    def user_step(p, state):
        def nll(p, micro):
            logits = apply_fn(p, micro["input_ids"], micro["attention_mask"])
            return token_nll(logits, micro["input_ids"], micro["loss_mask"])

        micros = [jax.tree.map(lambda x, a=a: x[a], batch) for a in range(2)]
        grads = [jax.grad(lambda p, m=m: nll(p, m)[0])(p) for m in micros]
        count = sum(nll(p, m)[1] for m in micros)
        g = jax.tree.map(lambda a, b: (a + b) / count, *grads)
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state

    user_params, user_state = user_step(params, user_state)

    # The CLI's step, from the stage config: its optimiser state IS the alias's.
    opt = make_optimizer(stage, total_steps=10)
    cli_state = og.set_basis(opt.init(params), basis)
    assert jax.tree.structure(cli_state) == jax.tree.structure(user_state)
    step = jax.jit(make_train_step(sft_micro_loss(logits_logps(apply_fn)), opt))
    cli_params, cli_state, m = step(params, cli_state, batch, None)
    assert int(m["skipped"]) == 0 and 0 < float(m["frac_removed"]) < 1
    # Same math; the accumulation runs in a lax.scan in the step and unrolled here, so float32
    # round-off may differ (measured: 4e-9): 1e-6 is 1/3000 of one step's learning rate (each
    # AdamW update is about lr = 3e-3 per element on a first step).
    moved = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(cli_params), jax.tree.leaves(params), strict=True)
    )
    assert moved > 1e-3
    chex.assert_trees_all_close(cli_params, user_params, rtol=0, atol=1e-6)
    chex.assert_trees_all_close(cli_state, user_state, rtol=1e-5, atol=1e-9)


def test_checkpointed_opt_state_is_the_public_alias_state(sharded_run):
    """A checkpoint written by `ogpsa train` restores into ``ogpsa_adamw(...)``'s state and
    continues in a user's own loop."""
    out, _ = sharded_run
    cfg = tiny_cfg()
    _, params, _ = nnx.split(load_hf(out / "final", dtype=jnp.float32), nnx.Param, ...)
    tx = _alias_of(cfg.sft, total_steps=4)
    alias_state = jax.jit(tx.init)(params)
    step, meta = ckpt.read_meta(out / "checkpoints")
    assert step == 4 and meta["opt_shapes"] == ckpt.shapes_of(alias_state)
    manager = ckpt.open_manager(out / "checkpoints", max_to_keep=2)
    try:
        _, restored, _ = ckpt.restore(
            manager, 4, ckpt.abstract_like(params), ckpt.abstract_like(alias_state)
        )
    finally:
        manager.close()
    assert jax.tree.structure(restored) == jax.tree.structure(alias_state)
    assert isinstance(restored[0], og.OGPSAState) and int(restored[-1][0].count) == 3
    u = get_basis(restored)  # the basis refreshed before step 4 (k = 2 directions per leaf)
    u_embed = jax.tree.leaves(u[0]["embed_tokens"])[0]
    assert float(jnp.linalg.norm(u_embed)) == pytest.approx(1.0, abs=1e-5)
    g = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(g, restored, params)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(updates))


def test_nonfinite_stop_names_step_and_path(tmp_path):
    cfg = tiny_cfg("on_nonfinite=stop", "sft.max_steps=1", "sft.ogpsa.enabled=false")
    with pytest.raises(NonFiniteError, match=r"sft step 1: non-finite gradient at parameter"):
        with inject_nonfinite((1,)):
            train("sft", cfg, tmp_path / "stop")


# Explicit mesh axes (`mesh_axis_type=explicit`): sharding is part of every array's type, so the
# step, the loss's gather, the scan carry, the skip branch and the basis refreshes must all
# produce the shardings they promise. The same runs on Auto axes are the reference (same math in
# other reduction orders): metrics to 1e-4 relative, params to 3e-4 (a tenth of one SFT step's
# learning rate, 3e-3; measured differences up to 7e-5).
# Between them the two runs cover the three kinds of basis refresh: the first an activation
# basis (its capture program) in SFT and a Gram-Schmidt flat basis in DPO, the second a
# per-matrix gradient basis.
@pytest.mark.parametrize(
    "command,extra",
    [
        (
            "sft-dpo",
            (
                "sft.ogpsa.method=activation",
                "sft.ogpsa.energy=0.9",
                "sft.max_steps=1",
                "dpo.ogpsa.method=gram_schmidt",
            ),
        ),
        ("sft", ("sft.ogpsa.method=gradient", "sft.max_steps=1")),
    ],
    ids=["sft-dpo", "gradient"],
)
def test_explicit_mesh_training_matches_auto(tmp_path, command, extra):
    runs = {}
    for mode in ("auto", "explicit"):
        cfg = tiny_cfg(
            f"mesh_axis_type={mode}", "mesh=2,2,2", "sft.max_steps=2", "dpo.max_steps=2", *extra
        )
        train(command, cfg, tmp_path / mode)
        runs[mode] = (
            read_metrics(tmp_path / mode / "metrics.jsonl"),
            final_params(tmp_path / mode),
        )
    (m_auto, p_auto), (m_expl, p_expl) = runs["auto"], runs["explicit"]
    assert len(m_auto) == len(m_expl) >= 1
    for a, b in zip(m_auto, m_expl, strict=True):
        for key in ("loss", "grad_norm", "frac_removed"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (key, a, b)
        assert b["residual_max"] <= 1e-5 * b["grad_norm"] + 1e-7, b
    assert p_auto.keys() == p_expl.keys()
    for name in p_auto:
        np.testing.assert_allclose(
            p_expl[name].astype(np.float32), p_auto[name].astype(np.float32), rtol=0, atol=3e-4
        )


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_sharded_train_steps_lower_for_gpu_and_tpu(platform, axis_type):
    """The SFT and DPO steps (OGPSA k = 2 + clip + AdamW, bf16 compute, batch over data x fsdp,
    params over fsdp x tensor on a 2x2x2 mesh) lower for GPU and TPU through `jax.export` with no
    device there: no CPU-only custom call, 8 devices, and every params / opt-state buffer
    donated (updated in place on the accelerator)."""
    mesh = make_mesh((2, 2, 2), axis_type=axis_type)
    model = init_random(tiny_config(vocab_size=98), seed=0, dtype=jnp.bfloat16, mesh=mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    apply_fn = lambda p, ids, attn: nnx.merge(graphdef, p, rest)(ids, attn)
    stage = DPOConfig(ogpsa=StageConfig().ogpsa)  # the SFT stage's OGPSA (k = 2) on both steps
    assert stage.ogpsa.enabled and stage.ogpsa.k == 2
    opt = make_optimizer(stage, total_steps=10)
    ids = np.random.default_rng(0).integers(3, 98, size=(2, 8, 16)).astype(np.int32)
    rows = lambda x: jax.device_put(  # noqa: E731
        x, NamedSharding(mesh, P(None, ("data", "fsdp"), *([None] * (x.ndim - 2))))
    )
    sft_batch = {k: rows(v) for k, v in dict(input_ids=ids, attention_mask=ids > 0).items()}
    sft_batch["attention_mask"] = sft_batch["attention_mask"].astype(jnp.int32)
    sft_batch["loss_mask"] = sft_batch["attention_mask"]
    dpo_batch = dict(sft_batch, ref_logps=rows(np.zeros((2, 8), np.float32)))
    with jax.set_mesh(mesh):
        opt_state = jax.jit(opt.init)(params)
        n_donated = len(jax.tree.leaves((params, opt_state)))
        for loss, batch in (
            (sft_micro_loss(logits_logps(apply_fn)), sft_batch),
            (dpo_micro_loss(logits_logps(apply_fn), stage), dpo_batch),
        ):
            step = jax.jit(make_train_step(loss, opt), donate_argnums=(0, 1))
            exported = jax.export.export(step, platforms=[platform])(params, opt_state, batch, None)
            text = exported.mlir_module()
            assert exported.platforms == (platform,) and exported.nr_devices == 8
            targets = re.findall(r"custom_call @([\w.]+)", text)
            cpu_only = [t for t in targets if re.search(r"cpu|lapack|ducc|onednn|ynn", t, re.I)]
            assert not cpu_only, cpu_only
            main = text[text.index("func.func public @main") :]
            signature = main[: main.index("{\n")]
            donated = signature.count("tf.aliasing_output") + signature.count("jax.buffer_donor")
            assert donated == n_donated, (donated, n_donated)
