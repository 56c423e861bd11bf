"""Host-side metric sinks: ``metrics.jsonl`` (append; truncated to the resumed step) and
TensorBoard event files (tensorboardX).

Example:
    >>> log = MetricsLog(out_dir, resume_step=0)  # doctest: +SKIP
    >>> log.write(1, {"loss": 2.3})  # doctest: +SKIP
    >>> log.close()  # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from tensorboardX import SummaryWriter


def _clean(value: Any) -> Any:
    value = float(value) if not isinstance(value, int | str) else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf
    return value


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file (one dict per line; a cut-off last line is ignored)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    out = []
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:  # only the last line can be cut off by a crash
                raise ValueError(f"{path}: line {i + 1} is not valid JSON") from None
    return out


class MetricsLog:
    """Appends per-step scalars to ``DIR/metrics.jsonl`` and ``DIR/tb`` event files.

    On resume from step s, lines with ``step > s`` (written after the checkpoint, before a
    crash) are dropped first, so the file of a resumed run equals an uninterrupted run's.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        resume_step: int,
        tensorboard: bool = True,
        enabled: bool = True,
    ):
        self.path = os.path.join(os.fspath(directory), "metrics.jsonl")
        self._file, self._tb = None, None
        if not enabled:  # non-zero processes of a multi-host job log nothing
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        with open(self.path + ".tmp", "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(self.path + ".tmp", self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 -- closed in close()
        if tensorboard:
            self._tb = SummaryWriter(
                os.path.join(os.fspath(directory), "tb"), purge_step=resume_step + 1
            )

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes one record (flushed, so a crash loses nothing already written)."""
        if self._file is None:
            return
        record = {"step": int(step), **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        """Flushes and closes both sinks."""
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
