"""The alignment-tax demo end to end on the tiny model, its wiring, and the paper configs.

One module-scoped scaled-down demo (tiny random model + tiny tokenizer, a few prompts of each
real set, two steps per stage) goes through the same code path as ``make demo``
(``ogpsa experiment demo`` -> ``python -m experiments.demo`` -> ``run_demo``); the other tests
check its outputs and the pieces it is built from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments import demo, paper
from ogpsa_jax import cli, experiment_runner, models
from ogpsa_jax.eval import KeywordJudge, default_judge, normalise_prompt
from ogpsa_jax.experiment import report, targets
from ogpsa_jax.experiment.averaging import average_models, average_params
from ogpsa_jax.overrides import apply_overrides

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

# Two trained runs cover every code path: naive SFT, OGPSA SFT and an OGPSA DPO stage that
# starts from (and references) the OGPSA SFT output; weight averaging mixes start <-> naive SFT.
OVERRIDES = ("runs=naive:sft,ogpsa:sft-dpo", "alphas=0.5")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    sets = [a for o in OVERRIDES for a in ("--set", o)]
    # the command line `make demo` uses, through the `ogpsa experiment` forwarder
    assert cli.main(["experiment", "demo", "--tiny", "--out", str(out), *sets]) == 0
    config = apply_overrides(demo.tiny_config(), OVERRIDES)
    assert config.runs == ("naive:sft", "ogpsa:sft-dpo") and config.alphas == (0.5,)
    return config, out


def _train_phases(timings, run):
    """The training phases whose wall time a run's ``seconds`` is made of."""
    tags = ("sft", "sft-dpo") if run["pipeline"] == "sft-dpo" else (run["pipeline"],)
    return [timings[f"train {run['method']} {tag}"]["wall_s"] for tag in tags]


def test_outputs_schema_and_ranges(tiny_demo):
    config, out = tiny_demo
    data = json.loads((out / "results.json").read_text())
    runs = data["runs"]
    timings, total = data["meta"]["timings"], data["meta"]["total_seconds"]
    assert [(r["method"], r["pipeline"]) for r in runs] == [
        ("start", "none"),
        ("naive", "sft"),
        ("ogpsa", "sft-dpo"),
        ("weight-avg", "sft"),
    ]
    for r in runs:
        assert set(report.RUN_FIELDS) <= set(r)
        for f in ("safety", "over_refusal", "capability", "gsm8k", "bbq"):
            assert 0.0 <= r[f] <= 1.0, (f, r[f])
        # capability is defined as the mean of the two accuracies
        assert r["capability"] == pytest.approx((r["gsm8k"] + r["bbq"]) / 2, abs=1e-12)
        assert math.isfinite(r["drift"]) and r["drift"] > 0.0
        if r["method"] in ("start", "weight-avg"):
            assert r["seconds"] == 0.0  # nothing trained
        else:
            # a run's training time is the wall time of its stage phases (each rounded to
            # 0.01 s in the table; the phase also holds the run's timing file write)
            phases = _train_phases(timings, r)
            assert 0.0 < r["seconds"] <= total
            assert sum(phases) - 0.5 <= r["seconds"] <= sum(phases) + 0.01 * len(phases)
    steps = {(r["method"], r["pipeline"]): r["steps"] for r in runs}
    assert steps[("start", "none")] == 0
    assert steps[("naive", "sft")] == config.sft_steps
    assert steps[("ogpsa", "sft-dpo")] == config.sft_steps + config.dpo_steps
    assert runs[-1]["alpha"] == 0.5
    # accuracies are fractions of the item counts that were evaluated
    sizes = data["meta"]["set_sizes"]
    for r in runs:
        assert round(r["gsm8k"] * sizes["gsm8k"], 9) == round(r["gsm8k"] * sizes["gsm8k"])
        assert round(r["bbq"] * sizes["bbq"], 9) == round(r["bbq"] * sizes["bbq"])
    assert sizes["harmful"] == config.harmful and sizes["bbq"] == config.bbq
    assert data["meta"]["judge"].startswith(default_judge().name)
    md = (out / "results.md").read_text()
    for label in ("| start |", "| naive sft |", "| ogpsa sft-dpo |", "| weight-avg a=0.50 |"):
        assert label in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_phase_timings_and_no_recompile(tiny_demo):
    _, out = tiny_demo
    meta = json.loads((out / "results.json").read_text())["meta"]
    timings = meta["timings"]
    for name in ("train naive sft", "train ogpsa sft", "train ogpsa sft-dpo"):
        assert timings[name]["wall_s"] > 0.0 and timings[name]["compiles"] > 0, name
        assert set(meta["stage_breakdown"][name]) == {"first_step_s", "steps_s", "refresh_s"}
    assert meta["stage_breakdown"]["train naive sft"]["refresh_s"] == 0.0  # no basis
    assert meta["stage_breakdown"]["train ogpsa sft"]["refresh_s"] > 0.0
    labels = ["start:none", "naive:sft", "ogpsa:sft-dpo", "weight-avg:sft:0.5"]
    parts = ("generation", "gsm8k-mc", "bbq", "ifeval", "choice", "drift")
    runs = {
        f"{r['method']}:{r['pipeline']}" + (f":{r['alpha']}" if "alpha" in r else ""): r
        for r in json.loads((out / "results.json").read_text())["runs"]
    }
    for label in labels:
        walls = [timings[f"eval {label}: {part}"]["wall_s"] for part in parts]
        assert all(w > 0.0 for w in walls), (label, walls)  # each part ran, inside its phase
        # the evaluation's own clock covers its parts plus judging (milliseconds)
        eval_s = runs[label]["eval_seconds"]
        assert sum(walls) - 0.01 * len(parts) <= eval_s <= sum(walls) + 1.0, (label, eval_s)
    # Phases do not overlap and cover the run: their wall times add up to the total, less the
    # untimed glue (writing data files, logging), within the table's rounding.
    covered = sum(row["wall_s"] for row in timings.values())
    assert 0.8 * meta["total_seconds"] <= covered <= meta["total_seconds"] + 0.01 * len(timings)
    # The first evaluation compiles; every later model has the same graph and shapes, so its
    # evaluation must reuse the compiled programs (no XLA compile at all).
    assert sum(timings[f"eval start:none: {p}"]["compiles"] for p in parts) > 0
    for label in labels[1:]:
        assert [timings[f"eval {label}: {p}"]["compiles"] for p in parts] == [0] * len(parts), label
    assert meta["total_cpu_seconds"] > 0.0
    # demo stages write no orbax checkpoint, only the final export
    for run in (out / "cache" / "runs").iterdir():
        assert not list((run / "checkpoints").iterdir()), run
        assert (run / "final" / "config.json").is_file()


def test_gpm_run_config():
    config = demo.default_config()
    cfg = demo.stage_train_config(
        config,
        method="ogpsa-gpm",
        stage="sft",
        model_dir="m",
        data="d.jsonl",
        reference=("a.jsonl", "b.jsonl"),
        n_rows=96,
    )
    og = cfg.sft.ogpsa
    assert (og.enabled, og.method, og.k, og.energy) == (True, "activation", 32, 0.97)
    assert og.capture_rows == config.gpm_rows and cfg.checkpoint_every == 0
    naive = demo.stage_train_config(
        config, method="naive", stage="dpo", model_dir="m", data="d", reference=("a",), n_rows=9
    )
    assert not naive.dpo.ogpsa.enabled
    assert "ogpsa-gpm:sft-dpo" in demo.full_config().runs
    with pytest.raises(ValueError, match="gpm_energy"):
        demo.validate(dataclasses.replace(config, gpm_energy=1.5))


def _run_dir(cache, name):
    # run folders are named METHOD-PIPELINE-HASH (a hash of the data they train on)
    (path,) = [
        p for p in (cache / "runs").iterdir() if re.fullmatch(rf"{name}-[0-9a-f]{{8}}", p.name)
    ]
    return path


def test_training_moved_the_weights_and_data_files(tiny_demo):
    config, out = tiny_demo
    cache = out / "cache"
    start = models.load_hf(cache / "tiny-start-seed0", dtype=jnp.float32)
    naive = models.load_hf(_run_dir(cache, "naive-sft") / "final", dtype=jnp.float32)
    sp, tp = start.params(), naive.params()
    # frozen bottom layer unchanged (stop_gradient), a trained top layer changed
    f = config.frozen_layers
    chex.assert_trees_all_equal(sp["layers"]["q_proj"][:f], tp["layers"]["q_proj"][:f])
    assert float(jnp.max(jnp.abs(sp["layers"]["q_proj"][f:] - tp["layers"]["q_proj"][f:]))) > 0
    sft = [json.loads(x) for x in (cache / "data" / "sft.jsonl").read_text().splitlines()]
    assert len(sft) == config.sft_prompts
    assert all(r["response"] == targets.refusal_for(r["prompt"]) for r in sft)
    dpo = [json.loads(x) for x in (cache / "data" / "dpo.jsonl").read_text().splitlines()]
    cached = json.loads((cache / "start_answers_dpo.json").read_text())["value"]
    assert [r["rejected"] for r in dpo] == [a for a in cached if a.strip()]
    assert all(r["chosen"] in targets.REFUSAL_TEMPLATES for r in dpo)
    # the OGPSA run's basis refreshes were logged (one per step at refresh_every=1)
    metrics = (_run_dir(cache, "ogpsa-sft") / "metrics.jsonl").read_text().splitlines()
    assert sum("ref_loss" in json.loads(m) for m in metrics) == config.sft_steps


def test_held_out_sets_are_disjoint_from_training():
    sets = demo.select_prompts(demo.tiny_config())
    train = {normalise_prompt(r["prompt"]) for k in ("sft", "dpo", "reference") for r in sets[k]}
    for name in ("harmful", "over_refusal", "gsm8k", "bbq", "drift"):
        assert sets[name], name
        assert not train & {normalise_prompt(r["prompt"]) for r in sets[name]}, name
    # no Do-Not-Answer human_chatbox prompt is trained to be refused
    assert all("human_chatbox" not in r["id"] for r in sets["sft"] + sets["dpo"])
    assert {r["source"] for r in sets["harmful"]} == {"harmbench", "strongreject"}


@pytest.fixture(scope="module")
def two_models():
    cfg = models.tiny_config(vocab_size=101)
    a = models.init_random(cfg, seed=1, dtype=jnp.float32)
    b = models.init_random(cfg, seed=2, dtype=jnp.float32)
    return a, b


def test_weight_averaging_endpoints_exact(two_models):
    a, b = two_models
    sa, sb = nnx.state(a), nnx.state(b)
    chex.assert_trees_all_equal(nnx.state(average_models(a, b, 0.0)), sa)
    chex.assert_trees_all_equal(nnx.state(average_models(a, b, 1.0)), sb)
    mid = average_params(sa, sb, 0.3)
    expect = jax.tree.map(lambda x, y: 0.7 * np.asarray(x) + 0.3 * np.asarray(y), sa, sb)
    # float32 arithmetic vs float64 NumPy: one rounding of values ~0.02-1
    chex.assert_trees_all_close(mid, expect, rtol=1e-6, atol=1e-7)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 101, (3, 7)), jnp.int32)
    chex.assert_trees_all_equal(average_models(a, b, 0.0)(ids), a(ids))


def test_weight_averaging_rejects_bad_input(two_models):
    a, b = two_models
    with pytest.raises(ValueError, match="alpha"):
        average_params(nnx.state(a), nnx.state(b), 1.5)
    other = models.init_random(models.tiny_config(vocab_size=103), seed=0, dtype=jnp.float32)
    with pytest.raises(ValueError, match="mismatch"):
        average_models(a, other, 0.5)


def test_targets():
    assert all(KeywordJudge()(["q"] * 12, list(targets.REFUSAL_TEMPLATES)))
    prompts = [f"harmful request number {i}" for i in range(61)]
    used = {targets.refusal_for(p) for p in prompts}
    assert len(used) >= 8  # the hash spreads prompts over the templates
    assert targets.refusal_for(prompts[3]) == targets.refusal_for(prompts[3])
    rows = targets.dpo_rows(["a", "b", "c"], ["Sure.", "  ", "Here."])
    assert [r["prompt"] for r in rows] == ["a", "c"]
    with pytest.raises(ValueError, match="2 prompts but 1"):
        targets.dpo_rows(["a", "b"], ["x"])


def test_check_run_and_config_errors():
    values = ("naive", "sft", 0.5, 0.1, 0.3, 0.2, 0.4, 1.2, 3, 1.0)
    good = dict(zip(report.RUN_FIELDS, values, strict=True))
    report.check_run(good)
    with pytest.raises(ValueError, match="safety"):
        report.check_run({**good, "safety": 1.5})
    with pytest.raises(ValueError, match="misses fields"):
        report.check_run({"method": "naive"})
    with pytest.raises(ValueError, match="unknown pipeline 'rl'"):
        demo.validate(dataclasses.replace(demo.default_config(), runs=("naive:rl",)))
    with pytest.raises(ValueError, match="alphas"):
        demo.validate(dataclasses.replace(demo.default_config(), alphas=(1.0,)))
    demo.validate(demo.full_config())
    # the demo's command line (run as `python -m experiments.demo` by the forwarder)
    assert cli.main(["experiment", "demo", "--tiny", "--set", "sft_steps=zero"]) == 2
    assert cli.main(["experiment", "demo", "--tiny", "--set", "nope=1"]) == 2


def test_experiment_forwarder_errors(tmp_path, capsys):
    assert "demo" in experiment_runner.experiment_names(experiment_runner.experiments_dir())
    # a bad config comes back as the experiment's own exit status, nothing run
    assert cli.main(["experiment", "demo", "--tiny", "--set", "sft_steps=zero"]) == 2
    assert "sft_steps: expected an int, got 'zero'" in capsys.readouterr().err
    assert cli.main(["experiment", "demo", "--tiny", "--set", "alphas=1.0"]) == 2
    assert "alphas must lie strictly between 0 and 1" in capsys.readouterr().err
    assert cli.main(["experiment", "nope"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err
    # an install without the checkout's experiments/ folder (e.g. a wheel): a clear error
    assert experiment_runner.run_experiment(["demo"], root=tmp_path / "experiments") == 2
    assert "Experiments run from a repository checkout" in capsys.readouterr().err


def test_paper_configs_build_and_validate():
    assert len(paper.EXPERIMENTS) >= 12
    for name in paper.EXPERIMENTS:
        exp = paper.build(name)
        assert exp.doc and "Expected" in exp.doc and "python -m experiments.paper" in exp.doc
        if exp.train is not None:
            # validated against the devices the paper used (8), no model instantiated
            paper.validate_experiment(exp, device_count=8)
    with pytest.raises(ValueError, match="unknown experiment"):
        paper.build("qwen_sft_nope")
