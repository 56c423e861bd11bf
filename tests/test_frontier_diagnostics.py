"""Why OGPSA works or not, on the tiny model: the share of the applied update (after AdamW) in
the capability span, the projection placed after AdamW (Adam-NSCL), the reference loss's
measured change between refreshes against its first-order prediction, and export_at."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import ogpsa_jax as og
from ogpsa_jax.overrides import apply_overrides
from ogpsa_jax.projection import span_share
from ogpsa_jax.train import preset, train
from ogpsa_jax.train.first_order import FirstOrder
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.optimizer import make_optimizer
from ogpsa_jax.train.validation import validate


def _cfg(*extra):
    return apply_overrides(
        preset("tiny"),
        [
            "sft.max_steps=4",
            "sft.ogpsa.refresh_every=2",
            "sft.ogpsa.method=gram_schmidt",
            "checkpoint_every=0",
            *extra,
        ],
    )


def _metrics(run):
    return read_metrics(os.path.join(run, "metrics.jsonl"))


def test_span_share_flat_and_matrix():
    u = {"w": jnp.array([0.6, 0.8, 0.0])}
    state = og.set_basis(og.ogpsa(1).init({"w": jnp.zeros(3)}), (u,))
    g = {"w": jnp.array([1.0, 0.0, 1.0])}
    assert float(span_share(g, state)) == pytest.approx(0.36 / 2.0, rel=1e-6)
    mstate = og.set_basis(
        og.ogpsa_matrix(1).init({"w": jnp.zeros((2, 3))}), {"w": u["w"][:2, None]}
    )
    gm = {"w": jnp.ones((2, 3))}  # V^T g = 1.4 per column, 3 columns; ||g||^2 = 6
    assert float(span_share(gm, mstate)) == pytest.approx(3 * 1.4**2 / 6.0, rel=1e-6)
    assert float(span_share(g, optax.EmptyState())) == 0.0


def test_placement_after_projects_the_applied_update(tmp_path):
    span = "sft.ogpsa.update_in_span=true"
    before = train("sft", _cfg(span), tmp_path / "before", overwrite=True)
    cfg_after = _cfg("sft.ogpsa.placement=after", span)
    after = train("sft", cfg_after, tmp_path / "after", overwrite=True)
    mb, ma = _metrics(before.output_dir), _metrics(after.output_dir)
    assert len(mb) == len(ma) == 4
    # AdamW puts part of the removed directions back; projecting its update leaves none
    assert max(r["update_in_span"] for r in mb) > 1e-4
    assert max(r["update_in_span"] for r in ma) < 1e-6
    assert all(r["residual_max"] < 1e-5 for r in ma)
    fb = load_file(os.path.join(before.final_dir, "model.safetensors"))
    fa = load_file(os.path.join(after.final_dir, "model.safetensors"))
    assert any(not np.allclose(fb[k], fa[k]) for k in fb)
    # the metric is opt-in: without it the step computes nothing for it
    assert "update_in_span" not in _metrics(train("sft", _cfg(), tmp_path / "plain").output_dir)[0]
    assert (
        make_optimizer(cfg_after.sft, 4).span_metric
        and not make_optimizer(_cfg().sft, 4).span_metric
    )
    opt = make_optimizer(_cfg("sft.ogpsa.placement=after").sft, total_steps=4)
    state = opt.init({"w": jnp.zeros(2)})
    proj, rest = opt.split(state)
    assert type(proj).__name__ == "OGPSAState" and opt.join(proj, rest) == state
    with pytest.raises(ValueError, match="placement"):
        validate(_cfg("sft.ogpsa.placement=sideways"), "sft", 1)
    with pytest.raises(ValueError, match="full fine-tuning"):
        validate(_cfg("sft.ogpsa.placement=after", "model.lora.rank=4"), "sft", 1)


def test_first_order_prediction_is_logged_between_refreshes(tmp_path):
    result = train("sft", _cfg("sft.ogpsa.first_order=true"), tmp_path / "fo", overwrite=True)
    rows = _metrics(result.output_dir)
    refreshes = [r for r in rows if "ref_loss" in r]
    assert [r["step"] for r in refreshes] == [1, 3]
    assert "ref_loss_change" not in refreshes[0]
    second = refreshes[1]
    assert second["ref_loss_change"] == pytest.approx(
        second["ref_loss"] - refreshes[0]["ref_loss"], abs=1e-5
    )
    assert np.isfinite(second["ref_loss_predicted"]) and second["ref_loss_predicted"] != 0.0
    with pytest.raises(ValueError, match="first_order"):
        validate(_cfg("sft.ogpsa.first_order=true", "sft.ogpsa.method=activation"), "sft", 1)


def test_first_order_exact_on_a_linear_loss():
    fo = FirstOrder()
    g = [{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 0.0])}]
    assert fo({"w": jnp.zeros(2)}, g, [1.0, 3.0], 0.0) == {}
    # token-weighted mean gradient (1*[1,2] + 3*[3,0]) / 4 = [2.5, 0.5]; step [0.2, -0.4]
    out = fo({"w": jnp.array([0.2, -0.4])}, g, [1.0, 3.0], 0.3)
    assert out == {"ref_loss_change": 0.3, "ref_loss_predicted": pytest.approx(0.3)}


def test_export_at_writes_the_intermediate_models(tmp_path):
    result = train("sft", _cfg("export_at=1,3", "sft.ogpsa.enabled=false"), tmp_path / "e")
    run = result.output_dir
    assert sorted(p for p in os.listdir(run) if p.startswith("step-")) == ["step-1", "step-3"]
    s1 = load_file(os.path.join(run, "step-1", "model.safetensors"))
    s3 = load_file(os.path.join(run, "step-3", "model.safetensors"))
    final = load_file(os.path.join(run, "final", "model.safetensors"))
    assert any(not np.array_equal(s1[k], s3[k]) for k in s1)
    assert any(not np.array_equal(s3[k], final[k]) for k in s3)
    with pytest.raises(ValueError, match="export_at"):
        validate(_cfg("export_at=0"), "sft", 1)
