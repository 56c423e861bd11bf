"""``ogpsa launch``: a multi-process JAX job on this machine, to reproduce a multi-host run.

    ogpsa launch --processes 2 --devices-per-process 4 -- train sft --preset tiny --output-dir r

starts ``--processes`` copies of ``ogpsa ARGS...`` with the generic job environment
(``JAX_COORDINATOR_ADDRESS`` on a free local port, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``)
and ``--devices-per-process`` virtual CPU devices each (``JAX_NUM_CPU_DEVICES``; JAX runs on
the CPU unless ``JAX_PLATFORMS`` says otherwise). It prints every process's output with
``[i]`` in front (gloo's connection lines dropped), sends SIGTERM and SIGINT on to every
process, and exits with their status: 0 when all succeed, else the status of the first
process that failed (128 + N for one killed by signal N). It only starts processes; the job
itself -- coordination, collectives, a dead peer's detection -- is JAX's runtime. When one
process has failed, the others get ``--grace`` seconds to end (JAX aborts them once the
heartbeat timeout passes) before the launcher kills them.

Example:
    >>> main(["--processes", "2", "--", "train", "sft", "--preset", "tiny",
    ...       "--output-dir", "runs/two"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO

# Lines gloo (JAX's CPU collectives) writes from C++ whenever a device group connects.
GLOO_NOISE = "[Gloo] Rank"
# Exit status of a process aborted by JAX's distributed runtime (SIGABRT) after a peer died.
ABORTED = 128 + signal.SIGABRT


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(
    base: Mapping[str, str], *, port: int, processes: int, index: int, devices: int
) -> dict[str, str]:
    """The environment of process ``index`` of a local job.

    Example:
        >>> env = process_env({}, port=1234, processes=2, index=1, devices=4)
        >>> env["JAX_COORDINATOR_ADDRESS"], env["JAX_PROCESS_ID"], env["JAX_NUM_CPU_DEVICES"]
        ('127.0.0.1:1234', '1', '4')
    """
    env = dict(base)
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)  # this job's shape is ours, not an outer launcher's
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(processes),
        JAX_PROCESS_ID=str(index),
        JAX_NUM_CPU_DEVICES=str(devices),
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("JAX_PLATFORMS", "cpu")
    return env


def exit_status(returncode: int) -> int:
    """A ``Popen.returncode`` as a shell reports it (128 + N when killed by signal N).

    Example:
        >>> exit_status(-9), exit_status(75)
        (137, 75)
    """
    return 128 - returncode if returncode < 0 else returncode


def describe(index: int, status: int) -> str:
    """What a process's exit status means, in one line.

    Example:
        >>> describe(0, 134)
        "process 0 exited 134: aborted by JAX's distributed runtime (another process died or stopped sending heartbeats)"
    """  # noqa: E501
    why = {
        0: "done",
        2: "bad input (nothing computed)",
        3: "stopped on non-finite values",
        75: "checkpointed after SIGTERM (rerun to resume)",
        130: "stopped by Ctrl-C",
        ABORTED: "aborted by JAX's distributed runtime (another process died or stopped "
        "sending heartbeats)",
        128 + signal.SIGKILL: "killed (SIGKILL: by hand, by the launcher or out of memory)",
    }.get(status, "failed")
    return f"process {index} exited {status}: {why}"


def _pump(index: int, stream: IO[bytes], out: IO[str], lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        if GLOO_NOISE in line:
            continue
        with lock:
            out.write(f"[{index}] {line}\n")
            out.flush()


def run_job(
    args: Sequence[str],
    *,
    processes: int,
    devices: int,
    port: int | None = None,
    grace_s: float = 150.0,
    out: IO[str] | None = None,
) -> int:
    """Runs ``ogpsa ARGS...`` as ``processes`` JAX processes on this machine (see the module
    docstring) and waits for them.

    Args:
        args: the ``ogpsa`` arguments of every process, e.g. ``["train", "sft", ...]``.
        processes: how many processes.
        devices: virtual CPU devices per process.
        port: the coordinator's port (default: a free one).
        grace_s: once a process failed, how long the others may take before SIGKILL.
        out: where the prefixed lines go (default ``sys.stdout``).

    Returns:
        0 when every process succeeded, else the first failure's exit status.

    Raises:
        ValueError: ``processes`` or ``devices`` below 1, or no arguments.
    """
    if processes < 1 or devices < 1:
        raise ValueError(
            f"--processes and --devices-per-process must be >= 1, got {processes}, {devices}"
        )
    if not args:
        raise ValueError("nothing to run: give the ogpsa command after --, e.g. -- train sft ...")
    out = sys.stdout if out is None else out
    port = free_port() if port is None else port
    sys.stderr.write(
        f"ogpsa launch: {processes} processes x {devices} devices, coordinator "
        f"127.0.0.1:{port}: ogpsa {' '.join(args)}\n"
    )
    lock = threading.Lock()
    procs, pumps = [], []
    for i in range(processes):
        env = process_env(os.environ, port=port, processes=processes, index=i, devices=devices)
        proc = subprocess.Popen(
            [sys.executable, "-m", "ogpsa_jax.cli", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches them once, through us
        )
        procs.append(proc)
        pump = threading.Thread(target=_pump, args=(i, proc.stdout, out, lock), daemon=True)
        pump.start()
        pumps.append(pump)

    def forward(signum: int, frame: object) -> None:
        del frame
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    old = {}
    if main_thread:
        old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failure: tuple[int, int] | None = None
    failed_at = None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.returncode not in (None, 0) and first_failure is None:
                    first_failure, failed_at = (i, exit_status(p.returncode)), time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        sys.stderr.write(f"ogpsa launch: killing process {i} (SIGKILL)\n")
                        p.kill()
            time.sleep(0.1)
    finally:
        for p in procs:  # only when the launcher itself fails: never leave a process behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for s, handler in old.items():
            signal.signal(s, handler)
    for pump in pumps:
        pump.join(timeout=5)
    statuses = [exit_status(p.returncode) for p in procs]
    if first_failure is None:
        first_failure = next(((i, s) for i, s in enumerate(statuses) if s), None)
    for i, status in enumerate(statuses):
        sys.stderr.write(f"ogpsa launch: {describe(i, status)}\n")
    return 0 if first_failure is None else first_failure[1]


def main(argv: Sequence[str]) -> int:
    """``ogpsa launch [--processes N] [--devices-per-process D] [--port P] -- ARGS...``.

    Args:
        argv: the arguments after ``launch``.

    Returns:
        The job's exit status (`run_job`); 2 for bad arguments.
    """
    argv = list(argv)
    if "--" in argv:
        cut = argv.index("--")
        own, args = argv[:cut], argv[cut + 1 :]
    else:
        own, args = argv, []
    parser = argparse.ArgumentParser(
        prog="ogpsa launch",
        description="run `ogpsa ARGS...` as a multi-process JAX job on this machine",
        usage="ogpsa launch --processes N [--devices-per-process D] [--port P] -- ARGS...",
    )
    parser.add_argument("--processes", type=int, required=True, help="JAX processes to start")
    parser.add_argument(
        "--devices-per-process", type=int, default=1, help="virtual CPU devices (default 1)"
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default free)")
    parser.add_argument(
        "--grace",
        type=float,
        default=150.0,
        metavar="S",
        help="after a failure, seconds before the other processes are killed (default 150)",
    )
    opts = parser.parse_args(own)
    try:
        return run_job(
            args,
            processes=opts.processes,
            devices=opts.devices_per_process,
            port=opts.port,
            grace_s=opts.grace,
        )
    except ValueError as e:
        sys.stderr.write(f"ogpsa launch: error: {e}\n")
        return 2


__all__ = [
    "ABORTED",
    "GLOO_NOISE",
    "describe",
    "exit_status",
    "free_port",
    "main",
    "process_env",
    "run_job",
]
