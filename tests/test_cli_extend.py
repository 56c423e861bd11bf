"""Extending a finished run with a larger step or epoch budget: with a constant learning rate it
ends bitwise equal to one run with the larger budget; with a cosine the remaining steps follow
the new total's schedule (docs/cli.md); other changes stay refused."""

import json
import logging

import chex
import pytest
from safetensors.numpy import load_file

from ogpsa_jax.cli import EXIT_BAD_INPUT, main
from ogpsa_jax.overrides import apply_overrides
from ogpsa_jax.train import preset
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.optimizer import make_schedule
from ogpsa_jax.train.run_dir import check_output_dir

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

TIMING = {"tokens_per_s", "refresh_s"}


def train(out, *args):
    return main(["train", "sft", "--preset", "tiny", "--output-dir", str(out), *args])


def records(out):
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")
    ]


def weights(out):
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.slow
def test_extending_with_a_constant_rate_equals_one_longer_run(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    const = ["--set", "sft.schedule=constant"]
    ext, one = tmp_path / "extended", tmp_path / "one"
    assert train(ext, *const, "--max-steps", "3") == 0
    assert train(ext, *const, "--max-steps", "6") == 0  # refresh before 5, checkpoint at 4
    assert train(one, *const, "--max-steps", "6") == 0
    assert records(ext) == records(one) and [r["step"] for r in records(ext)] == [1, 2, 3, 4, 5, 6]
    chex.assert_trees_all_equal(weights(ext), weights(one))
    record = json.loads((ext / "config.json").read_text())
    assert record["config"]["sft"]["max_steps"] == 6
    (entry,) = record["extensions"]
    assert entry["changes"] == ["sft.max_steps: 3 -> 6"]
    change = entry["stages"]["sft"]
    assert (change["from_step"], change["old_total"], change["new_total"]) == (3, 3, 6)
    assert "constant learning rate 0.003, unchanged" in change["schedule"]
    assert json.loads((ext / "done.json").read_text())["step"] == 6
    assert "sft: step budget 3 -> 6 at step 3" in caplog.text
    assert "extending the run" in caplog.text


@pytest.mark.slow
def test_extending_the_epochs_of_a_cosine_run_follows_the_new_schedule(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"  # tiny: 4 steps per epoch (64 rows // 8 // 2 accumulated)
    assert train(out, "--set", "sft.epochs=1") == 0
    assert "sft: 4 steps: 1 epoch x 4 steps per epoch" in caplog.text
    before = records(out)
    assert train(out, "--set", "sft.epochs=2") == 0
    after = records(out)
    assert after[:4] == before and [r["step"] for r in after] == list(range(1, 9))
    cfg = apply_overrides(preset("tiny"), ["sft.epochs=2"]).sft
    # the documented rule: steps 1-4 followed the 4-step cosine, steps 5-8 the 8-step cosine
    old, new = make_schedule(cfg, 4), make_schedule(cfg, 8)
    for r in after:
        sched = old if r["step"] <= 4 else new
        assert r["learning_rate"] == pytest.approx(float(sched(r["step"] - 1)), rel=1e-6)
    assert after[4]["learning_rate"] > before[3]["learning_rate"]  # the jump of the rule
    record = json.loads((out / "config.json").read_text())
    (entry,) = record["extensions"]
    assert entry["changes"] == ["sft.epochs: 1 -> 2"]
    assert entry["stages"]["sft"]["schedule"].startswith(
        "step budget 4 -> 8 at step 4: cosine re-spread over 8 steps; steps 5-8 follow it"
    )
    assert "sft: done after 8 steps (2 epochs x 4 steps per epoch" in caplog.text
    # the same command again: complete, nothing rewritten; a smaller budget is refused
    assert train(out, "--set", "sft.epochs=2") == 0
    assert records(out) == after
    assert train(out, "--set", "sft.epochs=1") == EXIT_BAD_INPUT
    assert json.loads((out / "config.json").read_text()) == record


def fake_run(tmp_path, command, config, *, dpo_started=False):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"command": command, "config": config}))
    if dpo_started:
        (out / "done.json").write_text(json.dumps({"step": 2, "skips": 0}))
    return out


def test_only_larger_budgets_extend(tmp_path):
    base = {"sft": {"max_steps": 3, "epochs": 2, "learning_rate": 0.1}, "dpo": {"max_steps": 0}}
    out = fake_run(tmp_path, "sft", base)

    def plan(**changes):
        cfg = json.loads(json.dumps(base))
        for key, value in changes.items():
            stage, field = key.split("__")
            cfg[stage][field] = value
        return check_output_dir(str(out), {"command": "sft", "config": cfg}, overwrite=False)

    assert plan().action == "resume"
    assert plan(sft__max_steps=5).changes == ["sft.max_steps: 3 -> 5"]
    assert plan(sft__max_steps=0).action == "extend"  # 0 = no step cap: larger
    assert plan(sft__epochs=3, sft__max_steps=4).action == "extend"
    for bad in (dict(sft__max_steps=2), dict(sft__epochs=1), dict(sft__learning_rate=0.2)):
        with pytest.raises(ValueError, match="different config.*only a larger step or epoch"):
            plan(**bad)
    with pytest.raises(ValueError, match="different config"):
        plan(dpo__max_steps=4)  # 0 (no cap) -> 4 is smaller


def test_sft_of_an_sft_dpo_run_cannot_be_extended_once_dpo_started(tmp_path):
    base = {"sft": {"max_steps": 3}, "dpo": {"max_steps": 3}}
    out = fake_run(tmp_path, "sft-dpo", base, dpo_started=True)
    cfg = {"sft": {"max_steps": 5}, "dpo": {"max_steps": 3}}
    with pytest.raises(ValueError, match="SFT stage .* cannot be extended: its DPO stage"):
        check_output_dir(str(out), {"command": "sft-dpo", "config": cfg}, overwrite=False)
    cfg = {"sft": {"max_steps": 3}, "dpo": {"max_steps": 5}}
    record = {"command": "sft-dpo", "config": cfg}
    assert check_output_dir(str(out), record, overwrite=False).action == "extend"
