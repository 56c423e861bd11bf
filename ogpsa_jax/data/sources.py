"""Loading SFT examples and preference pairs from Hugging Face data sets and local files.

The columns of a source select its schema (`ogpsa_jax.data.schemas`: PKU-SafeRLHF, HaluEval
QA, preferences, sft, messages), or ``schema=`` forces one.

A missing field, an empty text or an unreadable row raises ``ValueError`` naming the source, the
row (counted from 0) and the field. Rows dropped for a documented reason (a filter such as
``safe_pairs_only``, or ``skip_invalid=True``) are counted and the counts logged.
"""

from __future__ import annotations

import collections
import importlib.resources
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from ogpsa_jax.data.examples import PreferencePair, SFTExample
from ogpsa_jax.data.files import local_format, read_rows_by_hand, source_kind
from ogpsa_jax.data.schemas import (
    SCHEMAS,
    Dropped,
    RowError,
    detect_schema,
    pair_from_row,
    sft_from_row,
)

log = logging.getLogger(__name__)

# Defaults for the hub ids the paper uses: config name, and the split when none is given.
_HUB_DEFAULTS: dict[str, dict[str, str]] = {
    "PKU-Alignment/PKU-SafeRLHF": {"sft": "train", "prefs": "train"},
    "HuggingFaceH4/ultrafeedback_binarized": {"sft": "train_sft", "prefs": "train_prefs"},
    "pminervini/HaluEval": {"name": "qa", "sft": "data", "prefs": "data"},
}

Source = str | os.PathLike | Sequence[Mapping[str, Any]] | Any  # Any: a datasets.Dataset


def assets_path(name: str = "") -> pathlib.Path:
    """Path of a shipped asset, e.g. ``"tiny_tokenizer"`` or ``"data/general.jsonl"``.

    A bare file name is also looked up under ``data/``.

    Args:
      name: path relative to ``ogpsa_jax/assets``; empty for the folder itself.

    Returns:
      The asset's path on disk.

    Raises:
      ValueError: if no such asset exists.

    Example:
      >>> examples = load_sft(assets_path("safety_sft.jsonl"))
    """
    root = pathlib.Path(str(importlib.resources.files("ogpsa_jax") / "assets"))
    for path in (root / name, root / "data" / name):
        if path.exists():
            return path
    shipped = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    raise ValueError(f"no shipped asset {name!r}; available: {shipped}")


# ----------------------------------------------------------------------------- reading rows


def _open(
    source: Source, split: str | None, name: str | None, kind: str
) -> tuple[str, Iterable[Mapping[str, Any]], list[str], Callable[[], list[dict]] | None]:
    """Returns (display name, rows, column names, by-hand re-reader for a local JSON file)."""
    where = source_kind(source) if isinstance(source, (str, os.PathLike)) else None
    if where == "file":
        path = pathlib.Path(os.fspath(source)).expanduser()
        import datasets

        fmt = local_format(path)
        reread = (lambda: read_rows_by_hand(path)) if fmt == "json" else None
        try:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as e:  # noqa: BLE001 -- datasets raises many types; name the row instead
            if reread is None:
                raise ValueError(f"{path}: could not be read: {e}") from e
            rows = reread()  # raises a ValueError naming the unreadable row, if any
            cols = sorted({k for r in rows for k in r})
            return str(path), rows, cols, None
        return str(path), ds, list(ds.column_names), reread
    if where is not None:  # a local folder of data files, or a hub id
        import datasets

        source = str(pathlib.Path(os.fspath(source)).expanduser()) if where == "folder" else source
        defaults = _HUB_DEFAULTS.get(source, {})
        split = split or defaults.get(kind, "train")
        name = name or defaults.get("name")
        ds = datasets.load_dataset(source, name=name, split=split)
        return f"{source}[{split}]", ds, list(ds.column_names), None
    if hasattr(source, "column_names"):  # a datasets.Dataset
        return "<dataset>", source, list(source.column_names), None
    if isinstance(source, Sequence):
        cols = sorted({k for r in source if isinstance(r, Mapping) for k in r})
        return "<rows>", source, cols, None
    raise ValueError(
        f"source must be a hub id, a file path, a Dataset or a list of rows, got {source!r}"
    )


def _collect(
    source: Source,
    *,
    kind: str,
    split: str | None,
    name: str | None,
    schema: str | None,
    limit: int | None,
    skip_invalid: bool,
    convert: Callable[[Mapping[str, Any], str], Any],
) -> list[Any]:
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    if schema is not None and schema not in SCHEMAS:
        raise ValueError(f"schema must be one of {SCHEMAS}, got {schema!r}")
    display, rows, cols, reread = _open(source, split, name, kind)
    schema = schema or detect_schema(cols, display)
    if kind == "prefs" and schema in ("sft", "messages"):
        raise ValueError(
            f"{display}: schema {schema!r} has no preference fields; need "
            "prompt/chosen/rejected, PKU-SafeRLHF or HaluEval columns"
        )
    out, dropped = [], collections.Counter()

    def run(rows: Iterable[Mapping[str, Any]]) -> Iterator[tuple[int, Any]]:
        for i, row in enumerate(rows):
            if limit is not None and len(out) >= limit:
                return
            if not isinstance(row, Mapping):
                raise ValueError(
                    f"{display}: row {i}: expected a mapping, got {type(row).__name__}"
                )
            try:
                yield i, convert(row, schema)
            except Dropped as d:
                dropped[d.reason] += 1
            except RowError as e:
                if not skip_invalid:
                    raise ValueError(f"{display}: row {i}: {e}") from None
                dropped[f"invalid {e.field}"] += 1

    try:
        for _, example in run(rows):
            out.append(example)
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 -- a row datasets cannot decode lazily
        if reread is None:
            raise ValueError(f"{display}: could not be read: {e}") from e
        out, dropped = [], collections.Counter()
        for _, example in run(reread()):
            out.append(example)
    n_dropped = sum(dropped.values())
    if n_dropped:
        reasons = ", ".join(f"{r}: {c}" for r, c in sorted(dropped.items()))
        log.info("%s: kept %d rows, dropped %d (%s)", display, len(out), n_dropped, reasons)
    else:
        log.info("%s: loaded %d %s rows (schema %s)", display, len(out), kind, schema)
    if not out:
        raise ValueError(f"{display}: no usable rows (schema {schema}, dropped {dict(dropped)})")
    return out


def load_sft(
    source: Source,
    *,
    split: str | None = None,
    limit: int | None = None,
    schema: str | None = None,
    name: str | None = None,
    safe_only: bool = False,
    skip_invalid: bool = False,
) -> list[SFTExample]:
    """Loads SFT examples from a hub id, a local .json/.jsonl/.parquet file, or rows.

    Args:
      source: a Hugging Face data set id, a local file path, a ``datasets.Dataset`` or a list
        of row dicts.
      split: the split; None picks the source's default (``train``; ``train_sft`` for
        ultrafeedback_binarized; ``data`` for HaluEval).
      limit: keep the first ``limit`` usable rows.
      schema: force a schema (see `ogpsa_jax.data.schemas`); None detects it from the columns.
      name: the hub config name (``qa`` is the default for pminervini/HaluEval).
      safe_only: PKU-SafeRLHF only: drop (and count) rows whose safer response is not safe.
      skip_invalid: drop (and count) invalid rows instead of raising.

    Returns:
      A list of ``SFTExample``.

    Raises:
      ValueError: naming the source, row and field for a missing field, an empty text or an
        unreadable row; or if no usable rows remain.

    Example:
      >>> examples = load_sft(assets_path("general.jsonl"), limit=8)
    """
    return _collect(
        source,
        kind="sft",
        split=split,
        name=name,
        schema=schema,
        limit=limit,
        skip_invalid=skip_invalid,
        convert=lambda row, s: sft_from_row(row, s, safe_only=safe_only),
    )


def load_preferences(
    source: Source,
    *,
    split: str | None = None,
    limit: int | None = None,
    schema: str | None = None,
    name: str | None = None,
    safe_pairs_only: bool = False,
    skip_invalid: bool = False,
) -> list[PreferencePair]:
    """Loads preference pairs from a hub id, a local .json/.jsonl/.parquet file, or rows.

    Args:
      source: a Hugging Face data set id, a local file path, a ``datasets.Dataset`` or a list
        of row dicts.
      split: the split; None picks the source's default (``train``; ``train_prefs`` for
        ultrafeedback_binarized; ``data`` for HaluEval).
      limit: keep the first ``limit`` usable pairs.
      schema: force a schema (see `ogpsa_jax.data.schemas`); None detects it from the columns.
      name: the hub config name.
      safe_pairs_only: PKU-SafeRLHF only: keep only pairs where exactly one response is safe
        (and the safer one is it); the others are counted and logged.
      skip_invalid: drop (and count) invalid rows instead of raising.

    Returns:
      A list of ``PreferencePair``.

    Raises:
      ValueError: naming the source, row and field for a missing field, an empty text or an
        unreadable row; if the schema has no preference fields; or if no usable rows remain.

    Example:
      >>> pairs = load_preferences(assets_path("safety_prefs.jsonl"))
    """
    return _collect(
        source,
        kind="prefs",
        split=split,
        name=name,
        schema=schema,
        limit=limit,
        skip_invalid=skip_invalid,
        convert=lambda row, s: pair_from_row(row, s, safe_pairs_only=safe_pairs_only),
    )
