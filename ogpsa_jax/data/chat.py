"""Chat rendering with exact assistant-token masks, for any tokenizer with a chat template.

The mask is computed without ``{% generation %}`` support: for each assistant turn ``i`` the
template is rendered twice more, once for ``messages[:i]`` with the generation prompt (text up to
the start of the assistant content) and once for ``messages[:i + 1]`` (text up to the end of the
turn). Both must be prefixes of the full rendering; the characters in between, less trailing
whitespace after the end-of-turn token, are the assistant span. Tokens are mapped to spans with
the fast tokenizer's character offsets, so the mask is exact for ChatML (Qwen, SmolLM2) and
Llama-3 templates: it covers the response and its end-of-turn token (``<|im_end|>`` /
``<|eot_id|>``), never the role header. A token that straddles the header/content boundary
counts as header: it happens only when the template's tokenisation merges the two, e.g. the
header newline with a response's leading space (``"\\n "`` in GPT-2-style BPEs such as
SmolLM2's), and then only that leading space is left out of the mask.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_ROLES = ("system", "user", "assistant")


def _check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if not messages:
        raise ValueError("messages is empty: need at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in _ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {_ROLES}")
        if not isinstance(m["content"], str):
            raise ValueError(f"message {i} content must be a string, got {type(m['content'])}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def with_system_prompt(
    messages: Sequence[Mapping[str, Any]], system_prompt: str | None
) -> list[dict[str, str]]:
    """Returns ``messages`` as plain dicts, with ``system_prompt`` prepended when given.

    Args:
      messages: chat messages, each ``{"role": ..., "content": ...}``.
      system_prompt: text of a system message to put first, or None for none.

    Returns:
      A new list of message dicts.

    Raises:
      ValueError: if a system prompt is given and the messages already start with one.

    Example:
      >>> with_system_prompt([{"role": "user", "content": "hi"}], "Be brief.")[0]["role"]
      'system'
    """
    msgs = _check_messages(messages)
    if system_prompt is None:
        return msgs
    if msgs[0]["role"] == "system":
        raise ValueError("system_prompt given but the messages already start with a system message")
    return [{"role": "system", "content": system_prompt}, *msgs]


def _render(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    if not isinstance(text, str):
        raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text)}, not str")
    return text


def _encode_with_offsets(tokenizer: Any, text: str) -> tuple[np.ndarray, np.ndarray]:
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is not a fast tokenizer; character offsets are needed "
            "to build the assistant mask"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return ids, offsets


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    system_prompt: str | None = None,
    add_generation_prompt: bool = False,
    train_turns: str = "all",
) -> tuple[np.ndarray, np.ndarray]:
    """Renders a conversation with the tokenizer's chat template, with an assistant-token mask.

    Args:
      tokenizer: a fast transformers tokenizer with a ``chat_template``.
      messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
      system_prompt: optional system message prepended to ``messages``.
      add_generation_prompt: append the assistant header (for generation).
      train_turns: ``"all"`` masks every assistant turn; ``"last"`` only the final message
        when it is an assistant turn.

    Returns:
      ``(ids, assistant_mask)``: int32 token ids ``[T]`` exactly as the template tokenises, and a
      bool mask ``[T]`` that is True on assistant content tokens and their end-of-turn token.

    Raises:
      ValueError: on malformed messages, an unknown ``train_turns``, a slow tokenizer, or a
        template whose renderings of prefixes are not prefixes of the full rendering or do not
        end where the assistant content starts.

    Example:
      >>> ids, mask = render_chat(tok, [{"role": "user", "content": "Hi"},  # doctest: +SKIP
      ...                               {"role": "assistant", "content": "Hello!"}])
      >>> tok.decode(ids[mask])  # doctest: +SKIP
      'Hello!<|im_end|>'
    """
    if train_turns not in ("all", "last"):
        raise ValueError(f"train_turns must be 'all' or 'last', got {train_turns!r}")
    msgs = with_system_prompt(messages, system_prompt)
    full = _render(tokenizer, msgs, add_generation_prompt)
    spans = []
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if train_turns == "last":
        turns = turns[-1:] if turns and turns[-1] == len(msgs) - 1 else []
    for i in turns:
        if i == 0:
            raise ValueError(
                "message 0 is an assistant turn; a conversation must start with a "
                "system or user message"
            )
        before = _render(tokenizer, msgs[:i], True)
        after = _render(tokenizer, msgs[: i + 1], False)
        if not (full.startswith(before) and full.startswith(after) and len(before) <= len(after)):
            raise ValueError(
                f"chat template is not prefix-consistent at assistant message {i}: rendering the "
                "conversation up to that turn is not a prefix of the full rendering, so the "
                "assistant mask cannot be computed"
            )
        start, end = len(before), len(after.rstrip())
        if not full[start:end].lstrip().startswith(msgs[i]["content"].strip()):
            raise ValueError(
                f"chat template renders other text between the generation prompt and assistant "
                f"message {i}'s content (does it ignore add_generation_prompt?), so the assistant "
                "mask cannot be computed"
            )
        spans.append((start, end))
    ids, offsets = _encode_with_offsets(tokenizer, full)
    mask = np.zeros(ids.shape, dtype=bool)
    tok_start = offsets[:, 0]
    for start, end in spans:
        # A token belongs to the turn when it starts inside the span; a token straddling the
        # header/content boundary (rare with these templates) counts as header.
        mask |= (tok_start >= start) & (tok_start < end) & (offsets[:, 1] > offsets[:, 0])
    return ids, mask


def prompt_ids(tokenizer: Any, prompt: str, *, system_prompt: str | None = None) -> np.ndarray:
    """Token ids of a one-turn user prompt followed by the assistant header, for generation.

    Args:
      tokenizer: a transformers tokenizer with a chat template.
      prompt: the user message.
      system_prompt: optional system message.

    Returns:
      int32 ids ``[T]``.

    Example:
      >>> ids = prompt_ids(tok, "What is 2 + 2?")  # doctest: +SKIP
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt)}")
    ids, _ = render_chat(
        tokenizer,
        [{"role": "user", "content": prompt}],
        system_prompt=system_prompt,
        add_generation_prompt=True,
    )
    return ids


def left_pad(
    seqs: Sequence[Sequence[int] | np.ndarray], pad_id: int, *, multiple_of: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token sequences to a common length, rounded up to a multiple (for generation).

    Args:
      seqs: token id sequences, each non-empty.
      pad_id: the padding token id.
      multiple_of: the padded length is the longest length rounded up to this multiple.

    Returns:
      ``(input_ids, attention_mask)``, both int32 ``[B, L]``; mask 1 on real tokens.

    Example:
      >>> ids, mask = left_pad([[5, 6, 7], [8]], 0, multiple_of=4)
      >>> ids.tolist()
      [[0, 5, 6, 7], [0, 0, 0, 8]]
    """
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    if multiple_of < 1:
        raise ValueError(f"multiple_of must be >= 1, got {multiple_of}")
    lengths = [len(s) for s in seqs]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty")
    width = -(-max(lengths) // multiple_of) * multiple_of
    ids = np.full((len(seqs), width), pad_id, dtype=np.int32)
    mask = np.zeros((len(seqs), width), dtype=np.int32)
    for b, s in enumerate(seqs):
        ids[b, width - len(s) :] = np.asarray(s, dtype=np.int32)
        mask[b, width - len(s) :] = 1
    return ids, mask


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to its eos id (Llama-3 has no pad token).

    Args:
      tokenizer: a transformers tokenizer.

    Returns:
      An int token id.

    Example:
      >>> pad_token_id(tok)  # doctest: +SKIP
      0
    """
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    raise ValueError("tokenizer has neither a pad token nor an eos token")
