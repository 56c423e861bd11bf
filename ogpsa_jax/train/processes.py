"""The processes of a multi-process job meeting at a point: `sync_processes`.

Files of a run are written by process 0 (``config.json``, metrics, ``final/``) or by all of
them together (orbax checkpoints); where another process reads what process 0 wrote, or
process 0 removes what the others might open, every process first meets at a named point.
With one process nothing happens.

Example:
    >>> sync_processes("run folder ready")  # one process: returns at once
"""

from __future__ import annotations

import logging

import jax
from jax.experimental import multihost_utils

logger = logging.getLogger(__name__)


def sync_processes(name: str) -> None:
    """Blocks until every process of the job has reached the point ``name`` (no-op alone).

    Args:
        name: the meeting point, the same string on every process.
    """
    if jax.process_count() > 1:
        logger.debug("waiting for every process at %r", name)
        multihost_utils.sync_global_devices(name)


__all__ = ["sync_processes"]
