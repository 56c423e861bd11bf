"""The ``ogpsa`` command line.

    ogpsa train {sft,dpo,sft-dpo} --preset NAME --output-dir DIR [--max-steps N]
                [--set field=value ...] [--overwrite] [--distributed]
    ogpsa plan --preset NAME --devices N [--command sft|dpo|sft-dpo] [--set field=value ...]
               [--cost] [--json]     (per-device memory from ahead-of-time compiles on N
                                      virtual CPU devices; nothing is allocated)
    ogpsa experiment NAME [...]   (runs experiments/NAME of the repository checkout, as
                                   `python -m experiments.NAME [...]` from its root)

Exit status: 0 done; 2 bad arguments, config, data or output folder (nothing was computed and
the output folder is untouched); 3 stopped on non-finite values; 75 (`EXIT_PREEMPTED`)
checkpointed after SIGTERM -- run the same command again to resume.

Example:
    >>> main(["train", "sft", "--preset", "tiny", "--output-dir", "runs/r", "--max-steps", "3"])
    ... # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import runpy
import sys
from collections.abc import Sequence

logger = logging.getLogger("ogpsa_jax.cli")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3


def _parser() -> argparse.ArgumentParser:
    # function-local: the training package imports jax (seconds); an experiment needs none of it
    from ogpsa_jax.train import PRESETS

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
    pl = sub.add_parser(
        "plan",
        help="per-device memory (and, with --cost, a roofline step time) of a config on N devices",
    )
    pl.add_argument("--preset", required=True, help=f"config preset: {', '.join(PRESETS)}")
    pl.add_argument("--devices", type=int, required=True, help="device count to plan for")
    pl.add_argument("--command", default="sft-dpo", choices=("sft", "dpo", "sft-dpo"))
    pl.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE")
    pl.add_argument("--cost", action="store_true", help="also the cost model (more compiles)")
    pl.add_argument("--json", action="store_true", help="print JSON for scripts")
    pl.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")
    ex = sub.add_parser(
        "experiment",
        help="run experiments/NAME of the repository checkout: `ogpsa experiment demo --help`",
    )
    ex.add_argument("name", help="an experiment in the checkout's experiments/ folder")
    ex.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    return parser


def experiments_dir() -> pathlib.Path:
    """The ``experiments/`` folder of the repository checkout holding this ``ogpsa_jax``.

    Experiments are not part of the installed package: they exist next to it only in a
    checkout (an editable install, ``pip install -e .``).

    Example:
        >>> experiments_dir().name
        'experiments'
    """
    return pathlib.Path(__file__).resolve().parent.parent / "experiments"


def experiment_names(root: pathlib.Path) -> list[str]:
    """The experiments in ``root``: packages with a ``__main__.py`` and top-level scripts.

    Example:
        >>> "demo" in experiment_names(experiments_dir())
        True
    """
    packages = [p.name for p in root.iterdir() if (p / "__main__.py").is_file()]
    scripts = [p.stem for p in root.glob("*.py") if not p.name.startswith("_")]
    return sorted(packages + scripts)


def run_experiment(argv: Sequence[str], root: pathlib.Path | None = None) -> int:
    """``ogpsa experiment NAME ARGS...``: runs ``python -m experiments.NAME ARGS...`` in this
    process, from the checkout that holds this package (the working directory is unchanged).

    Args:
        argv: the experiment's name, then its own arguments.
        root: the experiments folder (default `experiments_dir`).

    Returns:
        The experiment's exit status; 2 when the folder or the experiment does not exist.
    """
    root = experiments_dir() if root is None else pathlib.Path(root)
    prog = "ogpsa experiment"
    if not root.is_dir():
        sys.stderr.write(
            f"{prog}: error: no experiments/ folder next to the installed ogpsa_jax package "
            f"({root}). Experiments run from a repository checkout: clone the repository, "
            "install it with `pip install -e .`, and run `ogpsa experiment NAME` (or "
            "`python -m experiments.NAME` from its root).\n"
        )
        return EXIT_BAD_INPUT
    names = experiment_names(root)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(f"usage: {prog} NAME [ARGS...]; experiments: {', '.join(names)}\n")
        return 0 if argv else EXIT_BAD_INPUT
    name, args = argv[0], list(argv[1:])
    if name not in names:
        sys.stderr.write(f"{prog}: error: unknown experiment {name!r}; in {root}: {names}\n")
        return EXIT_BAD_INPUT
    checkout = str(root.parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    saved_argv = sys.argv
    sys.argv = [f"{prog} {name}", *args]
    try:
        runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the experiment's own exit status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


def _multi_process_env() -> bool:
    env = os.environ
    if env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def _train(args: argparse.Namespace) -> int:
    # function-local: jax and the training package take seconds to import
    import jax

    from ogpsa_jax.train import EXIT_PREEMPTED, NonFiniteError, apply_overrides, preset, train
    from ogpsa_jax.train.schema import stages_of

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


def _plan(args: argparse.Namespace) -> int:
    # function-local: jax is imported here, after the device count is set
    import jax

    from ogpsa_jax.train.abstract import use_virtual_devices

    jax.config.update("jax_platforms", "cpu")  # virtual CPU devices, also on a GPU machine
    use_virtual_devices(args.devices)  # before anything starts JAX's backend
    from ogpsa_jax.train import apply_overrides, preset
    from ogpsa_jax.train.plan import format_plans, plan

    config = apply_overrides(preset(args.preset), args.set)
    plans = plan(config, args.command, args.devices)
    costs = None
    if args.cost:
        from ogpsa_jax.models import make_mesh
        from ogpsa_jax.train.cost import cost_report

        cpus = jax.devices("cpu")[: args.devices]
        mesh = make_mesh(plans[0].mesh, axis_type=config.mesh_axis_type, devices=cpus)
        costs = [cost_report(p.stage, config, mesh) for p in plans]
    if args.json:
        costs = costs or [None] * len(plans)
        rows = [dict(p.to_dict(), cost=c) for p, c in zip(plans, costs, strict=True)]
        sys.stdout.write(json.dumps(rows, indent=1) + "\n")
    else:
        sys.stdout.write(format_plans(plans, costs) + "\n")
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
    if argv[:1] == ["experiment"]:  # an experiment of the checkout, with its own parser
        return run_experiment(argv[1:])
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
        if args.group == "plan":
            return _plan(args)
    except ValueError as e:
        sys.stderr.write(f"ogpsa: error: {e}\n")
        return EXIT_BAD_INPUT
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
