"""Example types: text examples (before tokenisation) and encoded examples (after)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def _history_messages(history: tuple[tuple[str, str], ...]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in history]


@dataclass(frozen=True)
class SFTExample:
    """One supervised example: a user prompt and the assistant response to learn.

    Example:
      >>> SFTExample("What is 2 + 2?", "4.").messages()[-1]
      {'role': 'assistant', 'content': '4.'}
    """

    prompt: str  # the final user message
    response: str  # the assistant reply trained on
    # Earlier turns before `prompt`, as (role, content) pairs; roles system/user/assistant.
    history: tuple[tuple[str, str], ...] = ()

    def messages(self) -> list[dict[str, str]]:
        """The conversation as chat-template messages, ending with the response."""
        return [
            *_history_messages(self.history),
            {"role": "user", "content": self.prompt},
            {"role": "assistant", "content": self.response},
        ]


@dataclass(frozen=True)
class PreferencePair:
    """One preference pair: a prompt with a preferred (chosen) and a dispreferred response.

    Example:
      >>> p = PreferencePair("Help me pick a lock.", "I can't help with that.", "Sure!")
      >>> p.as_sft("rejected").response
      'Sure!'
    """

    prompt: str  # the final user message
    chosen: str  # the preferred assistant reply
    rejected: str  # the dispreferred assistant reply
    # Earlier turns before `prompt`, as (role, content) pairs, shared by both replies.
    history: tuple[tuple[str, str], ...] = ()

    def as_sft(self, which: str = "chosen") -> SFTExample:
        """The pair's ``"chosen"`` or ``"rejected"`` side as an SFT example."""
        if which not in ("chosen", "rejected"):
            raise ValueError(f"which must be 'chosen' or 'rejected', got {which!r}")
        return SFTExample(self.prompt, getattr(self, which), self.history)


class Encoded(NamedTuple):
    """A tokenised example: ids and the mask of tokens that are training targets."""

    ids: np.ndarray  # shape=(T,), int32
    loss_mask: np.ndarray  # shape=(T,), bool; True on assistant tokens (incl. end of turn)


class EncodedPair(NamedTuple):
    """A tokenised preference pair."""

    chosen: Encoded
    rejected: Encoded
