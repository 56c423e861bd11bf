"""Log lines for people: one format, other libraries' noise moved to DEBUG, stage prefixes.

`setup_logging` is what the ``ogpsa`` command line calls first. It gives the root logger one
stderr handler whose lines read ``12:03:41 INFO sft: message`` and it moves the noise of other
libraries to DEBUG (visible with ``--log-level DEBUG``): jax's backend probing, absl warnings of
orbax's read-only checkpoint managers, datasets' and transformers' notices and progress bars.
``quiet=True`` keeps warnings and errors only.

Two seams, for multi-host runs and for anything that runs stages:

- ``prefix``: a callable returning text put before every line, e.g. the process index of a
  multi-host job (``lambda: f"[{jax.process_index()}] "``). Default: none.
- `stage`: inside ``with stage("sft"):`` every line gets ``sft: `` in front (unless the
  message already starts with it), so the two stages of ``sft-dpo`` are told apart.

Example:
    >>> import io
    >>> out = io.StringIO()
    >>> setup_logging("INFO", stream=out, time_format="")
    >>> with stage("dpo"):
    ...     logging.getLogger("ogpsa_jax.demo").info("loaded 64 rows")
    >>> out.getvalue()
    'INFO dpo: loaded 64 rows\\n'
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import IO

# Loggers whose INFO and WARNING records are noise for a training run: moved to DEBUG.
NOISY_LOGGERS = (
    "jax._src.xla_bridge",  # "Unable to initialize backend 'tpu'" on every CPU/GPU start
    "jax._src.distributed",  # "Connecting to JAX distributed service on ..." of every process
    "absl",  # orbax: "CheckpointManagerOptions.read_only=True ..." when a run is resumed
    "datasets",  # "JAX version ... available", builder notices
    "transformers",  # advisory notices
    "tensorboardX",
    "orbax",
)
# Environment defaults that silence noise printed outside logging (set before the imports).
QUIET_ENV = {
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",  # "PyTorch was not found ..."
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating train split" bars
    "TF_CPP_MIN_LOG_LEVEL": "2",
}

_STAGE: contextvars.ContextVar[str] = contextvars.ContextVar("ogpsa_log_stage", default="")


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Inside the block, log lines are prefixed with ``name: `` (see the module docstring)."""
    token = _STAGE.set(name)
    try:
        yield
    finally:
        _STAGE.reset(token)


class LineFormatter(logging.Formatter):
    """``TIME LEVEL [prefix][stage: ]message``; ogpsa's own loggers without their name."""

    def __init__(self, time_format: str = "%H:%M:%S", prefix: Callable[[], str] | None = None):
        super().__init__()
        self.time_format = time_format
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if not record.name.startswith("ogpsa_jax") and record.name != "root":
            message = f"[{record.name}] {message}"
        tag = _STAGE.get()
        if tag and not message.startswith(f"{tag}:"):
            message = f"{tag}: {message}"
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        head = self.formatTime(record, self.time_format) + " " if self.time_format else ""
        extra = self.prefix() if self.prefix is not None else ""
        return f"{head}{record.levelname} {extra}{message}"


class NoiseFilter(logging.Filter):
    """Demotes INFO and WARNING records of `NOISY_LOGGERS` to DEBUG, then drops what is below
    the handler's level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        name = record.name
        noisy = any(name == n or name.startswith(n + ".") for n in NOISY_LOGGERS)
        if noisy and record.levelno < logging.ERROR:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return record.levelno >= self.level


def quiet_environment() -> None:
    """Sets `QUIET_ENV` (unless already set); call it before transformers or datasets load."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def setup_logging(
    level: str | int = "INFO",
    *,
    quiet: bool = False,
    stream: IO[str] | None = None,
    prefix: Callable[[], str] | None = None,
    time_format: str = "%H:%M:%S",
) -> None:
    """Configures the root logger for a command-line run (replacing any handler on it).

    Args:
        level: the lowest level shown (``DEBUG`` also shows the other libraries' noise).
        quiet: show warnings and errors only (no progress lines).
        stream: where lines go (default ``sys.stderr``).
        prefix: text put before every message (the multi-host seam; see the module docstring).
        time_format: ``strftime`` format of the time at the start of a line ("" for none).

    Raises:
        ValueError: an unknown level name.
    """
    if isinstance(level, str):
        name = level.upper()
        if name not in logging.getLevelNamesMapping():
            raise ValueError(f"unknown log level {level!r}; use DEBUG, INFO, WARNING or ERROR")
        level = logging.getLevelNamesMapping()[name]
    level = max(level, logging.WARNING) if quiet else level
    quiet_environment()
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(LineFormatter(time_format, prefix))
    handler.addFilter(NoiseFilter(level))
    root = logging.getLogger()
    for old in list(root.handlers):  # absl installs its own on import
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    noise_level = logging.DEBUG if level <= logging.DEBUG else logging.WARNING
    for name in NOISY_LOGGERS:  # what passes reaches the filter, which demotes it to DEBUG
        logging.getLogger(name).setLevel(noise_level)
    _route_transformers()


def _route_transformers() -> None:
    """transformers prints through a handler of its own as well as through the root logger
    (every line twice): keep the root one only."""
    if "transformers" not in sys.modules:
        # function-local: transformers takes a second to import; the command line needs it anyway
        import transformers.utils.logging as tf_logging  # noqa: F401
    tf_logging = sys.modules["transformers.utils.logging"]
    tf_logging.disable_default_handler()
    tf_logging.enable_propagation()


__all__ = [
    "NOISY_LOGGERS",
    "QUIET_ENV",
    "LineFormatter",
    "NoiseFilter",
    "quiet_environment",
    "setup_logging",
    "stage",
]
