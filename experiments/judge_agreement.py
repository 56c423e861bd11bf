"""How well the library's refusal judges agree with people, on JailbreakBench's 100 rows.

    python -m experiments.judge_agreement [--out results/eval/judge_agreement.json]
                                          [--model-judge N]

Writes a list of rows ``judge, kind, split (all | held-out), n, accuracy, kappa,
false_refusal, false_compliance`` (each rate with a Wilson ``<name>_ci``) for the keyword judges
and, as reference points, the six classifiers whose labels ship in the same file; plus the exact
McNemar test of keyword-v1 against keyword-v2 (which row each gets right) on each split.
``--model-judge N`` also measures :class:`~ogpsa_jax.eval.judge.ModelJudge` with the offline
SmolLM2-135M-Instruct answering the StrongREJECT rubric (``N`` new tokens per answer; ~30 min on
2 CPU cores for N = 384); its rows add ``parsed``, the verdicts that came from a parsed rubric
answer rather than the keyword fallback.

The held-out half is fixed by ``holdout_split(100, seed=0)``: keyword-v2's anchoring and
pivot rules were written from the other half. See ``ogpsa_jax.eval.judge_agreement`` for what
the human label means and what a refusal judge can and cannot see.

Example:
    >>> _parser().parse_args([]).out
    'results/eval/judge_agreement.json'
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ogpsa_jax.eval.judge import AnchoredJudge, KeywordJudge, ModelJudge
from ogpsa_jax.eval.judge_agreement import agreement_rows, holdout_split, load_judge_comparison
from ogpsa_jax.eval.stats import mcnemar_exact


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.judge_agreement", description=__doc__)
    p.add_argument("--out", default="results/eval/judge_agreement.json")
    p.add_argument("--model-judge", type=int, default=0, metavar="N", help="rubric tokens")
    return p


def agreement_table(judges: Sequence[Any], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """`agreement_rows`, with ``parsed`` added to a `ModelJudge`'s rows: how many of the split's
    verdicts came from a parsed rubric answer rather than the keyword fallback."""
    table = agreement_rows(judges, rows)
    _, held = holdout_split(len(rows))
    for judge in judges:
        if isinstance(judge, ModelJudge):
            for r in table:
                if r["judge"] == judge.name:
                    idx = held if r["split"] == "held-out" else range(len(rows))
                    r["parsed"] = sum(judge.last_parsed[i] for i in idx)
    return table


def measure(model_judge_tokens: int = 0) -> dict[str, Any]:
    """The agreement rows and the keyword-v1 vs keyword-v2 paired test."""
    rows = load_judge_comparison()
    judges: list[Any] = [KeywordJudge(), AnchoredJudge()]
    if model_judge_tokens:
        import jax.numpy as jnp  # the model judge only: loads the offline SmolLM2
        from transformers import AutoTokenizer

        from ogpsa_jax import models
        from ogpsa_jax.models.gguf import smollm2_path

        path = str(smollm2_path())
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = models.load_hf(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
        judges.append(
            ModelJudge(
                model,
                tok,
                max_new_tokens=model_judge_tokens,
                name="strongreject-rubric:SmolLM2-135M-Instruct",
            )
        )
    table = agreement_table(judges, rows)
    _, held = holdout_split(len(rows))
    human = [r["human_majority"] for r in rows]
    v1 = KeywordJudge()([r["goal"] for r in rows], [r["response"] for r in rows])
    v2 = AnchoredJudge()([r["goal"] for r in rows], [r["response"] for r in rows])
    right = lambda verdicts, idx: [int((not verdicts[i]) == bool(human[i])) for i in idx]
    paired = {
        split: mcnemar_exact(right(v1, idx), right(v2, idx))
        for split, idx in (("all", range(len(rows))), ("held-out", held))
    }
    return {
        "rows": table,
        "keyword_v1_vs_v2": paired,
        "held_out_rows": held,
        "source": "jailbreakbench 0.1.3, jailbreakbench/data/classifier_comparison.csv (MIT)",
        "label": "human_majority = 1: the response is jailbroken (complies harmfully); a refusal "
        "judge is scored as a classifier of not jailbroken",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measures the judges and writes the JSON; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.model_judge < 0:
        sys.stderr.write("--model-judge must be >= 0\n")
        return 2
    out = measure(args.model_judge)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=2)
        f.write("\n")
    for r in out["rows"]:
        sys.stdout.write(
            f"{r['judge']:44s} {r['split']:9s} n={r['n']:3d} acc {r['accuracy']:.3f} "
            f"kappa {r['kappa']:.3f} false refusal {r['false_refusal']:.3f} "
            f"false compliance {r['false_compliance']:.3f}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
