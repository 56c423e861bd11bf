"""The frontier study's machinery: hypervolume and matched-safety interpolation on known inputs,
the summary, the seed and reference data, and one tiny end-to-end run through the command line
(curve points exported from the same run, seeds changing the training data)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from experiments.frontier.__main__ import main
from experiments.frontier.config import default_config, reduced_config, tiny_config, validate
from experiments.frontier.data import alpaca_rows, check_disjoint, seed_sets
from ogpsa_jax.eval import load_prompt_set, normalise_prompt
from ogpsa_jax.experiment.frontier import capability_at, curves, hypervolume, summarise
from ogpsa_jax.experiment.frontier_plot import mean_curve


# ----------------------------------------------------------------------------- pure functions
def _grid_area(points, ref, n=400):
    """Dominated area by counting cells of a fine grid (independent of the sweep)."""
    xs = (np.arange(n) + 0.5) / n
    X, Y = np.meshgrid(xs, xs)
    covered = np.zeros_like(X, bool)
    for x, y in points:
        covered |= (X > ref[0]) & (X < x) & (Y > ref[1]) & (Y < y)
    return covered.mean()


def test_hypervolume_known_inputs():
    assert hypervolume([(1.0, 1.0)], (0.0, 0.0)) == 1.0
    assert hypervolume([(1.0, 0.5), (0.5, 1.0)], (0.0, 0.0)) == pytest.approx(0.75, abs=1e-12)
    # a dominated point adds nothing; a point below the reference in either axis adds nothing
    assert hypervolume([(0.8, 0.8), (0.4, 0.4), (0.9, 0.1)], (0.2, 0.2)) == pytest.approx(0.36)
    assert hypervolume([], (0.1, 0.1)) == 0.0
    rng = np.random.default_rng(0)
    for _ in range(5):
        pts = rng.uniform(0, 1, size=(6, 2))
        ref = tuple(rng.uniform(0, 0.4, size=2))
        assert hypervolume(pts, ref) == pytest.approx(_grid_area(pts, ref), abs=5e-3)


def test_capability_at_interpolates_along_the_knob():
    curve = [(0.1, 0.5), (0.5, 0.45), (0.9, 0.4)]
    assert capability_at(curve, 0.7) == pytest.approx(0.425)
    assert capability_at(curve, 0.5) == pytest.approx(0.45)  # a point exactly there
    assert capability_at(curve, 0.05) == 0.5  # the start is already that safe
    assert capability_at(curve, 0.95) is None  # never reached
    # the first crossing counts, not a later one
    assert capability_at([(0.0, 1.0), (1.0, 0.0), (0.5, 0.9), (1.0, 0.8)], 0.5) == 0.5
    with pytest.raises(ValueError, match="no points"):
        capability_at([], 0.5)


def _row(method, seed, k, safety, cap, over=0.5):
    return dict(
        method=method,
        pipeline="sft",
        seed=seed,
        knob="steps",
        knob_value=k,
        safety=safety,
        capability=cap,
        over_refusal=over,
    )


def test_summary_hypervolume_and_matched_safety():
    rows = [dict(_row("start", -1, 0, 0.2, 0.5, 0.0), pipeline="none")]
    for seed, lift in ((0, 0.10), (1, 0.06)):
        rows += [_row("naive", seed, 4, 0.6, 0.45), _row("naive", seed, 8, 1.0, 0.4)]
        rows += [_row("ogpsa", seed, 4, 0.6, 0.5 + lift), _row("ogpsa", seed, 8, 0.9, 0.5)]
    s = summarise(rows)
    assert s["naive:sft"]["hypervolume"] == 0.0  # never above the start's capability
    assert s["naive:sft"]["tax_vs_baseline"] == 0.0
    # ogpsa seed 0: boxes (0.6-0.2) x 0.1 = 0.04; seed 1: 0.4 x 0.06 = 0.024; mean 0.032
    assert s["ogpsa:sft"]["hypervolume"] == pytest.approx(0.032)
    assert s["ogpsa:sft"]["hypervolume_per_seed"] == pytest.approx([0.04, 0.024])
    lo, hi = s["ogpsa:sft"]["hypervolume_ci"]
    assert 0.024 <= lo <= 0.032 <= hi <= 0.04
    # ogpsa never reaches naive's final safety 1.0: no matched value
    assert s["ogpsa:sft"]["reached"] == 0 and s["ogpsa:sft"]["capability_at_matched"] is None
    rows += [_row("replay", 0, 8, 1.0, 0.46), _row("replay", 1, 8, 1.0, 0.44)]
    r = summarise(rows)["replay:sft"]
    assert r["reached"] == 2 and r["tax_vs_baseline"] == pytest.approx(0.05)
    assert r["compliance_at_matched"] == pytest.approx(0.5)  # 1 - over-refusal 0.5 there
    # the final points without over-refusal: compliance 1 where naive's final safety is reached
    rows_c = [dict(x, over_refusal=0.0) if x["knob_value"] == 8 else x for x in rows]
    assert summarise(rows_c)["naive:sft"]["compliance_at_matched"] == pytest.approx(1.0)
    assert r["tax_vs_baseline_ci"][0] == pytest.approx(0.04)
    assert r["tax_vs_baseline_ci"][1] == pytest.approx(0.06)
    assert curves(rows, "replay", "sft")[1] == [(0.2, 0.5), (1.0, 0.44)]
    with pytest.raises(ValueError, match="no 'start' row"):
        summarise(rows[1:])


def test_mean_curve_band_spans_the_seeds():
    rows = [
        dict(_row("start", -1, 0, 0.1, 0.5, 0.0), pipeline="none", capability_ci=[0.4, 0.6]),
        dict(_row("a", 0, 4, 0.5, 0.4), capability_ci=[0.3, 0.5]),
        dict(_row("a", 1, 4, 0.7, 0.6), capability_ci=[0.5, 0.7]),
    ]
    assert mean_curve(rows, "a", "sft", "capability")[1] == (0.6, 0.5, 0.3, 0.7)


# ----------------------------------------------------------------------------- config and data
def test_config_validation():
    for cfg in (default_config(), reduced_config(), tiny_config()):
        validate(cfg)
    bad = {
        "seeds": ((), "seeds must be distinct"),
        "sft_points": ((2, 1), "sft_points must be increasing"),
        "dpo_points": ((1,), "dpo_points must end at"),
        "runs": (("weight-avg:sft",), "averages naive:sft"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(ValueError, match=message):
            validate(dataclasses.replace(tiny_config(), **{field: value}))
    with pytest.raises(ValueError, match="unknown method 'x'"):
        validate(dataclasses.replace(tiny_config(), runs=("x:sft",)))


def test_seeds_change_training_data_not_evaluation_sets():
    cfg = reduced_config()
    a, b = seed_sets(cfg, 0), seed_sets(cfg, 1)
    for name in ("harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "choice", "drift"):
        assert a[name] == b[name], name
    assert a["reference"] == b["reference"] and a["alpaca"] == b["alpaca"]
    assert {r["prompt"] for r in a["sft"]} != {r["prompt"] for r in b["sft"]}
    assert len(a["sft"]) == len(b["sft"]) == cfg.sft_prompts


def test_no_reference_prompt_in_any_evaluation_set():
    sets = seed_sets(default_config(), 0)  # checked inside; then check the whole pools too
    alpaca = {normalise_prompt(r["prompt"]) for r in load_prompt_set("alpaca_reference")}
    assert len(alpaca) >= 800
    for name in ("harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "choice", "drift"):
        assert not alpaca & {normalise_prompt(r["prompt"]) for r in sets[name]}, name
    assert len(alpaca_rows(default_config())) == default_config().reference_prompts
    with pytest.raises(ValueError, match="1 prompt\\(s\\) of alpaca also in ifeval"):
        check_disjoint({**sets, "alpaca": sets["alpaca"] + [sets["ifeval"][0]]})
    with pytest.raises(ValueError, match="of reference also in drift"):
        check_disjoint({**sets, "reference": sets["reference"] + sets["drift"][:1]})


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier")
    argv = ["--tiny", "--out", str(out), "--set", "runs=naive:sft,weight-avg:sft,naive:sft-dpo"]
    assert main(argv) == 0
    with open(out / "results.json") as f:
        return out, json.load(f)


def test_tiny_study_results(tiny_study):
    out, result = tiny_study
    runs, summary = result["runs"], result["summary"]
    assert [r["method"] for r in runs].count("start") == 1
    fields = (
        "method",
        "pipeline",
        "seed",
        "knob",
        "knob_value",
        "safety",
        "capability",
        "over_refusal",
        "safety_ci",
        "capability_ci",
        "over_refusal_ci",
        "drift_ci",
    )
    for r in runs:
        assert all(f in r for f in fields), r["label"]
        assert 0.0 <= r["capability"] <= 1.0
        assert r["capability_ci"][0] <= r["capability"] <= r["capability_ci"][1]
    naive = [r for r in runs if (r["method"], r["pipeline"]) == ("naive", "sft")]
    assert sorted((r["seed"], r["knob_value"]) for r in naive) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    wavg = [r for r in runs if r["method"] == "weight-avg"]
    assert sorted({r["knob_value"] for r in wavg}) == [0.5, 1.0]
    assert set(summary) == {"naive:sft", "weight-avg:sft", "naive:sft-dpo"}
    dpo = [r for r in runs if r["pipeline"] == "sft-dpo"]
    assert sorted((r["seed"], r["knob_value"]) for r in dpo) == [
        (s, k) for s in (0, 1) for k in (0, 1, 2)
    ]
    for r in (r for r in dpo if r["knob_value"] == 0):  # the SFT output, not re-evaluated
        sft_final = next(x for x in naive if x["seed"] == r["seed"] and x["knob_value"] == 2)
        assert (r["safety"], r["capability"], r["drift"]) == (
            sft_final["safety"],
            sft_final["capability"],
            sft_final["drift"],
        )
    assert summary["naive:sft"]["tax_vs_baseline"] == 0.0
    assert summary["naive:sft"]["seeds"] == [0, 1]
    for name in ("results.md", "frontier.png"):
        assert os.path.getsize(out / name) > 0


def test_tiny_study_points_come_from_one_run_and_seeds_differ(tiny_study):
    out, _ = tiny_study
    runs_dir = out / "cache" / "runs"
    folders = sorted(p for p in os.listdir(runs_dir) if p.startswith("naive-sft-seed"))
    assert len(folders) == 2  # one run per seed, each giving every point of its curve
    weights = {}
    for folder in folders:
        run = runs_dir / folder
        with open(run / "metrics.jsonl") as f:
            assert [json.loads(line)["step"] for line in f] == [1, 2]
        step1 = load_file(str(run / "step-1" / "model.safetensors"))
        final = load_file(str(run / "final" / "model.safetensors"))
        moved = [k for k in final if not np.array_equal(final[k], step1[k])]
        assert moved, "step 1 and the final step are the same weights"
        weights[folder] = final
    a, b = weights.values()
    assert any(not np.array_equal(a[k], b[k]) for k in a), "seeds trained the same model"
    data = [out / "cache" / f"data-seed{s}" / "sft.jsonl" for s in (0, 1)]
    assert data[0].read_text() != data[1].read_text()


def test_merge_parts_run_apart(tiny_study, tmp_path):
    _, result = tiny_study
    dirs = []
    for seed in (0, 1):
        meta = {**result["meta"], "seeds_done": [seed]}
        meta["settings"] = {**meta["settings"], "seeds": [seed]}
        part = {"meta": meta, "runs": [r for r in result["runs"] if r["seed"] in (-1, seed)]}
        d = tmp_path / f"part{seed}"
        d.mkdir()
        (d / "results.json").write_text(json.dumps(part))
        dirs.append(str(d))
    assert main(["--merge", *dirs, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "results.json").read_text())
    assert merged["summary"] == result["summary"]
    assert len(merged["runs"]) == len(result["runs"])
    assert merged["meta"]["seeds_done"] == [0, 1] and len(merged["meta"]["parts"]) == 2
    # A point two parts both evaluated is kept once when its results agree (times aside), and
    # is an error when they differ.
    again = json.loads((tmp_path / "part0" / "results.json").read_text())
    for row in again["runs"]:
        row["eval_seconds"] = row.get("eval_seconds", 0) + 1.0
    twice = tmp_path / "again"
    twice.mkdir()
    (twice / "results.json").write_text(json.dumps(again))
    assert main(["--merge", *dirs, str(twice), "--out", str(tmp_path / "merged2")]) == 0
    merged2 = json.loads((tmp_path / "merged2" / "results.json").read_text())
    assert merged2["runs"] == merged["runs"] and merged2["summary"] == result["summary"]
    next(r for r in again["runs"] if r["method"] != "start")["safety"] += 0.5
    (twice / "results.json").write_text(json.dumps(again))
    assert main(["--merge", *dirs, str(twice), "--out", str(tmp_path / "bad")]) == 2
    other = json.loads((tmp_path / "part1" / "results.json").read_text())
    other["meta"]["settings"]["sft_lr"] = 1.0
    (tmp_path / "part1" / "results.json").write_text(json.dumps(other))
    assert main(["--merge", *dirs, "--out", str(tmp_path / "bad")]) == 2


@pytest.mark.slow  # three tiny studies end to end
def test_intermediate_exports_deleted_once_evaluated(tiny_study, tmp_path):
    _, full = tiny_study
    out = tmp_path / "lean"
    argv = ["--tiny", "--out", str(out), "--set", "seeds=0", "--set", "keep_exports=false"]
    argv += ["--set", "runs=naive:sft,weight-avg:sft,naive:sft-dpo"]
    assert main(argv) == 0
    runs_dir = out / "cache" / "runs"
    folders = sorted(os.listdir(runs_dir))
    # one SFT run (the SFT->DPO pipeline reuses it, though its step-1 export is gone) and one DPO
    assert [f.rsplit("-", 1)[0] for f in folders] == ["naive-sft-dpo-seed0", "naive-sft-seed0"]
    for folder in folders:
        assert not (runs_dir / folder / "step-1").exists(), folder
        assert (runs_dir / folder / "final" / "model.safetensors").is_file(), folder
    lean = json.loads((out / "results.json").read_text())["runs"]
    key = lambda r: (r["method"], r["pipeline"], r["seed"], r["knob_value"])
    same = {key(r): r for r in full["runs"] if r["seed"] in (-1, 0)}
    assert sorted(map(key, lean)) == sorted(same)
    for r in lean:  # the same points, the same results
        assert (r["safety"], r["capability"], r["drift"]) == tuple(
            same[key(r)][k] for k in ("safety", "capability", "drift")
        ), r["label"]
    # A rerun of the DPO pipeline alone retrains the DPO run, whose step-1 export it evaluates,
    # and reuses the SFT run, whose final model alone it needs.
    stamps = {f: os.stat(runs_dir / f / "done.json").st_mtime_ns for f in folders}
    assert main([*argv[:-1], "runs=naive:sft-dpo"]) == 0
    after = {f: os.stat(runs_dir / f / "done.json").st_mtime_ns for f in folders}
    assert [after[f] > stamps[f] for f in folders] == [True, False]
    again = json.loads((out / "results.json").read_text())["runs"]
    assert {(key(r), r["safety"], r["capability"]) for r in again} == {
        (key(r), r["safety"], r["capability"]) for r in lean if r["pipeline"] in ("sft-dpo", "none")
    }


def test_compilation_cache_is_written_where_the_study_says(tmp_path):
    code = (
        "import jax, sys\n"
        "from ogpsa_jax.experiment.entry import compilation_cache\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "print(compilation_cache(sys.argv[1]))\n"
        "jax.jit(lambda x: x * 2 + 1)(jax.numpy.ones(3)).block_until_ready()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "xla")
    assert os.listdir(tmp_path / "xla"), "nothing compiled into the cache"
    # a folder named by the environment wins
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "named")
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "other")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "named")
    assert not (tmp_path / "other").exists()
