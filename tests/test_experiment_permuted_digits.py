"""Smoke test of experiments/permuted_digits.py (the continual-learning subspace comparison)."""

import importlib.util
import pathlib
import sys

import pytest

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not


def test_permuted_digits_smoke():
    """One seed, few steps, two methods: the experiment runs and its records are consistent."""
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
