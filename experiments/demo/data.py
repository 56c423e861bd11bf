"""The demo's data: its prompt sets, and the training files built from them.

- `select_prompts`: every prompt set, sampled with the config's seed from the shipped sets
  (``ogpsa_jax.eval.load_prompt_set``); training and reference prompts never reach an
  evaluation set.
- `write_training_data`: the SFT, DPO and reference JSONL files a stage trains on, plus the
  general-data mixes of the "replay" method (`TrainingData`).

Example:
    >>> from experiments.demo.config import tiny_config
    >>> sets = select_prompts(tiny_config())
    >>> len(sets["sft"]), len(sets["harmful"])
    (8, 4)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments.demo.config import DemoConfig
from ogpsa_jax.eval import load_choice_task, load_ifeval, load_prompt_set, normalise_prompt
from ogpsa_jax.eval.ifeval import short_answer_rows
from ogpsa_jax.experiment import targets

logger = logging.getLogger(__name__)

Rows = list[dict[str, Any]]


def _take(rows: Rows, n: int, rng: np.random.Generator) -> Rows:
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows if n == 0 else rows[:n]


def prompts_of(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ``prompt`` strings of prompt-set rows.

    Example:
        >>> prompts_of([{"prompt": "Hi", "id": "a"}])
        ['Hi']
    """
    return [r["prompt"] for r in rows]


def select_prompts(config: DemoConfig) -> dict[str, Rows]:
    """Samples every prompt set with the config's seed; checks that no set overlaps another.

    Args:
        config: the demo config (set sizes and seed).

    Returns:
        ``{"sft", "dpo", "harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "choice",
        "drift", "reference"}`` -> rows (``load_prompt_set``, ``load_ifeval``,
        ``load_choice_task``).

    Example:
        >>> from experiments.demo.config import tiny_config
        >>> sorted(select_prompts(tiny_config()))[:4]
        ['bbq', 'choice', 'dpo', 'drift']
    """
    rng = np.random.default_rng(config.seed)
    dna = _take(load_prompt_set("donotanswer"), 0, rng)
    n_sft = config.sft_prompts or len(dna) // 2
    sft = dna[:n_sft]
    rest = dna[n_sft:]
    dpo = rest if config.dpo_prompts == 0 else rest[: config.dpo_prompts]
    half = config.harmful // 2
    harm = _take(load_prompt_set("harmbench"), half, rng) + _take(
        load_prompt_set("strongreject"), config.harmful - half, rng
    )
    benign = _take(load_prompt_set("benign_reference"), 0, rng)
    ifeval_pool = load_ifeval()
    if config.ifeval_subset == "short":
        ifeval_pool = short_answer_rows(ifeval_pool)
    drift_rows = benign[: config.drift_prompts]
    reference = benign[config.drift_prompts : config.drift_prompts + config.reference_prompts]
    sets = {
        "sft": sft,
        "dpo": dpo,
        "harmful": harm,
        "over_refusal": _take(load_prompt_set("overrefusal"), config.over_refusal, rng),
        "gsm8k": _take(load_prompt_set("gsm8k"), config.gsm8k, rng),
        "bbq": _take(load_prompt_set("bbq"), config.bbq, rng),
        "ifeval": _take(ifeval_pool, config.ifeval, rng),
        "choice": [
            row
            for task in config.choice_tasks
            for row in _take(load_choice_task(task), config.choice, rng)
        ],
        "drift": drift_rows,
        "reference": reference,
    }
    for name in ("dpo", "drift", "reference"):
        if not sets[name]:
            raise ValueError(f"prompt set {name!r} is empty: lower the other sizes")
    # Held-out means held out: training / reference prompts never appear in an evaluation set.
    train_side = {
        normalise_prompt(r["prompt"]) for k in ("sft", "dpo", "reference") for r in sets[k]
    }
    for name in ("harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "drift"):
        clash = [r["id"] for r in sets[name] if normalise_prompt(r["prompt"]) in train_side]
        if clash:
            logger.warning("dropping %d %s prompts also used for training", len(clash), name)
            sets[name] = [r for r in sets[name] if r["id"] not in set(clash)]
    return sets


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """The training files of the demo: ``(path, rows)`` per stage kind and data mix."""

    sft: tuple[str, int]  # refusal targets for the SFT prompts
    sft_replay: tuple[str, int]  # the same plus the reference rows (general-data mixing)
    dpo: tuple[str, int]  # chosen = refusal, rejected = the starting model's answer
    dpo_replay: tuple[str, int]  # the same plus benign pairs (answer preferred over a refusal)
    reference: tuple[str, ...]  # the two capability reference sets (OGPSA's basis)
    reference_rows: int  # rows over both reference files

    def stage_file(self, kind: str, replay: bool) -> tuple[str, int]:
        """``(path, rows)`` a stage of ``kind`` ("sft" or "dpo") trains on.

        Example:
            >>> d = TrainingData(("s", 8), ("sr", 16), ("d", 7), ("dr", 15), ("a", "b"), 8)
            >>> d.stage_file("dpo", replay=True)
            ('dr', 15)
        """
        if kind not in ("sft", "dpo"):
            raise ValueError(f"stage kind must be 'sft' or 'dpo', got {kind!r}")
        return getattr(self, f"{kind}_replay" if replay else kind)


def write_training_data(
    sets: dict[str, Rows],
    dpo_answers: Sequence[str],
    reference_answers: Sequence[str],
    data_dir: str,
) -> TrainingData:
    """Writes the demo's training files (JSONL) into ``data_dir``.

    Args:
        sets: from `select_prompts` (``sft``, ``dpo``, ``reference`` are used).
        dpo_answers: the starting model's answer to each DPO prompt (empty ones are dropped).
        reference_answers: the starting model's answer to each reference prompt.
        data_dir: output folder (created).

    Returns:
        The files and their row counts; the reference rows alternate between two files.

    Example:
        >>> sets = {"sft": [{"prompt": "p"}], "dpo": [{"prompt": "q"}],
        ...         "reference": [{"prompt": "a"}, {"prompt": "b"}]}
        >>> import tempfile
        >>> data = write_training_data(sets, ["Sure."], ["A.", "B."], tempfile.mkdtemp())
        >>> data.sft[1], data.dpo_replay[1], data.reference_rows
        (1, 3, 2)
    """
    sft_prompts = prompts_of(sets["sft"])
    sft_file = targets.write_jsonl(
        os.path.join(data_dir, "sft.jsonl"), targets.sft_rows(sft_prompts)
    )
    dpo_pairs = targets.dpo_rows(prompts_of(sets["dpo"]), list(dpo_answers))
    dpo_file = targets.write_jsonl(os.path.join(data_dir, "dpo.jsonl"), dpo_pairs)
    ref = targets.reference_rows(prompts_of(sets["reference"]), list(reference_answers))
    ref_files = (
        targets.write_jsonl(os.path.join(data_dir, "reference_a.jsonl"), ref[0::2]),
        targets.write_jsonl(os.path.join(data_dir, "reference_b.jsonl"), ref[1::2]),
    )
    # General-data mixing ("replay"): SFT rows + the reference rows; DPO pairs + benign pairs
    # (the starting model's answer preferred over a refusal, so benign prompts stay answered).
    replay_sft = targets.write_jsonl(
        os.path.join(data_dir, "sft_replay.jsonl"), targets.sft_rows(sft_prompts) + ref
    )
    benign_pairs = [
        {
            "prompt": r["prompt"],
            "chosen": r["response"],
            "rejected": targets.refusal_for(r["prompt"]),
        }
        for r in ref
    ]
    replay_dpo = targets.write_jsonl(
        os.path.join(data_dir, "dpo_replay.jsonl"), dpo_pairs + benign_pairs
    )
    return TrainingData(
        sft=(sft_file, len(sft_prompts)),
        sft_replay=(replay_sft, len(sft_prompts) + len(ref)),
        dpo=(dpo_file, len(dpo_pairs)),
        dpo_replay=(replay_dpo, len(dpo_pairs) + len(benign_pairs)),
        reference=ref_files,
        reference_rows=len(ref),
    )
