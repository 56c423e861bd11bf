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

The seam for multi-host runs is `StopRequest.requested`: every process must stop at the same
step, so a multi-host run replaces it with an agreement across processes (e.g. any process's
flag, gathered at the boundary) by passing its own ``agree`` callable.

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

logger = logging.getLogger(__name__)

# Exit status of a run stopped by SIGTERM after a checkpoint (EX_TEMPFAIL: "try again").
EXIT_PREEMPTED = 75
# Exit status of a run stopped by Ctrl-C (128 + SIGINT), with or without a checkpoint.
EXIT_INTERRUPTED = 130


class StopRequest:
    """Whether a stop was asked for (by which signal), as the training loop sees it.

    Example:
        >>> stop = StopRequest()
        >>> stop.ask("SIGTERM"); stop.requested(), stop.signal
        (True, 'SIGTERM')
    """

    def __init__(self, agree: Callable[[bool], bool] | None = None):
        """Args:
        agree: maps this process's flag to the decision all processes take (multi-host);
            None: the flag itself.
        """
        self.signal: str | None = None  # "SIGTERM" or "SIGINT" once asked
        self.unsaved = False  # set by the loop: steps exist that no checkpoint holds
        self._agree = agree

    def ask(self, name: str) -> None:
        """Records a stop request (the first signal's name is kept)."""
        self.signal = self.signal or name

    def requested(self) -> bool:
        """Whether to stop at this step boundary (called by every process at every boundary)."""
        flag = self.signal is not None
        return self._agree(flag) if self._agree is not None else flag

    def handle(self, signum: int, frame: Any = None) -> None:
        """The signal handler (installed by `catch_stop_signals`).

        Raises:
            KeyboardInterrupt: a second Ctrl-C, or a first one with nothing unsaved.
        """
        del frame
        if signum == signal.SIGINT:
            if self.signal is not None or not self.unsaved:
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
def catch_stop_signals(agree: Callable[[bool], bool] | None = None) -> Iterator[StopRequest]:
    """SIGTERM and SIGINT set the yielded `StopRequest` inside the block; the previous
    handlers come back after it. Off the main thread (where Python cannot handle signals)
    nothing is installed and the request is never set.

    Args:
        agree: see `StopRequest`.

    Yields:
        The `StopRequest`.
    """
    stop = StopRequest(agree)
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, stop.handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "StopRequest",
    "catch_stop_signals",
]
