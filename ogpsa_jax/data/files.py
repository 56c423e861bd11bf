"""Where a data source string points (a local file or folder, or a hub id) and how a local file
is read: JSON lines, a JSON list or Parquet, recognised by extension or by content, so a
``.txt`` or extension-less file works. Only a string that is not an existing path and looks like
``org/name`` is taken for a Hugging Face hub id; anything else missing is a named error.

Example:
    >>> looks_like_hub_id("PKU-Alignment/PKU-SafeRLHF"), looks_like_hub_id("my_data.txt")
    (True, False)
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Extensions that make a missing `org/name.ext` a missing file rather than a hub id.
DATA_SUFFIXES = (*FILE_FORMATS, ".txt", ".csv", ".tsv", ".gz", ".zst")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


def _json_lines(path: pathlib.Path, text: str) -> list[tuple[int | None, Any]]:
    lines = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            lines.append((lineno, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{path}: row {len(lines)} (line {lineno}): unreadable JSON: {e.msg}"
            ) from None
    return lines


def read_rows_by_hand(path: pathlib.Path) -> list[dict[str, Any]]:
    """Parses a JSON list or JSON-lines file by hand, to name the first unreadable row.

    Args:
        path: the file.

    Returns:
        Its rows.

    Raises:
        ValueError: naming the file, the row (from 0) and the line of the first unreadable one.

    Example:
        >>> from ogpsa_jax.data.sources import assets_path
        >>> read_rows_by_hand(assets_path("general.jsonl"))[0]["prompt"]
        'What is 58 + 16?'
    """
    text = path.read_text(encoding="utf-8")
    if not text.lstrip().startswith("["):
        lines = _json_lines(path, text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: unreadable JSON at line {e.lineno}: {e.msg}") from None
        lines = [(None, r) for r in data]
    rows = []
    for i, (lineno, row) in enumerate(lines):
        if not isinstance(row, dict):
            where = f"row {i}" + (f" (line {lineno})" if lineno else "")
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def looks_like_hub_id(source: str) -> bool:
    """True for a string shaped like a Hugging Face data set id, ``org/name``.

    Only a string that is not an existing local path is ever taken for a hub id; this decides
    whether a missing one is a hub id or a missing file (a data-file extension, a leading
    ``/``, ``.`` or ``~``, or more than one ``/`` make it a path).

    Example:
        >>> looks_like_hub_id("PKU-Alignment/PKU-SafeRLHF"), looks_like_hub_id("data/x.jsonl")
        (True, False)
    """
    return bool(_HUB_ID.fullmatch(source)) and pathlib.Path(source).suffix not in DATA_SUFFIXES


def source_kind(source: str | os.PathLike) -> str:
    """Where a data source string points: ``"file"``, ``"folder"`` (both local) or ``"hub"``.

    Args:
        source: a local path (any extension) or a hub id ``org/name``.

    Returns:
        ``"file"`` or ``"folder"`` for an existing local path, else ``"hub"``.

    Raises:
        ValueError: the string is neither an existing path nor shaped like a hub id (a missing
            local file, named).

    Example:
        >>> from ogpsa_jax.data.sources import assets_path
        >>> source_kind(assets_path("general.jsonl")), source_kind("org/name")
        ('file', 'hub')
    """
    path = pathlib.Path(os.fspath(source)).expanduser()
    if path.is_file():
        return "file"
    if path.is_dir():
        return "folder"
    if looks_like_hub_id(os.fspath(source)):
        return "hub"
    raise ValueError(
        f"{os.fspath(source)}: no such file or folder (a Hugging Face data set id looks like "
        "'org/name')"
    )


def local_format(path: pathlib.Path) -> str:
    """``"parquet"`` or ``"json"`` (a JSON list or JSON lines), by extension or content.

    Raises:
        ValueError: the file is neither (named, with how it starts).

    Example:
        >>> from ogpsa_jax.data.sources import assets_path
        >>> local_format(assets_path("general.jsonl"))
        'json'
    """
    if path.suffix in FILE_FORMATS:
        return FILE_FORMATS[path.suffix]
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.lstrip()[:1] in (b"{", b"["):
        return "json"
    start = head.lstrip()[:40].decode("utf-8", errors="replace")
    raise ValueError(
        f"{path}: not a JSON-lines, JSON or Parquet file (it starts with {start!r}); the "
        "accepted formats are in docs/data.md"
    )


__all__ = [
    "DATA_SUFFIXES",
    "FILE_FORMATS",
    "local_format",
    "looks_like_hub_id",
    "read_rows_by_hand",
    "source_kind",
]
