"""Loading SFT examples and preference pairs from Hugging Face data sets and local files.

Schemas (detected from the columns, or forced with ``schema=``):

- ``"pku_saferlhf"``: PKU-Alignment/PKU-SafeRLHF (``prompt``, ``response_0``, ``response_1``,
  ``is_response_0_safe``, ``is_response_1_safe``, ``safer_response_id``). SFT target = the safer
  response; a preference pair = safer (chosen) vs the other (rejected).
- ``"halueval_qa"``: pminervini/HaluEval config ``qa`` (``knowledge``, ``question``,
  ``right_answer``, ``hallucinated_answer``). Prompt = knowledge + question; SFT target = the
  right answer; a preference pair = right (chosen) vs hallucinated (rejected).
- ``"preferences"``: ``prompt``, ``chosen``, ``rejected``, where chosen/rejected are strings or
  message lists ending with the assistant reply (HuggingFaceH4/ultrafeedback_binarized). As an
  SFT source the target is the chosen reply.
- ``"sft"``: ``prompt``, ``response``.
- ``"messages"``: ``messages``, a chat ending with an assistant message (SFT only).

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

log = logging.getLogger(__name__)

SCHEMAS = ("pku_saferlhf", "halueval_qa", "preferences", "sft", "messages")
_SCHEMA_FIELDS = {
    "pku_saferlhf": ("prompt", "response_0", "response_1", "safer_response_id"),
    "halueval_qa": ("knowledge", "question", "right_answer", "hallucinated_answer"),
    "preferences": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "response"),
    "messages": ("messages",),
}
# Defaults for the hub ids the paper uses: config name, and the split when none is given.
_HUB_DEFAULTS: dict[str, dict[str, str]] = {
    "PKU-Alignment/PKU-SafeRLHF": {"sft": "train", "prefs": "train"},
    "HuggingFaceH4/ultrafeedback_binarized": {"sft": "train_sft", "prefs": "train_prefs"},
    "pminervini/HaluEval": {"name": "qa", "sft": "data", "prefs": "data"},
}

Source = str | os.PathLike | Sequence[Mapping[str, Any]] | Any  # Any: a datasets.Dataset


class _RowError(Exception):
    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field = field


class _Dropped(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


# ----------------------------------------------------------------------------- field helpers


def _text(
    row: Mapping[str, Any], field: str, *, allow_empty: bool = False, label: str | None = None
) -> str:
    label = label or field
    if field not in row or row[field] is None:
        raise _RowError(label, "is missing")
    value = row[field]
    if not isinstance(value, str):
        raise _RowError(label, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RowError(label, "is empty")
    return value


def _chat(value: Any, field: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """Splits a message list into (history, final user prompt, final assistant reply)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise _RowError(field, "must be a list of at least two messages (user, assistant)")
    turns = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise _RowError(f"{field}[{j}]", "must be a mapping with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise _RowError(f"{field}[{j}].role", f"must be system/user/assistant, got {role!r}")
        last_two = j >= len(value) - 2  # the final prompt and reply must not be empty
        content = _text(m, "content", allow_empty=not last_two, label=f"{field}[{j}].content")
        turns.append((role, content))
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise _RowError(field, "must end with a user message followed by an assistant message")
    return tuple(turns[:-2]), turns[-2][1], turns[-1][1]


def _side(row: Mapping[str, Any], field: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """A preference side: a string reply to ``prompt``, or a full message list."""
    if field not in row or row[field] is None:
        raise _RowError(field, "is missing")
    if isinstance(row[field], str):
        return (), _text(row, "prompt"), _text(row, field)
    return _chat(row[field], field)


def _pku_pair(row: Mapping[str, Any], safe_pairs_only: bool) -> tuple[str, str, str]:
    prompt = _text(row, "prompt")
    responses = (_text(row, "response_0"), _text(row, "response_1"))
    safer = row.get("safer_response_id")
    if safer not in (0, 1) or isinstance(safer, bool):
        raise _RowError("safer_response_id", f"must be 0 or 1, got {safer!r}")
    if safe_pairs_only:
        safe = []
        for k in (0, 1):
            flag = row.get(f"is_response_{k}_safe")
            if not isinstance(flag, bool):
                raise _RowError(f"is_response_{k}_safe", f"must be a bool, got {flag!r}")
            safe.append(flag)
        if safe[0] == safe[1]:
            raise _Dropped("not exactly one safe response")
        if not safe[safer]:
            raise _Dropped("safer_response_id points to the unsafe response")
    return prompt, responses[safer], responses[1 - safer]


def _halueval_prompt(row: Mapping[str, Any]) -> str:
    knowledge = _text(row, "knowledge", allow_empty=True).strip()
    question = _text(row, "question")
    return f"{knowledge}\n\n{question}" if knowledge else question


def _sft_from_row(row: Mapping[str, Any], schema: str, *, safe_only: bool) -> SFTExample:
    if schema == "sft":
        return SFTExample(_text(row, "prompt"), _text(row, "response"))
    if schema == "messages":
        history, prompt, response = _chat(row.get("messages"), "messages")
        return SFTExample(prompt, response, history)
    if schema == "preferences":
        history, prompt, response = _side(row, "chosen")
        return SFTExample(prompt, response, history)
    if schema == "halueval_qa":
        return SFTExample(_halueval_prompt(row), _text(row, "right_answer"))
    prompt, safer, _ = _pku_pair(row, safe_pairs_only=False)
    if safe_only:
        k = row["safer_response_id"]
        if row.get(f"is_response_{k}_safe") is not True:
            raise _Dropped("safer response is not labelled safe")
    return SFTExample(prompt, safer)


def _pair_from_row(row: Mapping[str, Any], schema: str, *, safe_pairs_only: bool) -> PreferencePair:
    if schema == "preferences":
        history_c, prompt_c, chosen = _side(row, "chosen")
        history_r, prompt_r, rejected = _side(row, "rejected")
        if (history_c, prompt_c) != (history_r, prompt_r):
            raise _RowError("rejected", "has a different conversation before the reply than chosen")
        return PreferencePair(prompt_c, chosen, rejected, history_c)
    if schema == "halueval_qa":
        return PreferencePair(
            _halueval_prompt(row), _text(row, "right_answer"), _text(row, "hallucinated_answer")
        )
    if schema == "pku_saferlhf":
        return PreferencePair(*_pku_pair(row, safe_pairs_only))
    raise ValueError(f"schema {schema!r} has no preference fields")


# ----------------------------------------------------------------------------- reading rows


def _detect_schema(columns: Iterable[str], name: str) -> str:
    cols = set(columns)
    for schema in SCHEMAS:
        if set(_SCHEMA_FIELDS[schema]) <= cols:
            return schema
    expected = {s: list(f) for s, f in _SCHEMA_FIELDS.items()}
    raise ValueError(
        f"{name}: columns {sorted(cols)} match no known schema; expected one of {expected}"
    )


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
    schema = schema or _detect_schema(cols, display)
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
            except _Dropped as d:
                dropped[d.reason] += 1
            except _RowError as e:
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
      schema: force a schema (see the module docstring); None detects it from the columns.
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
        convert=lambda row, s: _sft_from_row(row, s, safe_only=safe_only),
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
      schema: force a schema (see the module docstring); None detects it from the columns.
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
        convert=lambda row, s: _pair_from_row(row, s, safe_pairs_only=safe_pairs_only),
    )
