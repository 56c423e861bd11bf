"""The row schemas of SFT and preference sources: their fields, detection, and one row's example.

Schemas (see `ogpsa_jax.data.sources` for where the rows come from):

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

A row that does not fit raises `RowError` (the field and the problem); a row left out by a
filter raises `Dropped` (the reason), so the reader can name the row or count the reasons.

Example:
    >>> row = {"knowledge": "", "question": "2 + 3?", "right_answer": "5",
    ...        "hallucinated_answer": "6"}
    >>> schema = detect_schema(row, "rows")
    >>> schema, sft_from_row(row, schema, safe_only=False)
    ('halueval_qa', SFTExample(prompt='2 + 3?', response='5', history=()))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ogpsa_jax.data.examples import PreferencePair, SFTExample

SCHEMAS = ("pku_saferlhf", "halueval_qa", "preferences", "sft", "messages")
SCHEMA_FIELDS = {
    "pku_saferlhf": ("prompt", "response_0", "response_1", "safer_response_id"),
    "halueval_qa": ("knowledge", "question", "right_answer", "hallucinated_answer"),
    "preferences": ("prompt", "chosen", "rejected"),
    "sft": ("prompt", "response"),
    "messages": ("messages",),
}


class RowError(Exception):
    """A row that does not fit its schema: the field and the problem (the caller adds the row)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"field {field!r} {problem}")
        self.field = field


class Dropped(Exception):
    """A valid row left out for a documented reason (a filter such as ``safe_pairs_only``)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _text(
    row: Mapping[str, Any], field: str, *, allow_empty: bool = False, label: str | None = None
) -> str:
    label = label or field
    if field not in row or row[field] is None:
        raise RowError(label, "is missing")
    value = row[field]
    if not isinstance(value, str):
        raise RowError(label, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RowError(label, "is empty")
    return value


def _chat(value: Any, field: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """Splits a message list into (history, final user prompt, final assistant reply)."""
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) < 2:
        raise RowError(field, "must be a list of at least two messages (user, assistant)")
    turns = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping):
            raise RowError(f"{field}[{j}]", "must be a mapping with 'role' and 'content'")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RowError(f"{field}[{j}].role", f"must be system/user/assistant, got {role!r}")
        last_two = j >= len(value) - 2  # the final prompt and reply must not be empty
        content = _text(m, "content", allow_empty=not last_two, label=f"{field}[{j}].content")
        turns.append((role, content))
    if turns[-1][0] != "assistant" or turns[-2][0] != "user":
        raise RowError(field, "must end with a user message followed by an assistant message")
    return tuple(turns[:-2]), turns[-2][1], turns[-1][1]


def _side(row: Mapping[str, Any], field: str) -> tuple[tuple[tuple[str, str], ...], str, str]:
    """A preference side: a string reply to ``prompt``, or a full message list."""
    if field not in row or row[field] is None:
        raise RowError(field, "is missing")
    if isinstance(row[field], str):
        return (), _text(row, "prompt"), _text(row, field)
    return _chat(row[field], field)


def _pku_pair(row: Mapping[str, Any], safe_pairs_only: bool) -> tuple[str, str, str]:
    prompt = _text(row, "prompt")
    responses = (_text(row, "response_0"), _text(row, "response_1"))
    safer = row.get("safer_response_id")
    if safer not in (0, 1) or isinstance(safer, bool):
        raise RowError("safer_response_id", f"must be 0 or 1, got {safer!r}")
    if safe_pairs_only:
        safe = []
        for k in (0, 1):
            flag = row.get(f"is_response_{k}_safe")
            if not isinstance(flag, bool):
                raise RowError(f"is_response_{k}_safe", f"must be a bool, got {flag!r}")
            safe.append(flag)
        if safe[0] == safe[1]:
            raise Dropped("not exactly one safe response")
        if not safe[safer]:
            raise Dropped("safer_response_id points to the unsafe response")
    return prompt, responses[safer], responses[1 - safer]


def _halueval_prompt(row: Mapping[str, Any]) -> str:
    knowledge = _text(row, "knowledge", allow_empty=True).strip()
    question = _text(row, "question")
    return f"{knowledge}\n\n{question}" if knowledge else question


def sft_from_row(row: Mapping[str, Any], schema: str, *, safe_only: bool) -> SFTExample:
    """One row of ``schema`` as an SFT example (see the module docstring for each schema).

    Args:
      row: the row.
      schema: one of `SCHEMAS`.
      safe_only: PKU-SafeRLHF: drop a row whose safer response is not labelled safe.

    Returns:
      The `SFTExample`.

    Raises:
      RowError: a missing, empty or ill-typed field.
      Dropped: a row ``safe_only`` leaves out.

    Example:
      >>> sft_from_row({"prompt": "Hi", "response": "Hello."}, "sft", safe_only=False).response
      'Hello.'
    """
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
            raise Dropped("safer response is not labelled safe")
    return SFTExample(prompt, safer)


def pair_from_row(row: Mapping[str, Any], schema: str, *, safe_pairs_only: bool) -> PreferencePair:
    """One row of ``schema`` as a preference pair (see the module docstring for each schema).

    Args:
      row: the row.
      schema: "preferences", "halueval_qa" or "pku_saferlhf".
      safe_pairs_only: PKU-SafeRLHF: keep only pairs with exactly one safe response.

    Returns:
      The `PreferencePair`.

    Raises:
      RowError: a missing, empty or ill-typed field, or chosen and rejected in different
        conversations.
      Dropped: a pair ``safe_pairs_only`` leaves out.
      ValueError: a schema with no preference fields.

    Example:
      >>> row = {"prompt": "2 + 2?", "chosen": "4", "rejected": "5"}
      >>> pair_from_row(row, "preferences", safe_pairs_only=False).rejected
      '5'
    """
    if schema == "preferences":
        history_c, prompt_c, chosen = _side(row, "chosen")
        history_r, prompt_r, rejected = _side(row, "rejected")
        if (history_c, prompt_c) != (history_r, prompt_r):
            raise RowError("rejected", "has a different conversation before the reply than chosen")
        return PreferencePair(prompt_c, chosen, rejected, history_c)
    if schema == "halueval_qa":
        return PreferencePair(
            _halueval_prompt(row), _text(row, "right_answer"), _text(row, "hallucinated_answer")
        )
    if schema == "pku_saferlhf":
        return PreferencePair(*_pku_pair(row, safe_pairs_only))
    raise ValueError(f"schema {schema!r} has no preference fields")


def detect_schema(columns: Iterable[str], name: str) -> str:
    """The first schema of `SCHEMAS` whose fields are all among ``columns``.

    Args:
      columns: the source's column names.
      name: the source's display name, for the error.

    Returns:
      The schema's name.

    Raises:
      ValueError: when no schema matches, listing each schema's fields.

    Example:
      >>> detect_schema(["prompt", "chosen", "rejected", "score"], "rows")
      'preferences'
    """
    cols = set(columns)
    for schema in SCHEMAS:
        if set(SCHEMA_FIELDS[schema]) <= cols:
            return schema
    expected = {s: list(f) for s, f in SCHEMA_FIELDS.items()}
    raise ValueError(
        f"{name}: columns {sorted(cols)} match no known schema; expected one of {expected}"
    )
