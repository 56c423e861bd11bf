"""The starting model (SmolLM2-135M-Instruct, Q4_1 GGUF) on IFBench, with 95% intervals and the
time it takes.

    python -m experiments.start_model_ifbench [--prompts N] [--tokens L]
                                              [--out results/eval/start_model_ifbench.json]

``N`` prompts (a seeded sample of the IFBench prompts whose checkers run offline; ``--prompts 0``
takes all of them) answered with up to ``L`` new tokens (chat template, greedy), scored by the
``if-verifiable`` checker: prompt- and instruction-level, strict and loose. The instruction types
left out (their NLTK data is not installed) are written beside the scores, and so are the scores
of the one-word answer "hello" to every prompt: many IFBench checkers accept a very short answer
(an upper limit on words, sentences or repeats), so that is the floor to read a model against.

Example:
    >>> _parser().parse_args(["--prompts", "8"]).prompts
    8
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.start_model_eval import MODEL, answer_summary, load_start_model, measure
from ogpsa_jax.eval.ifbench import (
    IFBENCH_ROWS,
    evaluate_ifbench,
    load_ifbench,
    score_ifbench,
    unavailable_instructions,
)
from ogpsa_jax.experiment.timing import load_average, machine_info

logger = logging.getLogger(__name__)

ONE_WORD_ANSWER = "hello"
SCORES = ("prompt_strict", "prompt_loose", "inst_strict", "inst_loose")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m experiments.start_model_ifbench", description=__doc__
    )
    p.add_argument("--prompts", type=int, default=64, help="IFBench prompts (0 = all that run)")
    p.add_argument("--tokens", type=int, default=256, help="answer length")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default="results/eval/start_model_ifbench.json")
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measures the starting model on IFBench; returns the JSON written to ``args.out``."""
    load0 = load_average()
    rows = load_ifbench()
    available = len(rows)
    if 0 < args.prompts < len(rows):
        pick = np.random.default_rng(0).choice(len(rows), size=args.prompts, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    model, tok = load_start_model()
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate_ifbench(
        model, tok, rows, max_new_tokens=args.tokens, batch_size=args.batch, progress=False
    )
    out = answer_summary(tok, res, args.tokens, time.perf_counter() - t0)
    out["cpu_seconds"] = time.process_time() - c0  # all threads of this process
    out["keys"] = [r["key"] for r in rows]
    # the floor to read the scores against: the one-word answer "hello" to every prompt
    floor = score_ifbench(rows, [ONE_WORD_ANSWER] * len(rows))
    out["one_word_answer"] = {k: floor[k] for k in SCORES}
    logger.info("IFBench: %s", {k: v for k, v in out.items() if k != "keys"})
    return {
        "model": MODEL,
        "ifbench": out,
        "prompts_checkable_offline": available,
        "prompts_in_file": IFBENCH_ROWS,
        "left_out_types": unavailable_instructions(),
        "settings": vars(args),
        "machine": machine_info(),
        "load_average_start": load0,
        "load_average_end": load_average(),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the measurement and writes the JSON; returns the exit status."""
    args = _parser().parse_args(argv)
    ok = args.prompts >= 0 and args.tokens >= 1 and args.batch >= 1
    return measure(args, None if ok else "--prompts must be >= 0, --tokens and --batch >= 1", run)


if __name__ == "__main__":
    sys.exit(main())
