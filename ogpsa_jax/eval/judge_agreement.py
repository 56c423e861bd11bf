"""How well a refusal judge agrees with people: JailbreakBench's 100 human-labelled rows.

``jailbreakbench`` 0.1.3 (MIT) ships ``data/classifier_comparison.csv``: 100 (harmful goal,
jailbreak prompt, target model response) rows, each labelled by three people, with the majority
``human_majority`` = 1 when the response is *jailbroken* -- it complies with the harmful request
in a way the labellers judged harmful -- and 0 otherwise (a refusal, but also a harmless,
off-topic or useless answer). Six automatic classifiers' labels ship beside them.

A refusal judge answers another question ("does the response refuse?"), so it is scored as a
classifier of *not jailbroken*: its verdict "refusal" is compared with ``human_majority == 0``.
It can see a refusal phrase; it cannot see whether a non-refusal is harmful, so a harmless story
that ignores the request counts against it (false compliance), and a disclaimer followed by
harmful content fools it unless it reads past the disclaimer (false refusal).

- ``false_refusal``: share of rows people called jailbroken that the judge calls a refusal;
- ``false_compliance``: share of rows people called not jailbroken that the judge does not call
  a refusal;
- ``accuracy`` and Cohen's ``kappa`` of the judge's "not a refusal" against the human label.

:func:`holdout_split` fixes a seeded half of the rows as held out: rules were written looking
only at the other half, so the held-out numbers are not fitted to the test.

Example:
    >>> rows = load_judge_comparison()
    >>> len(rows), sum(r["human_majority"] for r in rows)
    (100, 43)
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ogpsa_jax.eval import carriers
from ogpsa_jax.eval.judge import Judge
from ogpsa_jax.eval.stats import cohen_kappa, wilson_interval

JUDGE_COMPARISON_FILE = "data/classifier_comparison.csv"
REFERENCE_CLASSIFIERS = ("llama_guard", "gpt_4", "gpt_4_turbo", "GCG", "TDC", "BERT")
_FIELDS = ("goal", "prompt", "target_response", "human1", "human2", "human3", "human_majority")


def load_judge_comparison() -> list[dict[str, Any]]:
    """The 100 human-labelled rows (file order).

    Returns:
      Rows with ``goal`` (the harmful request), ``prompt`` (the jailbreak prompt sent),
      ``response``, ``humans`` (three 0/1 labels), ``human_majority`` (0/1, 1 = jailbroken) and
      ``classifiers`` (name -> 0/1 label of each reference classifier in the file).

    Example:
      >>> load_judge_comparison()[0]["human_majority"] in (0, 1)
      True
    """
    path = carriers.package_data_path("jailbreakbench", JUDGE_COMPARISON_FILE)
    with open(path, encoding="utf-8", newline="") as f:
        raw = list(csv.DictReader(f))
    if not raw or any(k not in raw[0] for k in _FIELDS):
        raise carriers.DataFileError(f"{path}: expected columns {list(_FIELDS)}")
    rows = []
    for i, r in enumerate(raw):
        try:
            humans = [int(r[f"human{j}"]) for j in (1, 2, 3)]
            majority = int(r["human_majority"])
            classifiers = {c: int(float(r[c])) for c in REFERENCE_CLASSIFIERS if c in r}
        except ValueError as e:
            raise carriers.DataFileError(f"{path}: row {i} has a non-0/1 label: {e}") from e
        rows.append(
            {
                "goal": r["goal"],
                "prompt": r["prompt"],
                "response": r["target_response"],
                "humans": humans,
                "human_majority": majority,
                "classifiers": classifiers,
            }
        )
    if len(rows) != 100:
        raise carriers.DataFileError(f"{path}: expected 100 rows, read {len(rows)}")
    return rows


def holdout_split(n: int, *, seed: int = 0) -> tuple[list[int], list[int]]:
    """(development, held-out) row indices: a seeded permutation cut in two halves.

    Example:
      >>> dev, held = holdout_split(100)
      >>> len(dev), len(held), len(set(dev) | set(held))
      (50, 50, 100)
    """
    order = np.random.default_rng(seed).permutation(n)
    return sorted(order[: n // 2].tolist()), sorted(order[n // 2 :].tolist())


def agreement(refused: Sequence[bool], human_majority: Sequence[int]) -> dict[str, Any]:
    """Agreement of refusal verdicts with the human "jailbroken" labels.

    Args:
      refused: the judge's verdicts (True = refusal).
      human_majority: the people's labels (1 = jailbroken).

    Returns:
      dict(n, accuracy, kappa, false_refusal, false_compliance, each rate with a Wilson
      ``<name>_ci``; a rate over no rows is None).

    Example:
      >>> agreement([True, False, False], [0, 1, 0])["false_compliance"]
      0.5
    """
    ref = np.asarray(refused, bool)
    human = np.asarray(human_majority, int)
    if ref.shape != human.shape or ref.size == 0:
        raise ValueError(f"need equal non-empty verdict and label lists: {ref.size}, {human.size}")
    said_jailbroken = (~ref).astype(int)
    out: dict[str, Any] = {"n": int(ref.size)}

    def rate(name: str, hits: np.ndarray) -> None:
        k, n = int(hits.sum()), int(hits.size)
        out[name] = k / n if n else None
        out[f"{name}_ci"] = list(wilson_interval(k, n)) if n else None

    rate("accuracy", said_jailbroken == human)
    out["kappa"] = cohen_kappa(said_jailbroken, human)
    rate("false_refusal", ref[human == 1])
    rate("false_compliance", ~ref[human == 0])
    return out


def agreement_rows(
    judges: Sequence[Judge], rows: Sequence[Mapping[str, Any]] | None = None, *, seed: int = 0
) -> list[dict[str, Any]]:
    """Agreement of each judge, and of the file's reference classifiers, on all rows and on the
    held-out half: the rows of ``results/eval/judge_agreement.json``.

    Args:
      judges: the library's judges to measure.
      rows: :func:`load_judge_comparison` rows (default: loaded).
      seed: seed of :func:`holdout_split`.

    Returns:
      One dict per (judge, split): ``judge``, ``kind`` ("library" or "reference"), ``split``
      ("all" or "held-out"), and :func:`agreement`'s fields.

    Example:
      >>> from ogpsa_jax.eval.judge import KeywordJudge
      >>> [(r["judge"], r["split"]) for r in agreement_rows([KeywordJudge()])][:2]
      [('keyword-v1', 'all'), ('keyword-v1', 'held-out')]
    """
    rows = load_judge_comparison() if rows is None else list(rows)
    _, held = holdout_split(len(rows), seed=seed)
    human = [int(r["human_majority"]) for r in rows]
    verdicts: list[tuple[str, str, list[bool]]] = []
    for judge in judges:
        refused = judge([r["goal"] for r in rows], [r["response"] for r in rows])
        verdicts.append((judge.name, "library", [bool(x) for x in refused]))
    for name in REFERENCE_CLASSIFIERS:
        if all(name in r["classifiers"] for r in rows):
            refused = [r["classifiers"][name] == 0 for r in rows]
            verdicts.append((f"jailbreakbench:{name}", "reference", refused))
    out = []
    for name, kind, refused in verdicts:
        for split, idx in (("all", list(range(len(rows)))), ("held-out", held)):
            res = agreement([refused[i] for i in idx], [human[i] for i in idx])
            out.append({"judge": name, "kind": kind, "split": split, **res})
    return out
