"""Tokenisation of SFT examples and preference pairs, with an explicit truncation policy.

Truncation policies for a rendered example longer than ``max_length`` tokens:

- ``"error"``: raise ``ValueError`` naming the example and its length (the default: nothing is
  cut or dropped silently).
- ``"right"``: keep the first ``max_length`` tokens (cuts the end of the response). An example
  left with no target token (the prompt alone fills ``max_length``) is dropped and counted.
- ``"left"``: keep the last ``max_length`` tokens (cuts the start of the prompt, keeps the
  response). Examples whose response alone is longer than ``max_length`` lose its start too;
  they are counted in the log.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Sequence
from typing import Any

from ogpsa_jax.data.chat import render_chat
from ogpsa_jax.data.examples import Encoded, EncodedPair, PreferencePair, SFTExample

log = logging.getLogger(__name__)

TRUNCATION_POLICIES = ("error", "left", "right")


class _Drop(Exception):
    pass


def _check_args(max_length: int, truncation: str) -> None:
    if truncation not in TRUNCATION_POLICIES:
        raise ValueError(f"truncation must be one of {TRUNCATION_POLICIES}, got {truncation!r}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")


def truncate(
    encoded: Encoded, *, max_length: int, truncation: str, counts: collections.Counter, row: int
) -> Encoded:
    """Applies a truncation policy to one encoded example (see the module docstring).

    Args:
      encoded: the example.
      max_length: the longest allowed length.
      truncation: ``"error"``, ``"left"`` or ``"right"``.
      counts: a counter updated with what was cut or dropped.
      row: the example's index, for messages.

    Returns:
      The (possibly cut) example.

    Raises:
      ValueError: with ``"error"``, when the example is longer than ``max_length``.

    Example:
      >>> enc = truncate(enc, max_length=128, truncation="left",  # doctest: +SKIP
      ...                counts=Counter(), row=0)
    """
    n = len(encoded.ids)
    if n <= max_length:
        return encoded
    if truncation == "error":
        raise ValueError(
            f"example {row} has {n} tokens > max_length={max_length}; raise max_length or pass "
            "truncation='left' or 'right'"
        )
    keep = slice(0, max_length) if truncation == "right" else slice(n - max_length, n)
    out = Encoded(encoded.ids[keep], encoded.loss_mask[keep])
    counts[f"truncated_{truncation}"] += 1
    if not out.loss_mask.any():
        counts["dropped_no_target_left"] += 1
        raise _Drop
    if truncation == "left" and encoded.loss_mask[: n - max_length].any():
        counts["response_start_cut"] += 1
    return out


def _encode(tokenizer: Any, example: SFTExample, system_prompt: str | None, turns: str) -> Encoded:
    ids, mask = render_chat(
        tokenizer, example.messages(), system_prompt=system_prompt, train_turns=turns
    )
    return Encoded(ids, mask)


def _log_counts(what: str, kept: int, counts: collections.Counter) -> None:
    if counts:
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
        log.info("tokenised %d %s (%s)", kept, what, detail)


def tokenize_sft(
    tokenizer: Any,
    examples: Sequence[SFTExample],
    *,
    max_length: int,
    truncation: str = "error",
    system_prompt: str | None = None,
    train_turns: str = "all",
) -> list[Encoded]:
    """Renders and tokenises SFT examples; the loss mask covers assistant tokens only.

    Args:
      tokenizer: a fast transformers tokenizer with a chat template.
      examples: the examples.
      max_length: the longest allowed length in tokens.
      truncation: ``"error"``, ``"left"`` or ``"right"`` (see the module docstring).
      system_prompt: optional system message for every example.
      train_turns: ``"all"`` assistant turns (history included) or only the ``"last"``.

    Returns:
      A list of ``Encoded`` (int32 ids, bool loss mask); examples dropped by ``"right"``
      truncation are counted in the log.

    Raises:
      ValueError: on bad arguments, or an over-long example with ``truncation="error"``.

    Example:
      >>> rows = load_sft(assets_path("general.jsonl"))  # doctest: +SKIP
      >>> encoded = tokenize_sft(tok, rows, max_length=64)  # doctest: +SKIP
    """
    _check_args(max_length, truncation)
    counts: collections.Counter = collections.Counter()
    out = []
    for i, example in enumerate(examples):
        if not isinstance(example, SFTExample):
            raise ValueError(f"example {i} is a {type(example).__name__}, not an SFTExample")
        enc = _encode(tokenizer, example, system_prompt, train_turns)
        try:
            out.append(
                truncate(enc, max_length=max_length, truncation=truncation, counts=counts, row=i)
            )
        except _Drop:
            continue
    _log_counts("SFT examples", len(out), counts)
    if not out:
        raise ValueError(f"no example fits max_length={max_length} with a target token left")
    return out


def tokenize_preferences(
    tokenizer: Any,
    pairs: Sequence[PreferencePair],
    *,
    max_length: int,
    truncation: str = "error",
    system_prompt: str | None = None,
) -> list[EncodedPair]:
    """Renders and tokenises preference pairs; each side's loss mask covers its final reply.

    Args:
      tokenizer: a fast transformers tokenizer with a chat template.
      pairs: the pairs.
      max_length: the longest allowed length in tokens, for each side.
      truncation: ``"error"``, ``"left"`` or ``"right"``, applied to each side; a pair is
        dropped (and counted) when either side is.
      system_prompt: optional system message for every pair.

    Returns:
      A list of ``EncodedPair``.

    Raises:
      ValueError: on bad arguments, or an over-long side with ``truncation="error"``.

    Example:
      >>> pairs = tokenize_preferences(  # doctest: +SKIP
      ...     tok, load_preferences(path), max_length=128)
    """
    _check_args(max_length, truncation)
    counts: collections.Counter = collections.Counter()
    out = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, PreferencePair):
            raise ValueError(f"pair {i} is a {type(pair).__name__}, not a PreferencePair")
        sides = []
        try:
            for which in ("chosen", "rejected"):
                enc = _encode(tokenizer, pair.as_sft(which), system_prompt, "last")
                sides.append(
                    truncate(
                        enc, max_length=max_length, truncation=truncation, counts=counts, row=i
                    )
                )
        except _Drop:
            counts["pairs_dropped"] += 1
            continue
        out.append(EncodedPair(*sides))
    _log_counts("preference pairs", len(out), counts)
    if not out:
        raise ValueError(f"no pair fits max_length={max_length} with target tokens on both sides")
    return out
