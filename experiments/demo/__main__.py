"""Command line of the demo, from the repository root:

    python -m experiments.demo [--tiny | --full] [--out DIR] [--cache DIR] [--set FIELD=VALUE ...]

(``ogpsa experiment demo ...`` and ``make demo`` run the same.) ``--set`` overrides any
`DemoConfig` field, parsed by its annotation, e.g. ``--set sft_steps=40 --set
runs=naive:sft,ogpsa:sft --set alphas=0.5``. Exit status 0 on success, 2 on a bad argument or
config (nothing loaded or written).

Example:
    >>> main(["--tiny", "--set", "sft_steps=zero"])
    2
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.demo.config import PRESETS, validate
from experiments.demo.run import run_demo
from ogpsa_jax.experiment.entry import (
    compilation_cache,
    configured,
    experiment_parser,
    output_dirs,
)
from ogpsa_jax.experiment.report import run_label

PROG = "python -m experiments.demo"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(result: Mapping[str, Any]) -> str:
    """The results as a plain-text table, with the total time and output paths."""
    lines = [
        f"{'run':<22}{'safety':>8}{'over-ref':>10}{'capab.':>8}{'GSM8K':>8}{'BBQ':>8}"
        f"{'IFEval':>8}{'choice':>8}{'drift':>8}{'steps':>7}{'train s':>9}"
    ]
    for r in result["runs"]:
        lines.append(
            f"{run_label(r):<22}{r['safety']:>8.3f}{r['over_refusal']:>10.3f}"
            f"{r['capability']:>8.3f}{r['gsm8k']:>8.3f}{r['bbq']:>8.3f}"
            f"{_num(r.get('ifeval_prompt_strict')):>8}{_num(r.get('choice_mean')):>8}"
            f"{r['drift']:>8.3f}"
            f"{r['steps']:>7d}{r['seconds']:>9.0f}"
        )
    meta = result["meta"]
    lines.append(
        f"total {meta['total_seconds']:.0f} s; judge {meta['judge']}; outputs: "
        + ", ".join(result["paths"].values())
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the demo from command-line arguments; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a bad argument or config.
    """
    parser = experiment_parser(
        PROG,
        "The alignment-tax demo: SmolLM2-135M safety-tuned with and without OGPSA.",
        sizes={
            "full": "the whole grid (GPU/TPU host)",
            "tiny": "tiny random model (seconds; tests)",
        },
        out="results/demo",
        set_help="override a DemoConfig field, e.g. --set sft_steps=40 --set runs=naive:sft",
    )
    args = parser.parse_args(argv)
    config = configured(args, PRESETS, validate, PROG)
    if config is None:
        return 2
    compilation_cache(output_dirs(args.out, args.cache)[1])
    result = run_demo(config, args.out, args.cache)
    sys.stdout.write(summary(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
