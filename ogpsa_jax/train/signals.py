"""Stopping a run cleanly: SIGTERM and Ctrl-C (SIGINT) ask for a checkpoint at the next step
boundary; a second Ctrl-C stops at once.

`catch_stop_signals` installs the handlers for the length of a ``with`` block and yields a
`StopRequest`. The training loop marks when steps exist that no checkpoint holds yet
(`StopRequest.unsaved`) and asks `StopRequest.requested` once per step boundary:

- SIGTERM: the loop finishes the step in flight, checkpoints, and returns (exit status 75).
- Ctrl-C with unsaved steps: the same (exit status 130). With nothing unsaved (loading data,
  compiling, right after a checkpoint) there is nothing to keep, so it stops at once.
- A second Ctrl-C: `KeyboardInterrupt` at once, wherever the run is. A checkpoint being
  written is then left without orbax's commit marker, and the next start removes it and
  resumes from the previous complete one (`ogpsa_jax.train.checkpoint.open_manager`).

In a multi-process job every process must stop at the same step, whichever process the
signal reached: `catch_stop_signals` then agrees the request at every boundary through a
collective (`agree_across_processes`: every process's signal, gathered), so all of them
checkpoint the same step and exit alike, and none is left waiting in a collective. A first
Ctrl-C there always waits for that boundary (stopping one process at once would strand the
others until JAX's heartbeat timeout aborts them).

Example:
    >>> with catch_stop_signals() as stop:
    ...     stop.requested()
    False
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)

# Exit status of a run stopped by SIGTERM after a checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
# Exit status of a run stopped by Ctrl-C (128 + SIGINT), with or without a checkpoint.
EXIT_INTERRUPTED = 130

_CODES = {None: 0, "SIGTERM": 1, "SIGINT": 2}


def agree_across_processes(signal_name: str | None) -> str | None:
    """The stop every process of the job takes, given this process's own request: any
    process's signal (SIGTERM over SIGINT). A collective: every process calls it at the same
    step boundary.

    Args:
        signal_name: "SIGTERM", "SIGINT" or None (no request here).

    Returns:
        The agreed signal name, or None: go on.

    Example:
        >>> agree_across_processes("SIGINT")  # one process: its own request
        'SIGINT'
    """
    codes = multihost_utils.process_allgather(np.array([_CODES[signal_name]], np.int32))
    present = {int(c) for c in np.ravel(codes)} - {0}
    if not present:
        return None
    return "SIGTERM" if 1 in present else "SIGINT"


class StopRequest:
    """Whether a stop was asked for (by which signal), as the training loop sees it.

    Example:
        >>> stop = StopRequest()
        >>> stop.ask("SIGTERM"); stop.requested(), stop.signal
        (True, 'SIGTERM')
    """

    def __init__(self, agree: Callable[[str | None], str | None] | None = None):
        """Args:
        agree: maps this process's request (a signal name or None) to the one every process
            takes (`agree_across_processes` in a multi-process job); None: its own.
        """
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" once asked
        self.unsaved = False  # set by the loop: steps exist that no checkpoint holds
        self._agree = agree

    def ask(self, name: str) -> None:
        """Records a stop request (the first signal's name is kept)."""
        self.signal = self.signal or name

    def requested(self) -> bool:
        """Whether to stop at this step boundary (called by every process at every boundary)."""
        if self._agree is None:
            return self.signal is not None
        agreed = self._agree(self.signal)  # a signal arriving meanwhile counts next time
        if agreed is not None and self.signal is None:
            logger.warning(
                "%s reached another process of the job: checkpointing at this step boundary, "
                "then exiting",
                agreed,
            )
        self.signal = agreed or self.signal
        return agreed is not None

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler (installed by `catch_stop_signals`).

        Raises:
            KeyboardInterrupt: a second Ctrl-C, or a first one with nothing unsaved.
        """
        del frame
        if signum == signal.SIGINT:
            waits = self._agree is not None and self.signal is None  # the others must agree
            if not waits and (self.signal is not None or not self.unsaved):
                raise KeyboardInterrupt
            self.ask("SIGINT")
            logger.warning(
                "Ctrl-C: checkpointing at the next step boundary, then exiting "
                "(Ctrl-C again stops at once and loses the steps since the last checkpoint)"
            )
            return
        self.ask("SIGTERM")
        logger.warning("SIGTERM: checkpointing at the next step boundary, then exiting")


@contextlib.contextmanager
def catch_stop_signals(
    agree: Callable[[str | None], str | None] | None = None,
) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the yielded `StopRequest` inside the block; the previous
    handlers come back after it. Off the main thread (where Python cannot handle signals)
    nothing is installed and the request is never set (in a multi-process job it still
    follows the other processes' signals).

    Args:
        agree: see `StopRequest`; default: `agree_across_processes` when the job has more
            than one process (these handlers then replace the SIGTERM handler of JAX's
            preemption service), else None.

    Yields:
        The `StopRequest`.
    """
    if agree is None and jax.process_count() > 1:
        agree = agree_across_processes
    stop = StopRequest(agree)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            # None: a handler installed outside Python (JAX's preemption service); the default
            signal.signal(s, signal.SIG_DFL if handler is None else handler)


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "StopRequest",
    "agree_across_processes",
    "catch_stop_signals",
]
