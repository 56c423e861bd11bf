"""``ogpsa experiment NAME [ARGS...]``: runs an experiment of the repository checkout.

Experiments (``experiments/NAME``) are not part of the installed package; they sit next to it
in a checkout (an editable install). `run_experiment` runs ``python -m experiments.NAME`` in
this process from that checkout, with the experiment's own argument parser.

Example:
    >>> "demo" in experiment_names(experiments_dir())
    True
"""

from __future__ import annotations

import pathlib
import runpy
import sys
from collections.abc import Sequence

EXIT_BAD_INPUT = 2  # the CLI's status for bad arguments (ogpsa_jax.cli.EXIT_BAD_INPUT)


def experiments_dir() -> pathlib.Path:
    """The ``experiments/`` folder of the repository checkout holding this ``ogpsa_jax``.

    Experiments are not part of the installed package: they exist next to it only in a
    checkout (an editable install, ``pip install -e .``).

    Example:
        >>> experiments_dir().name
        'experiments'
    """
    return pathlib.Path(__file__).resolve().parent.parent / "experiments"


def experiment_names(root: pathlib.Path) -> list[str]:
    """The experiments in ``root``: packages with a ``__main__.py`` and top-level scripts.

    Example:
        >>> "demo" in experiment_names(experiments_dir())
        True
    """
    packages = [p.name for p in root.iterdir() if (p / "__main__.py").is_file()]
    scripts = [p.stem for p in root.glob("*.py") if not p.name.startswith("_")]
    return sorted(packages + scripts)


def run_experiment(argv: Sequence[str], root: pathlib.Path | None = None) -> int:
    """``ogpsa experiment NAME ARGS...``: runs ``python -m experiments.NAME ARGS...`` in this
    process, from the checkout that holds this package (the working directory is unchanged).

    Args:
        argv: the experiment's name, then its own arguments.
        root: the experiments folder (default `experiments_dir`).

    Returns:
        The experiment's exit status; 2 when the folder or the experiment does not exist.
    """
    root = experiments_dir() if root is None else pathlib.Path(root)
    prog = "ogpsa experiment"
    if not root.is_dir():
        sys.stderr.write(
            f"{prog}: error: no experiments/ folder next to the installed ogpsa_jax package "
            f"({root}). Experiments run from a repository checkout: clone the repository, "
            "install it with `pip install -e .`, and run `ogpsa experiment NAME` (or "
            "`python -m experiments.NAME` from its root).\n"
        )
        return EXIT_BAD_INPUT
    names = experiment_names(root)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(f"usage: {prog} NAME [ARGS...]; experiments: {', '.join(names)}\n")
        return 0 if argv else EXIT_BAD_INPUT
    name, args = argv[0], list(argv[1:])
    if name not in names:
        sys.stderr.write(f"{prog}: error: unknown experiment {name!r}; in {root}: {names}\n")
        return EXIT_BAD_INPUT
    checkout = str(root.parent)
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    saved_argv = sys.argv
    sys.argv = [f"{prog} {name}", *args]
    try:
        runpy.run_module(f"experiments.{name}", run_name="__main__", alter_sys=True)
    except SystemExit as e:  # the experiment's own exit status
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return 0


__all__ = ["experiment_names", "experiments_dir", "run_experiment"]
