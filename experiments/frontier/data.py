"""The study's data: evaluation sets fixed across seeds, training prompts drawn per seed, the two
capability reference sets (the starting model's own answers, AlpacaEval's written answers) and
the check that no training or reference prompt reaches an evaluation set.

Example:
    >>> from experiments.frontier.config import tiny_config
    >>> a, b = seed_sets(tiny_config(), 0), seed_sets(tiny_config(), 1)
    >>> a["harmful"] == b["harmful"], a["sft"] == b["sft"]
    (True, False)
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments.demo.data import select_prompts
from experiments.frontier.config import FrontierConfig
from ogpsa_jax.eval import load_prompt_set, normalise_prompt
from ogpsa_jax.experiment import targets

Rows = list[dict[str, Any]]
EVAL_SIDE = ("harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "choice", "drift")
TRAIN_SIDE = ("sft", "dpo", "reference", "alpaca")


def alpaca_rows(config: FrontierConfig) -> Rows:
    """``reference_prompts`` AlpacaEval rows (``prompt``, ``response``), sampled with eval_seed.

    Example:
        >>> from experiments.frontier.config import tiny_config
        >>> rows = alpaca_rows(tiny_config())
        >>> len(rows), sorted(rows[0])[:3]
        (8, ['category', 'id', 'prompt'])
    """
    pool = load_prompt_set("alpaca_reference")
    order = np.random.default_rng(config.eval_seed + 7919).permutation(len(pool))
    return [pool[i] for i in order[: config.reference_prompts]]


def seed_sets(config: FrontierConfig, seed: int) -> dict[str, Rows]:
    """Every set of one training seed: the evaluation sets, reference rows and AlpacaEval rows of
    ``eval_seed``; the SFT and DPO prompts of ``seed``. Checked with `check_disjoint`.

    Args:
        config: the study config.
        seed: the training seed.

    Returns:
        The demo's sets (``experiments.demo.data.select_prompts``) plus ``alpaca``.
    """
    sets = select_prompts(dataclasses.replace(config, seed=config.eval_seed))
    train = select_prompts(dataclasses.replace(config, seed=seed))
    sets = {**sets, "sft": train["sft"], "dpo": train["dpo"], "alpaca": alpaca_rows(config)}
    check_disjoint(sets)
    return sets


def check_disjoint(sets: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Raises ValueError when a training or reference prompt is also in an evaluation set.

    Prompts are compared after `normalise_prompt` (case and whitespace folded).

    Example:
        >>> sets = {"reference": [{"prompt": "Hi  there"}], "drift": [{"prompt": "hi there"}]}
        >>> check_disjoint(sets)
        Traceback (most recent call last):
        ...
        ValueError: 1 prompt(s) of reference also in drift, e.g. 'Hi  there'
    """
    for a in TRAIN_SIDE:
        mine = {normalise_prompt(r["prompt"]): r["prompt"] for r in sets.get(a, ())}
        for b in EVAL_SIDE:
            clash = [
                mine[p]
                for p in (normalise_prompt(r["prompt"]) for r in sets.get(b, ()))
                if p in mine
            ]
            if clash:
                raise ValueError(f"{len(clash)} prompt(s) of {a} also in {b}, e.g. {clash[0]!r}")


def write_alpaca_reference(rows: Rows, data_dir: str) -> tuple[str, ...]:
    """Writes the AlpacaEval reference rows as two files (alternate rows), like the demo's own.

    Returns:
        The two paths.
    """
    ref = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    return (
        targets.write_jsonl(os.path.join(data_dir, "alpaca_a.jsonl"), ref[0::2]),
        targets.write_jsonl(os.path.join(data_dir, "alpaca_b.jsonl"), ref[1::2]),
    )
