"""What a stage tells the person watching it: a tqdm bar in a terminal, readable lines elsewhere.

When stderr is a terminal (and INFO is shown), `Progress` draws a tqdm bar. Otherwise (nohup,
SLURM, ``> log``) it logs one line every ``every`` steps, and for the first and last step::

    sft: step 8/12 | loss 2.4410 | grad_norm 0.912 | frac_removed 0.043 | 1650 tok/s | eta 0:00:02

``every`` defaults to about 20 lines per stage. `Progress.phase` wraps a slow phase (the
first step's compile, a basis refresh, the DPO reference pass): a start line when the phase is
slow or its last run was slow (>= `SLOW_S`), and a line with its time when it took that long;
quick phases log at DEBUG only.

Example:
    >>> p = Progress("sft", total=4, initial=0, every=2, bar=False)
    >>> with p.phase("basis refresh before step 1", slow=False):
    ...     pass
    >>> p.step(1, {"loss": 2.5, "grad_norm": 1.0, "frac_removed": 0.1, "tokens_per_s": 100.0})
    >>> p.close()
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import math
import sys
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

SLOW_S = 5.0  # a phase this long (seconds) gets its own start and end lines at INFO
LINES_PER_STAGE = 20  # the default step-line cadence: about this many lines per stage


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=round(max(seconds, 0.0))))


def step_line(kind: str, step: int, total: int, record: dict[str, Any], eta: float | None) -> str:
    """One readable progress line of a step's metrics.

    Example:
        >>> step_line("sft", 3, 12, {"loss": 2.5, "frac_removed": 0.25}, eta=65.0)
        'sft: step 3/12 | loss 2.5000 | frac_removed 0.250 | eta 0:01:05'
    """
    parts = [f"{kind}: step {step}/{total}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    for key in ("grad_norm", "frac_removed"):
        if key in record:
            parts.append(f"{key} {record[key]:.3f}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:.0f} tok/s")
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    if eta is not None:
        parts.append(f"eta {_clock(eta)}")
    return " | ".join(parts)


class Progress:
    """A stage's progress display: a tqdm bar, or log lines (see the module docstring)."""

    def __init__(
        self,
        kind: str,
        *,
        total: int,
        initial: int,
        every: int | None = None,
        bar: bool | None = None,
    ):
        """Args:
        kind: the stage ("sft" or "dpo").
        total: the stage's optimiser steps.
        initial: steps already done (a resumed run).
        every: a line every this many steps without a bar (None: about 20 per stage).
        bar: draw a tqdm bar (None: when stderr is a terminal and INFO is shown).
        """
        if bar is None:
            bar = sys.stderr.isatty() and logger.isEnabledFor(logging.INFO)
        self.kind, self.total, self.initial = kind, total, initial
        self.every = every or max(1, math.ceil(total / LINES_PER_STAGE))
        self._bar = tqdm(total=total, initial=initial, desc=kind, disable=not bar) if bar else None
        self._durations: dict[str, float] = {}
        self._timed: list[float] = []  # step seconds after this process's first step
        self._last = time.perf_counter()

    @contextlib.contextmanager
    def phase(self, name: str, *, slow: bool | None = None) -> Iterator[None]:
        """Times a phase; announces it when it is (or was last time) slow.

        Args:
            name: what the phase does, e.g. "basis refresh before step 5".
            slow: announce its start (None: when the last phase of that kind took >= SLOW_S;
                the key is the name's first word).
        """
        key = name.split()[0]
        if slow is None:
            slow = self._durations.get(key, 0.0) >= SLOW_S
        logger.log(logging.INFO if slow else logging.DEBUG, "%s: %s ...", self.kind, name)
        t0 = time.perf_counter()
        yield
        seconds = time.perf_counter() - t0
        self._durations[key] = seconds
        level = logging.INFO if seconds >= SLOW_S else logging.DEBUG
        logger.log(level, "%s: %s took %.1f s", self.kind, name, seconds)

    def step(self, step: int, record: dict[str, Any]) -> None:
        """Shows step ``step``'s metrics: the bar's postfix, or a line when one is due."""
        now = time.perf_counter()
        if step > self.initial + 1:  # the first step of a process includes the compile
            self._timed.append(now - self._last)
        self._last = now
        if self._bar is not None:
            self._bar.update(1)
            post = {"loss": f"{record.get('loss', float('nan')):.4f}"}
            if "frac_removed" in record:
                post["removed"] = f"{record['frac_removed']:.3f}"
            self._bar.set_postfix(post)
            return
        if step % self.every and step not in (self.initial + 1, self.total):
            return
        eta = None
        if self._timed:
            eta = sum(self._timed) / len(self._timed) * (self.total - step)
        logger.info("%s", step_line(self.kind, step, self.total, record, eta))

    def close(self) -> None:
        """Closes the bar (if any)."""
        if self._bar is not None:
            self._bar.close()


__all__ = ["LINES_PER_STAGE", "SLOW_S", "Progress", "step_line"]
