"""Command line of the frontier study, from the repository root:

    python -m experiments.frontier [--reduced | --tiny] [--out DIR] [--cache DIR]
        [--set FIELD=VALUE ...]
    python -m experiments.frontier --merge PART_DIR [PART_DIR ...] --out DIR

``--set`` overrides any `FrontierConfig` field, parsed by its annotation (e.g. ``--set
seeds=0,1 --set runs=naive:sft,ogpsa:sft``). Exit status 0 on success, 2 on a bad argument or
config (nothing loaded or written). ``--merge`` joins studies run apart with the same settings
and other seeds (each PART_DIR holding a results.json) into one.

Example:
    >>> main(["--tiny", "--set", "seeds=0,0"])
    2
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

from experiments.frontier.config import PRESETS, validate
from experiments.frontier.run import merge_results, run_frontier, write_frontier
from ogpsa_jax.experiment.entry import (
    compilation_cache,
    configured,
    experiment_parser,
    output_dirs,
)

PROG = "python -m experiments.frontier"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the study from command-line arguments; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a bad argument or config.
    """
    parser = experiment_parser(
        PROG,
        "The alignment-tax frontier study.",
        sizes={
            "reduced": "what results/frontier/ holds",
            "tiny": "tiny random model (seconds; tests)",
        },
        out="results/frontier",
    )
    parser.add_argument("--merge", nargs="+", metavar="PART_DIR", help="merge parts into --out")
    args = parser.parse_args(argv)
    if args.merge:
        try:
            parts = []
            for d in args.merge:
                with open(os.path.join(d, "results.json"), encoding="utf-8") as f:
                    parts.append(json.load(f))
            paths = write_frontier(args.out, merge_results(parts))
        except (OSError, ValueError) as e:
            sys.stderr.write(f"{PROG}: error: {e}\n")
            return 2
        sys.stdout.write(f"merged {len(parts)} parts: {paths}\n")
        return 0
    config = configured(args, PRESETS, validate, PROG)
    if config is None:
        return 2
    compilation_cache(output_dirs(args.out, args.cache)[1])
    result = run_frontier(config, args.out, args.cache)
    for key, s in result["summary"].items():
        sys.stdout.write(
            f"{key:<24} hypervolume {s['hypervolume']} {s['hypervolume_ci']}  "
            f"capability at matched safety {s['capability_at_matched']} "
            f"(minus naive {s['tax_vs_baseline']} {s['tax_vs_baseline_ci']})\n"
        )
    sys.stdout.write(f"total {result['meta']['total_seconds']} s; {result['paths']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
