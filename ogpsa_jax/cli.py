"""The ``ogpsa`` command line.

    ogpsa train {sft,dpo,sft-dpo} --preset NAME --output-dir DIR [--max-steps N]
                [--set field=value ...] [--overwrite] [--log-every N]
                [--coordinator HOST:PORT --num-processes N --process-id I]
                [--heartbeat-timeout S] [--distributed]
    ogpsa launch --processes N [--devices-per-process D] -- train ...
                                    (a local multi-process job: docs/multihost.md)
    ogpsa plan --preset NAME --devices N [--command sft|dpo|sft-dpo] [--set field=value ...]
               [--cost] [--json]     (per-device memory from ahead-of-time compiles on N
                                      virtual CPU devices; nothing is allocated)
    ogpsa config show [--preset NAME] [--set field=value ...] [--command C] [--json]
    ogpsa config reference          (the Markdown page of every config field: docs/config.md)
    ogpsa eval DIR [--output FILE] [--full] [--start DIR] [--set field=value ...]
    ogpsa generate DIR --prompt TEXT [--prompt TEXT ...] [--max-new-tokens N]
    ogpsa experiment NAME [...]     (runs experiments/NAME of the repository checkout, as
                                     `python -m experiments.NAME [...]` from its root)

Every sub-command takes ``--log-level LEVEL`` and ``--quiet``. Exit status: 0 done; 2 bad
arguments, config, data, model folder or output folder (nothing was computed and the output
folder is untouched); 3 stopped on non-finite values, or every step skipped; 75
(`EXIT_PREEMPTED`) checkpointed after SIGTERM; 130 (`EXIT_INTERRUPTED`) stopped by Ctrl-C
(checkpointed after the first, at once after a second) -- run the same command again to resume.
docs/cli.md has the details.

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
import sys
from collections.abc import Sequence

from ogpsa_jax import distributed, launch, logs
from ogpsa_jax.experiment_runner import run_experiment

logger = logging.getLogger("ogpsa_jax.cli")

EXIT_BAD_INPUT = 2
EXIT_NONFINITE = 3
EXIT_INTERRUPTED = 130  # ogpsa_jax.train.signals.EXIT_INTERRUPTED (not imported here: jax)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--log-level", default="INFO", help="DEBUG, INFO (default), WARNING")
    common.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return common


def _set_flag(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"override a config field (repeatable), e.g. --set {example}",
    )


def _parser() -> argparse.ArgumentParser:
    # function-local: the training package imports jax (seconds); an experiment needs none of it
    from ogpsa_jax.train import PRESETS

    common = _common()
    parser = argparse.ArgumentParser(prog="ogpsa", description="OGPSA safety post-training in JAX")
    sub = parser.add_subparsers(dest="group", required=True)
    tr = sub.add_parser("train", parents=[common], help="SFT, DPO or SFT->DPO with OGPSA")
    tr.add_argument("command", choices=("sft", "dpo", "sft-dpo"), help="stage(s) to run")
    tr.add_argument("--preset", required=True, help=f"config preset: {', '.join(PRESETS)}")
    tr.add_argument("--output-dir", required=True, help="run folder (resumed if it exists)")
    tr.add_argument("--max-steps", type=int, default=None, help="cap steps of every stage")
    _set_flag(tr, "sft.ogpsa.k=4 --set sft.data=my.jsonl")
    tr.add_argument("--overwrite", action="store_true", help="replace a run with another config")
    job = tr.add_argument_group(
        "multi-process job (docs/multihost.md; read from JAX_COORDINATOR_ADDRESS + "
        "JAX_NUM_PROCESSES + JAX_PROCESS_ID, srun, mpirun or a TPU slice when not given)"
    )
    job.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="process 0's address")
    job.add_argument("--num-processes", type=int, default=None, metavar="N")
    job.add_argument("--process-id", type=int, default=None, metavar="I", help="0 .. N-1")
    job.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=None,
        metavar="S",
        help="a process silent this long is dead and the others stop (default 60)",
    )
    job.add_argument(
        "--distributed",
        action="store_true",
        help="join a job that only JAX's own cluster detection recognises",
    )
    tr.add_argument(
        "--log-every",
        type=int,
        default=None,
        metavar="N",
        help="without a terminal, a progress line every N steps (default: ~20 per stage)",
    )
    pl = sub.add_parser(
        "plan",
        parents=[common],
        help="per-device memory (and, with --cost, a roofline step time) of a config on N devices",
    )
    pl.add_argument("--preset", required=True, help=f"config preset: {', '.join(PRESETS)}")
    pl.add_argument("--devices", type=int, required=True, help="device count to plan for")
    pl.add_argument("--command", default="sft-dpo", choices=("sft", "dpo", "sft-dpo"))
    _set_flag(pl, "model.remat=dots")
    pl.add_argument("--cost", action="store_true", help="also the cost model (more compiles)")
    pl.add_argument("--json", action="store_true", help="print JSON for scripts")
    cfg = sub.add_parser("config", parents=[common], help="show configs and their fields")
    cfg_sub = cfg.add_subparsers(dest="action", required=True)
    show = cfg_sub.add_parser("show", parents=[common], help="print a resolved config")
    show.add_argument("--preset", default=None, help=f"{', '.join(PRESETS)} (default: none)")
    _set_flag(show, "sft.ogpsa.k=4")
    show.add_argument(
        "--command",
        choices=("sft", "dpo", "sft-dpo"),
        default="sft-dpo",
        help="validate the stages of this command (default sft-dpo)",
    )
    show.add_argument("--json", action="store_true", help="as JSON (the config.json format)")
    cfg_sub.add_parser("reference", parents=[common], help="the Markdown page of every field")
    ev = sub.add_parser("eval", parents=[common], help="evaluate a Hugging Face model folder")
    ev.add_argument("model_dir", metavar="DIR", help="a run's final/ or any HF model folder")
    ev.add_argument("--output", default=None, help="JSON file (default DIR/eval.json; + .md)")
    ev.add_argument("--full", action="store_true", help="every prompt, GSM8K by generation")
    ev.add_argument("--start", default=None, metavar="DIR", help="starting model, for drift")
    ev.add_argument("--tokenizer", default=None, metavar="DIR", help="default: DIR's own")
    ev.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    _set_flag(ev, "harmful_limit=16 (EvalConfig fields)")
    gen = sub.add_parser("generate", parents=[common], help="answer prompts with a model folder")
    gen.add_argument("model_dir", metavar="DIR", help="a run's final/ or any HF model folder")
    gen.add_argument("--prompt", action="append", required=True, help="a user message")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--system", default=None, help="a system message")
    gen.add_argument("--tokenizer", default=None, metavar="DIR", help="default: DIR's own")
    gen.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ex = sub.add_parser(
        "experiment",
        help="run experiments/NAME of the repository checkout: `ogpsa experiment demo --help`",
    )
    ex.add_argument("name", help="an experiment in the checkout's experiments/ folder")
    ex.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    la = sub.add_parser(  # only for this help: `main` hands `launch` to ogpsa_jax.launch
        "launch",
        help="run `ogpsa ARGS` as a multi-process job on this machine: `ogpsa launch --help`",
    )
    la.add_argument("args", nargs=argparse.REMAINDER, help="see `ogpsa launch --help`")
    return parser


def _join_job(args: argparse.Namespace) -> None:
    """Reads the job's shape (flags, then the environment) and starts ``jax.distributed``;
    a process other than 0 then logs warnings and errors only, with its index in front."""
    spec = distributed.job_spec(
        os.environ,
        coordinator=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        detect=args.distributed,
    )
    timeout = distributed.HEARTBEAT_TIMEOUT_S
    if args.heartbeat_timeout is not None:
        if args.heartbeat_timeout < 1:
            raise ValueError(f"--heartbeat-timeout must be >= 1, got {args.heartbeat_timeout}")
        timeout = args.heartbeat_timeout
    if not spec.distributed:
        return
    if args.setup_logs:  # this process is ours: gloo's native connection lines go nowhere
        distributed.silence_native_stdout()
        if spec.process_id:  # known before JAX starts (not on a TPU slice)
            _log_as_worker(spec.process_id)
    distributed.initialize(spec, heartbeat_timeout_s=timeout)
    # function-local: jax takes seconds to import
    import jax

    if args.setup_logs and jax.process_index() != 0:
        _log_as_worker(jax.process_index())


def _log_as_worker(index: int) -> None:
    """Process ``index`` > 0 of a job: warnings and errors only, with its index in front."""
    logs.setup_logging("WARNING", prefix=lambda: f"[process {index}] ")


def _train(args: argparse.Namespace) -> int:
    # function-local: the training package imports jax (seconds)
    from ogpsa_jax.train import (
        EXIT_PREEMPTED,
        NonFiniteError,
        apply_overrides,
        preset,
        train,
    )
    from ogpsa_jax.train.schema import stages_of

    config = apply_overrides(preset(args.preset), args.set)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        for stage in stages_of(args.command):
            st = dataclasses.replace(getattr(config, stage), max_steps=args.max_steps)
            config = dataclasses.replace(config, **{stage: st})
    if args.log_every is not None and args.log_every < 1:
        raise ValueError(f"--log-every must be >= 1, got {args.log_every}")
    _join_job(args)
    try:
        result = train(
            args.command,
            config,
            args.output_dir,
            overwrite=args.overwrite,
            log_every=args.log_every,
        )
    except NonFiniteError as e:
        logger.error("%s", e)
        return EXIT_NONFINITE
    if result.preempted:
        how = "Ctrl-C" if result.stopped_by == "SIGINT" else "SIGTERM"
        logger.warning(
            "stopped by %s at step %d (checkpoint saved); run the same command to resume",
            how,
            result.step,
        )
        return EXIT_INTERRUPTED if result.stopped_by == "SIGINT" else EXIT_PREEMPTED
    logger.info("done: %s", result.final_dir)
    return 0


def _config(args: argparse.Namespace) -> int:
    # function-local: the training package imports jax (seconds)
    from ogpsa_jax.overrides import apply_overrides, to_dict
    from ogpsa_jax.train import TrainConfig, preset, validate
    from ogpsa_jax.train.config_doc import config_lines, config_reference

    if args.action == "reference":
        sys.stdout.write(config_reference())
        return 0
    config = apply_overrides(preset(args.preset) if args.preset else TrainConfig(), args.set)
    validate(config, args.command, device_count=None)
    if args.json:
        sys.stdout.write(json.dumps(to_dict(config), indent=2) + "\n")
    else:
        sys.stdout.write("\n".join(config_lines(config)) + "\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    # function-local: jax, transformers and the evaluation sets take seconds to load
    from ogpsa_jax.eval import EvalConfig, full_eval_config
    from ogpsa_jax.model_commands import evaluate_folder, results_markdown, write_results
    from ogpsa_jax.overrides import apply_overrides

    config = apply_overrides(full_eval_config() if args.full else EvalConfig(), args.set)
    output = args.output or os.path.join(args.model_dir, "eval.json")
    result = evaluate_folder(
        args.model_dir,
        config,
        start=args.start,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        progress=sys.stderr.isatty() and not args.quiet,
    )
    paths = write_results(result, output)
    sys.stdout.write(results_markdown(result) + "\n")
    logger.info("wrote %s and %s", *paths)
    return 0


def _generate(args: argparse.Namespace) -> int:
    # function-local: jax and transformers take seconds to import
    from ogpsa_jax.model_commands import generate_from_folder

    answers = generate_from_folder(
        args.model_dir,
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        system_prompt=args.system,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
    )
    for prompt, answer in zip(args.prompt, answers, strict=True):
        if len(args.prompt) > 1:
            sys.stdout.write(f"### {prompt}\n")
        sys.stdout.write(answer + "\n")
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


COMMANDS = {
    "train": _train,
    "plan": _plan,
    "config": _config,
    "eval": _eval,
    "generate": _generate,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (the console script exits with it).

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).

    Returns:
        0 on success, 2 for bad input, 3 on non-finite values, 75 when preempted by SIGTERM,
        130 when stopped by Ctrl-C.
    """
    as_program = argv is None  # the console script: this process's logging is ours to set up
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["experiment"]:  # an experiment of the checkout, with its own parser
        return run_experiment(argv[1:])
    if argv[:1] == ["launch"]:  # processes of a local multi-process job, with its own parser
        return launch.main(argv[1:])
    logs.quiet_environment()  # before transformers or datasets are imported
    args = _parser().parse_args(argv)
    args.setup_logs = as_program
    try:
        if as_program:
            logs.setup_logging(args.log_level, quiet=args.quiet)
        return COMMANDS[args.group](args)
    except ValueError as e:
        sys.stderr.write(f"ogpsa: error: {e}\n")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        sys.stderr.write(
            "ogpsa: interrupted; the run folder keeps its last complete checkpoint "
            "(run the same command again to resume)\n"
        )
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
