"""The ``ogpsa`` command line.

    ogpsa train {sft,dpo,sft-dpo} --preset NAME --output-dir DIR [--max-steps N]
                [--set field=value ...] [--overwrite] [--distributed]
    ogpsa experiment demo [...]   (forwarded to ogpsa_jax.experiment.demo.main)

Exit status: 0 done; 2 bad arguments, config, data or output folder (nothing was computed and
the output folder is untouched); 3 stopped on non-finite values; 75 (`EXIT_PREEMPTED`)
checkpointed after SIGTERM -- run the same command again to resume.

Example:
    >>> main(["train", "sft", "--preset", "tiny", "--output-dir", "/tmp/r", "--max-steps", "3"])
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Sequence

logger = logging.getLogger("ogpsa_jax.cli")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _parser() -> argparse.ArgumentParser:
    from ogpsa_jax.train.config import PRESETS

    parser = argparse.ArgumentParser(prog="ogpsa", description="OGPSA safety post-training in JAX")
    sub = parser.add_subparsers(dest="group", required=True)
    tr = sub.add_parser("train", help="SFT, DPO or SFT->DPO training with OGPSA")
    tr.add_argument("command", choices=("sft", "dpo", "sft-dpo"), help="stage(s) to run")
    tr.add_argument("--preset", required=True, help=f"config preset: {', '.join(PRESETS)}")
    tr.add_argument("--output-dir", required=True, help="run folder (resumed if it exists)")
    tr.add_argument("--max-steps", type=int, default=None, help="cap steps of every stage")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a config field, e.g. --set sft.ogpsa.k=4 --set mesh=2,4,1",
    )
    tr.add_argument("--overwrite", action="store_true", help="replace a run with another config")
    tr.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() (automatic with JAX_COORDINATOR_ADDRESS, a "
        "multi-task SLURM job, or a multi-host TPU slice)",
    )
    tr.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    ex = sub.add_parser("experiment", help="experiments: `ogpsa experiment demo --help`")
    ex.add_argument("name", choices=("demo",))
    return parser


def _multi_process_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def _train(args: argparse.Namespace) -> int:
    import jax

    from ogpsa_jax.train.config import apply_overrides, preset, stages_of
    from ogpsa_jax.train.loop import EXIT_PREEMPTED, NonFiniteError, train

    if args.distributed or _multi_process_env():
        jax.distributed.initialize()
        logger.info("process %d of %d", jax.process_index(), jax.process_count())
    config = apply_overrides(preset(args.preset), args.set)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        for stage in stages_of(args.command):
            st = dataclasses.replace(getattr(config, stage), max_steps=args.max_steps)
            config = dataclasses.replace(config, **{stage: st})
    try:
        result = train(args.command, config, args.output_dir, overwrite=args.overwrite)
    except NonFiniteError as e:
        logger.error("%s", e)
        return EXIT_NONFINITE
    if result.preempted:
        logger.warning("preempted at step %d; rerun the same command to resume", result.step)
        return EXIT_PREEMPTED
    logger.info("done: %s", result.final_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (the console script exits with it).

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for bad input, 3 on non-finite values, 75 when preempted.
    """
    as_program = argv is None  # the console script: this process's logging is ours to set up
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["experiment", "demo"]:  # the alignment-tax demo has its own parser
        from ogpsa_jax.experiment.demo import main as demo_main

        return demo_main(argv[2:])
    args = _parser().parse_args(argv)
    if as_program:
        logging.basicConfig(
            level=getattr(logging, str(args.log_level).upper(), logging.INFO),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            force=True,  # absl installs a root handler on import
        )
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
    try:
        if args.group == "train":
            return _train(args)
    except ValueError as e:
        sys.stderr.write(f"ogpsa: error: {e}\n")
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
