"""Command line of the frontier study, from the repository root:

    python -m experiments.frontier [--reduced | --tiny] [--out DIR] [--cache DIR]
        [--set FIELD=VALUE ...]

``--set`` overrides any `FrontierConfig` field, parsed by its annotation (e.g. ``--set
seeds=0,1 --set runs=naive:sft,ogpsa:sft``). Exit status 0 on success, 2 on a bad argument or
config (nothing loaded or written).

Example:
    >>> main(["--tiny", "--set", "seeds=0,0"])
    2
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from experiments.frontier.config import PRESETS, validate
from experiments.frontier.run import run_frontier
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
    args = parser.parse_args(argv)
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
