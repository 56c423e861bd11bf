"""Where an experiment's time goes: wall, CPU and XLA compile seconds per named phase, and a
record of the machine it ran on and of the run's totals (`PhaseClock.run_record`).

Example:
    >>> import time
    >>> with PhaseClock() as clock:
    ...     with clock.phase("sleep"):
    ...         time.sleep(0.01)
    >>> clock.table()["sleep"]["wall_s"] >= 0.01
    True
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import time
from collections.abc import Iterator
from typing import Any

import jax

logger = logging.getLogger(__name__)

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class PhaseClock:
    """Wall, CPU (user + sys of this process) and XLA compile seconds per named phase.

    Used as a context manager around an experiment (it listens to JAX's compile events while open);
    ``with clock.phase(name):`` times one phase and logs it with the elapsed time. Repeated
    names accumulate. ``clock.table()`` is what results.json stores as ``meta["timings"]``.

    Example:
        >>> import jax.numpy as jnp
        >>> with PhaseClock() as clock:
        ...     with clock.phase("compile and run"):
        ...         _ = jax.jit(lambda x: x * 3 + 1)(jnp.arange(5.0))
        >>> row = clock.table()["compile and run"]
        >>> sorted(row), row["compiles"] >= 1
        (['compile_s', 'compiles', 'cpu_s', 'wall_s'], True)
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._compiled = [0.0, 0]  # seconds, count
        self._t0, self._cpu0, self._load0 = time.perf_counter(), time.process_time(), load_average()

    def _on_event(self, event: str, seconds: float, **_: Any) -> None:
        if event == _COMPILE_EVENT:
            self._compiled[0] += seconds
            self._compiled[1] += 1

    def __enter__(self) -> PhaseClock:
        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        jax.monitoring.unregister_event_duration_listener(self._on_event)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the ``with`` body as phase ``name`` (repeated names accumulate)."""
        wall, cpu = time.perf_counter(), time.process_time()
        c_s, c_n = self._compiled
        try:
            yield
        finally:
            row = self.phases.setdefault(
                name, {"wall_s": 0.0, "cpu_s": 0.0, "compile_s": 0.0, "compiles": 0}
            )
            row["wall_s"] += time.perf_counter() - wall
            row["cpu_s"] += time.process_time() - cpu
            row["compile_s"] += self._compiled[0] - c_s
            row["compiles"] += self._compiled[1] - c_n
            logger.info(
                "[%5.0f s] %s: %.1f s wall, %.1f s CPU, %d XLA compiles (%.1f s)",
                time.perf_counter() - self._t0,
                name,
                row["wall_s"],
                row["cpu_s"],
                row["compiles"],
                row["compile_s"],
            )

    def table(self) -> dict[str, dict[str, float]]:
        """``{phase: {"wall_s", "cpu_s", "compile_s", "compiles"}}`` rounded for the record."""
        return {
            name: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
            for name, row in self.phases.items()
        }

    def run_record(self, ndigits: int | None = None) -> dict[str, Any]:
        """What a results file records of the run so far: ``machine`` (`machine_info`),
        ``load_average_start`` (when the clock was made) and ``load_average_end`` (now),
        ``total_seconds`` and ``total_cpu_seconds`` since the clock was made (rounded to
        ``ndigits`` when given), and ``timings`` (`table`).

        Example:
            >>> record = PhaseClock().run_record(ndigits=1)
            >>> list(record)[:2], record["total_seconds"] >= 0.0
            (['machine', 'load_average_start'], True)
        """
        wall, cpu = time.perf_counter() - self._t0, time.process_time() - self._cpu0
        if ndigits is not None:
            wall, cpu = round(wall, ndigits), round(cpu, ndigits)
        return {
            "machine": machine_info(),
            "load_average_start": self._load0,
            "load_average_end": load_average(),
            "total_seconds": wall,
            "total_cpu_seconds": cpu,
            "timings": self.table(),
        }


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none).

    Example:
        >>> avg = load_average()
        >>> avg is None or len(avg) == 3
        True
    """
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict[str, Any]:
    """The platform, CPU count, JAX backend, devices and versions, for a results record.

    Example:
        >>> sorted(machine_info())
        ['cpu_count', 'devices', 'jax', 'jax_backend', 'platform', 'processor', 'python']
    """
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
    }
