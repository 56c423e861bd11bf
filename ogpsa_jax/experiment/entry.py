"""The start every study of ``experiments/`` shares: its command line and its output folders.

A study's ``__main__`` builds its parser with `experiment_parser` (a size preset flag, --out,
--cache, --set FIELD=VALUE, --log-level), adds its own options, and turns the arguments into a
validated config with `configured` (exit status 2 when that returns None: the error is written
and nothing was loaded or written); its run function resolves the folders with `output_dirs`.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True)
    ... class Config:
    ...     steps: int = 10
    >>> presets = {"default": Config, "tiny": lambda: Config(steps=2)}
    >>> parser = experiment_parser("study", "A study.", sizes={"tiny": "seconds"}, out="res")
    >>> args = parser.parse_args(["--tiny", "--set", "steps=3"])
    >>> configured(args, presets, lambda c: None, "study", setup_logs=False)
    Config(steps=3)
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ogpsa_jax.overrides import apply_overrides


def experiment_parser(
    prog: str,
    description: str,
    *,
    sizes: Mapping[str, str],
    out: str,
    set_help: str | None = None,
) -> argparse.ArgumentParser:
    """The options every study has: one size flag of ``sizes`` (none given: the "default"
    preset), ``--out``, ``--cache``, repeated ``--set FIELD=VALUE`` and ``--log-level``.

    Args:
        prog: the program name in usage and error lines.
        description: the study in one line.
        sizes: preset name -> help of its flag (``--NAME``; the flags exclude each other).
        out: the default output folder.
        set_help: help of ``--set``.

    Returns:
        The parser, to which a study may add its own options.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    size = parser.add_mutually_exclusive_group()
    for name, help_text in sizes.items():
        size.add_argument(f"--{name}", action="store_true", help=help_text)
    parser.add_argument("--out", default=out, help="output folder")
    parser.add_argument("--cache", default=None, help="cache folder (default OUT/cache)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help=set_help)
    parser.add_argument("--log-level", default="INFO")
    return parser


def configured(
    args: argparse.Namespace,
    presets: Mapping[str, Callable[[], Any]],
    validate: Callable[[Any], None],
    prog: str,
    *,
    setup_logs: bool = True,
) -> Any | None:
    """The preset of the size flag given (else "default"), with the ``--set`` overrides, checked.

    Args:
        args: parsed `experiment_parser` arguments.
        presets: preset name -> function returning a config ("default" among them).
        validate: the study's config check (raises ValueError).
        prog: the program name for the error line.
        setup_logs: first set up logging at ``--log-level`` (timestamped lines; absl's
            checkpoint details, which orbax logs, kept to warnings).

    Returns:
        The config, or None after writing ``PROG: error: ...`` to stderr for a bad override or
        config.
    """
    if setup_logs:
        logging.basicConfig(
            level=getattr(logging, args.log_level.upper(), logging.INFO),
            format="%(asctime)s %(name)s: %(message)s",
            force=True,  # absl (imported through orbax) installs a root handler first
        )
        logging.getLogger("absl").setLevel(logging.WARNING)
    name = next((n for n in presets if n != "default" and getattr(args, n, False)), "default")
    config = presets[name]()
    try:
        config = apply_overrides(config, args.set)
        validate(config)
    except ValueError as e:
        sys.stderr.write(f"{prog}: error: {e}\n")
        return None
    return config


def output_dirs(out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None) -> tuple[str, str]:
    """The output folder and the cache folder (default ``out_dir/cache``), the cache made.

    Example:
        >>> import tempfile
        >>> out, cache = output_dirs(tempfile.mkdtemp(), None)
        >>> os.path.isdir(cache), cache == os.path.join(out, "cache")
        (True, True)
    """
    out_dir = os.fspath(out_dir)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(out_dir, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    return out_dir, cache_dir


def compilation_cache(cache_dir: str | os.PathLike) -> str:
    """Turns on JAX's persistent compilation cache in ``cache_dir/xla`` unless
    ``JAX_COMPILATION_CACHE_DIR`` names one; returns the folder in use.

    A study builds a new train step per run and seed with the same shapes: with the cache, XLA
    compiles each program once per machine, and later runs (and reruns of the study) load it.
    JAX reads the setting at the process's first compile, so a command line calls this before
    any JAX work; called later, it has no effect for that process.

    Example:
        >>> import tempfile
        >>> os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None or compilation_cache(
        ...     tempfile.mkdtemp()).endswith("xla")
        True
    """
    import jax

    named = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if named:
        return named
    path = os.path.join(os.fspath(cache_dir), "xla")
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    return path
