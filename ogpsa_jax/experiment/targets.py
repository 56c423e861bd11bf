"""Training targets for the alignment-tax demo, built offline and cached.

- SFT: each safety prompt gets a refusal from `REFUSAL_TEMPLATES` (twelve varied, short,
  polite refusals; the template is picked by a stable hash of the prompt, so a prompt always
  gets the same one and the set is spread evenly over the templates).
- DPO: chosen = that refusal, rejected = the starting model's own greedy answer to the prompt.
- Capability reference: benign prompts no evaluation uses, answered by the starting model.

The starting model's answers are generated once and cached as JSON keyed by a hash of the
model folder, the prompts and the generation settings (`cached_json`).

Example:
    >>> rows = sft_rows(["How do I make a weapon at home?"])
    >>> rows[0]["response"] in REFUSAL_TEMPLATES
    True
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

logger = logging.getLogger(__name__)

# The documented refusal set: short (so prompt + target fit 128 tokens), varied in wording
# (so SFT teaches "refuse", not one string), and each one matched by the keyword judge.
REFUSAL_TEMPLATES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't assist with that request.",
    "I'm sorry, but I cannot provide that information.",
    "I won't help with this, because it could cause real harm.",
    "I'm not able to help with that. Is there something else I can do for you?",
    "Sorry, but I can't help with this request.",
    "I cannot help with that. If you have another question, I'm happy to help.",
    "I'm sorry, I can't assist with that. It could be harmful or unsafe.",
    "I must decline this request.",
    "I apologize, but I can't provide help with that.",
    "That's not something I can help with, sorry.",
    "I'm unable to help with that request, as it could lead to harm.",
)


def refusal_for(prompt: str) -> str:
    """The refusal template assigned to a prompt (stable across runs and machines).

    Args:
        prompt: the user prompt.

    Returns:
        One of `REFUSAL_TEMPLATES`.

    Example:
        >>> refusal_for("x") == refusal_for("x")
        True
    """
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return REFUSAL_TEMPLATES[int.from_bytes(digest[:4], "little") % len(REFUSAL_TEMPLATES)]


def sft_rows(prompts: Sequence[str]) -> list[dict[str, str]]:
    """SFT rows ``{"prompt", "response"}``: each prompt with its refusal.

    Example:
        >>> sft_rows(["q"])[0]["prompt"]
        'q'
    """
    return [{"prompt": p, "response": refusal_for(p)} for p in prompts]


def dpo_rows(prompts: Sequence[str], start_answers: Sequence[str]) -> list[dict[str, str]]:
    """Preference rows ``{"prompt", "chosen", "rejected"}``: refusal vs the starting answer.

    Rows whose starting answer is empty are dropped (nothing to push away from).

    Args:
        prompts: the safety prompts.
        start_answers: the starting model's answer to each prompt.

    Returns:
        The preference rows, in prompt order.

    Example:
        >>> dpo_rows(["q"], ["Sure, here is how."])[0]["rejected"]
        'Sure, here is how.'
    """
    if len(prompts) != len(start_answers):
        raise ValueError(f"{len(prompts)} prompts but {len(start_answers)} starting answers")
    return [
        {"prompt": p, "chosen": refusal_for(p), "rejected": a}
        for p, a in zip(prompts, start_answers, strict=True)
        if a.strip()
    ]


def reference_rows(prompts: Sequence[str], answers: Sequence[str]) -> list[dict[str, str]]:
    """Capability-reference rows ``{"prompt", "response"}`` (non-empty answers only).

    Example:
        >>> reference_rows(["a", "b"], ["x", " "])
        [{'prompt': 'a', 'response': 'x'}]
    """
    if len(prompts) != len(answers):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    return [
        {"prompt": p, "response": a} for p, a in zip(prompts, answers, strict=True) if a.strip()
    ]


def write_jsonl(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> str:
    """Writes rows as JSON lines (atomically); returns the path.

    Example:
        >>> import tempfile
        >>> rows = [{"prompt": "a", "response": "b"}]
        >>> path = write_jsonl(tempfile.mkdtemp() + "/rows.jsonl", rows)
        >>> open(path).read()
        '{"prompt": "a", "response": "b"}\\n'
    """
    if not rows:
        raise ValueError(f"refusing to write an empty data file {os.fspath(path)!r}")
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(path + ".tmp", path)
    return path


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts.

    Example:
        >>> cache_key("a", [1, 2]) == cache_key("a", [1, 2])
        True
    """
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def cached_json(path: str | os.PathLike, key: str, compute: Callable[[], Any]) -> Any:
    """Returns the value cached at ``path`` under ``key``, computing and storing it if absent.

    Args:
        path: the cache file (JSON ``{"key": ..., "value": ...}``).
        key: identifies the inputs (`cache_key`); a different key recomputes.
        compute: makes the value (JSON-serialisable).

    Returns:
        The cached or freshly computed value.

    Example:
        >>> import tempfile
        >>> path = tempfile.mkdtemp() + "/c.json"
        >>> cached_json(path, cache_key(1), lambda: [1, 2])
        [1, 2]
        >>> cached_json(path, cache_key(1), lambda: [3])  # same key: the stored value
        [1, 2]
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
        if stored.get("key") == key:
            logger.info("cache hit: %s", path)
            return stored["value"]
    value = compute()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"key": key, "value": value}, f, ensure_ascii=False)
    os.replace(path + ".tmp", path)
    return value
