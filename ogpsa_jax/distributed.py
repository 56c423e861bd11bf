"""Joining a multi-process JAX job: the environment a launcher sets, read into a checked
`JobSpec`, and `initialize`, which starts ``jax.distributed`` from it.

Every host of a TPU pod slice or a GPU cluster runs one JAX process; ``jax.distributed`` joins
them into one job whose devices form one mesh. Where the job's shape comes from, first match:

- flags: ``--coordinator HOST:PORT --num-processes N --process-id I`` (all three);
- ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID`` (all three: a
  script, a Kubernetes JobSet, ``ogpsa launch``);
- SLURM (``srun``): ``SLURM_NTASKS`` > 1 with ``SLURM_PROCID``, ``SLURM_LOCALID`` and
  ``SLURM_STEP_NODELIST``; JAX takes the first node as the coordinator (or
  ``JAX_COORDINATOR_ADDRESS``) and gives each process its GPU by ``SLURM_LOCALID``;
- Open MPI (``mpirun``): ``OMPI_COMM_WORLD_SIZE`` > 1 with ``OMPI_COMM_WORLD_RANK`` and
  ``OMPI_COMM_WORLD_LOCAL_RANK``; the coordinator from ``OMPI_MCA_orte_hnp_uri`` (Open MPI
  4) or ``JAX_COORDINATOR_ADDRESS``;
- a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` lists several hosts): JAX detects it all;
- ``--distributed``: whatever JAX's own cluster detection finds (e.g. GKE).

Anything else is one process. A partial or inconsistent environment (a count without an id,
an id out of range, a number that is not one, two launchers disagreeing) is a `ValueError`
naming the variables, raised before JAX starts. `job_spec` is pure (it reads the mapping it is
given); `initialize` is the one function with effects.

Example:
    >>> env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "2",
    ...        "JAX_PROCESS_ID": "1"}
    >>> spec = job_spec(env)
    >>> spec.source, spec.num_processes, spec.process_id, spec.distributed
    ('JAX_*', 2, 1, True)
    >>> job_spec({}).distributed
    False
"""

from __future__ import annotations

import io
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# Seconds without heartbeats after which JAX declares a process dead and aborts the others
# (JAX's own default is 100; a dead peer then stops the job within about this long).
HEARTBEAT_TIMEOUT_S = 60

_JAX_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
_SLURM_VARS = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_STEP_NODELIST")
_OMPI_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")


@dataclass(frozen=True)
class JobSpec:
    """The shape of the job this process belongs to.

    ``coordinator``, ``num_processes`` and ``process_id`` are None where JAX derives them
    itself (the coordinator of a SLURM or Open MPI job, all three on a TPU slice).
    """

    source: str  # "single", "flags", "JAX_*", "SLURM", "Open MPI", "TPU" or "detect"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    @property
    def distributed(self) -> bool:
        """Whether ``jax.distributed`` must be initialised."""
        return self.source != "single"

    def describe(self) -> str:
        """One line for the log.

        Example:
            >>> JobSpec("flags", "h:1", 2, 0).describe()
            'process 0 of 2 (from flags, coordinator h:1)'
        """
        if not self.distributed:
            return "one process"
        who = (
            "process ? of ?"
            if self.num_processes is None
            else (f"process {self.process_id} of {self.num_processes}")
        )
        where = f", coordinator {self.coordinator}" if self.coordinator else ""
        return f"{who} (from {self.source}{where})"


def _int(name: str, text: str | int, minimum: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {text!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_address(name: str, address: str) -> str:
    """``address`` must read ``HOST:PORT`` with a port in 1..65535.

    Raises:
        ValueError: naming ``name`` and the address.

    Example:
        >>> check_address("--coordinator", "node-0:1234")
        'node-0:1234'
    """
    host, sep, port = str(address).rpartition(":")
    ok = sep and host and port.isdigit() and 1 <= int(port) <= 65535
    if not ok:
        raise ValueError(f"{name} must read HOST:PORT (e.g. 10.0.0.1:1234), got {address!r}")
    return str(address)


def _checked(source: str, coordinator: str | None, n: int, pid: int, names: tuple) -> JobSpec:
    if pid >= n:
        raise ValueError(f"{names[1]}={pid} must be below {names[0]}={n}")
    return JobSpec(source, coordinator, n, pid)


def _from_flags(coordinator: str | None, n: int | None, pid: int | None) -> JobSpec:
    given = {"--coordinator": coordinator, "--num-processes": n, "--process-id": pid}
    missing = [k for k, v in given.items() if v is None]
    if missing:
        have = [k for k, v in given.items() if v is not None]
        raise ValueError(
            f"{', '.join(have)} given without {', '.join(missing)}: a multi-process job needs "
            "all three of --coordinator HOST:PORT, --num-processes N and --process-id I"
        )
    check_address("--coordinator", coordinator)
    n = _int("--num-processes", n, 1)
    pid = _int("--process-id", pid, 0)
    return _checked("flags", coordinator, n, pid, ("--num-processes", "--process-id"))


def _from_jax_vars(env: Mapping[str, str]) -> JobSpec:
    missing = [k for k in _JAX_VARS if not env.get(k)]
    if missing:
        have = [k for k in _JAX_VARS if env.get(k)]
        raise ValueError(
            f"{', '.join(have)} set without {', '.join(missing)}: a multi-process job needs all "
            f"of {', '.join(_JAX_VARS)} (or run under srun or mpirun, which set the counts)"
        )
    address = check_address("JAX_COORDINATOR_ADDRESS", env["JAX_COORDINATOR_ADDRESS"])
    n = _int("JAX_NUM_PROCESSES", env["JAX_NUM_PROCESSES"], 1)
    pid = _int("JAX_PROCESS_ID", env["JAX_PROCESS_ID"], 0)
    return _checked("JAX_*", address, n, pid, ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"))


def _from_launcher(
    env: Mapping[str, str], source: str, size_var: str, needed: tuple, coordinator_var: str | None
) -> JobSpec:
    n = _int(size_var, env[size_var], 1)
    missing = [k for k in needed if not env.get(k)]
    if missing:
        raise ValueError(
            f"{size_var}={n} ({source}) but {', '.join(missing)} not set: start every process "
            f"with the launcher ({'srun' if source == 'SLURM' else 'mpirun'}), not by hand"
        )
    address = env.get("JAX_COORDINATOR_ADDRESS") or None
    if address is not None:
        check_address("JAX_COORDINATOR_ADDRESS", address)
    elif coordinator_var is not None and not env.get(coordinator_var):
        raise ValueError(
            f"{source} job without {coordinator_var} (Open MPI 5 does not publish the "
            "launcher's address): set JAX_COORDINATOR_ADDRESS=HOST:PORT on every process"
        )
    pid = _int(needed[0], env[needed[0]], 0)
    return _checked(source, address, n, pid, (size_var, needed[0]))


def _agree(spec: JobSpec, env: Mapping[str, str], var: str, value: int | None) -> None:
    """A second launcher's variable that disagrees with the chosen source is an error."""
    if value is None or not env.get(var):
        return
    if str(env[var]).strip() != str(value):
        raise ValueError(
            f"inconsistent environment: {var}={env[var]} but {spec.source} says {value} "
            "(left over from another launcher? unset one of them)"
        )


def job_spec(
    env: Mapping[str, str],
    *,
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    detect: bool = False,
) -> JobSpec:
    """Reads the job's shape from flags, then the environment (see the module docstring).

    Args:
        env: the environment (``os.environ``).
        coordinator: ``--coordinator HOST:PORT``.
        num_processes: ``--num-processes N``.
        process_id: ``--process-id I``.
        detect: ``--distributed``: leave everything to JAX's own cluster detection when no
            source above applies.

    Returns:
        The `JobSpec` (``source="single"``: one process, nothing to initialise).

    Raises:
        ValueError: a partial or inconsistent set of flags or variables, naming them.

    Example:
        >>> job_spec({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
        ...           "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[01-02]"})
        JobSpec(source='SLURM', coordinator=None, num_processes=4, process_id=3)
    """
    if (coordinator, num_processes, process_id) != (None, None, None):
        spec = _from_flags(coordinator, num_processes, process_id)
    elif env.get("JAX_NUM_PROCESSES") or env.get("JAX_PROCESS_ID"):
        spec = _from_jax_vars(env)
    elif env.get("SLURM_JOB_ID") and _int("SLURM_NTASKS", env.get("SLURM_NTASKS", "1"), 1) > 1:
        spec = _from_launcher(env, "SLURM", "SLURM_NTASKS", _SLURM_VARS, None)
    elif _int("OMPI_COMM_WORLD_SIZE", env.get("OMPI_COMM_WORLD_SIZE", "1"), 1) > 1:
        spec = _from_launcher(
            env, "Open MPI", "OMPI_COMM_WORLD_SIZE", _OMPI_VARS, "OMPI_MCA_orte_hnp_uri"
        )
    elif env.get("JAX_COORDINATOR_ADDRESS"):
        spec = _from_jax_vars(env)  # names the missing count and id
    elif "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        spec = JobSpec("TPU")
    elif detect:
        spec = JobSpec("detect")
    else:
        spec = JobSpec("single")
    if spec.source in ("flags", "SLURM", "Open MPI"):
        _agree(spec, env, "JAX_NUM_PROCESSES", spec.num_processes)
        _agree(spec, env, "JAX_PROCESS_ID", spec.process_id)
    if spec.source in ("flags", "JAX_*"):
        if env.get("SLURM_JOB_ID"):
            _agree(spec, env, "SLURM_NTASKS", spec.num_processes)
            _agree(spec, env, "SLURM_PROCID", spec.process_id)
        _agree(spec, env, "OMPI_COMM_WORLD_SIZE", spec.num_processes)
        _agree(spec, env, "OMPI_COMM_WORLD_RANK", spec.process_id)
    if env.get("JAX_NUM_CPU_DEVICES"):
        _int("JAX_NUM_CPU_DEVICES", env["JAX_NUM_CPU_DEVICES"], 1)
    return spec


def silence_native_stdout() -> None:
    """Sends native writes to file descriptor 1 to /dev/null, keeping Python's ``sys.stdout``.

    gloo (JAX's CPU collectives) prints a ``[Gloo] Rank N is connected to M peer ranks`` line
    from C++ for every device group it connects, straight to descriptor 1, past any log level.
    Python's own output goes on to the real stdout through a duplicate of it. Call it before
    ``jax.distributed`` starts.

    Example:
        >>> silence_native_stdout()  # doctest: +SKIP
    """
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    sys.stdout = io.TextIOWrapper(
        os.fdopen(saved, "wb", buffering=0), write_through=True, line_buffering=True
    )


def initialize(spec: JobSpec, *, heartbeat_timeout_s: int = HEARTBEAT_TIMEOUT_S) -> bool:
    """Starts ``jax.distributed`` for ``spec`` (before any device is used); nothing for one
    process.

    A process that stops sending heartbeats (killed, out of memory) for ``heartbeat_timeout_s``
    seconds makes JAX abort every other process of the job (exit status 134, from C++: Python
    cleans nothing up), so a dead peer never leaves the job hanging. A process that exits
    waits at most as long for the others at JAX's shutdown barrier: one that failed alone
    (the others still in a collective) makes the job abort then.

    Args:
        spec: from `job_spec`.
        heartbeat_timeout_s: see above.

    Returns:
        Whether ``jax.distributed`` was initialised.

    Raises:
        ValueError: ``heartbeat_timeout_s`` below 1.

    Example:
        >>> initialize(JobSpec("single"))
        False
    """
    if not spec.distributed:
        return False
    heartbeat_timeout_s = _int("heartbeat timeout", heartbeat_timeout_s, 1)
    # function-local: jax takes seconds to import; reading a spec needs none of it
    import jax

    jax.distributed.initialize(
        coordinator_address=spec.coordinator,
        num_processes=spec.num_processes,
        process_id=spec.process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
        # at exit every process waits for the others this long (JAX's default: 5 minutes): a
        # process that failed alone then ends the job that soon, not 5 minutes later
        shutdown_timeout_seconds=heartbeat_timeout_s,
    )
    logger.info(
        "%s: %d devices in all, %d here",
        spec.describe().replace(
            "process ? of ?", f"process {jax.process_index()} of {jax.process_count()}"
        ),
        jax.device_count(),
        jax.local_device_count(),
    )
    return True


__all__ = [
    "HEARTBEAT_TIMEOUT_S",
    "JobSpec",
    "check_address",
    "initialize",
    "job_spec",
    "silence_native_stdout",
]
