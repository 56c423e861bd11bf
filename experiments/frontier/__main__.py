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

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence

from experiments.frontier.config import PRESETS, validate
from experiments.frontier.run import merge_results, run_frontier, write_frontier
from ogpsa_jax.overrides import apply_overrides

PROG = "python -m experiments.frontier"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the study from command-line arguments; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 on a bad argument or config.
    """
    parser = argparse.ArgumentParser(prog=PROG, description="The alignment-tax frontier study.")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--reduced", action="store_true", help="what results/frontier/ holds")
    size.add_argument("--tiny", action="store_true", help="tiny random model (seconds; tests)")
    parser.add_argument("--out", default="results/frontier", help="output folder")
    parser.add_argument("--cache", default=None, help="cache folder (default OUT/cache)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--log-level", default="INFO")
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
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s: %(message)s",
        force=True,
    )
    logging.getLogger("absl").setLevel(logging.WARNING)
    config = PRESETS["reduced" if args.reduced else "tiny" if args.tiny else "default"]()
    try:
        config = apply_overrides(config, args.set)
        validate(config)
    except ValueError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
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
