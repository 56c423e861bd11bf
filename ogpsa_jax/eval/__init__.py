"""Evaluation for the alignment-tax experiment: shipped prompt sets, refusal judges (and their
agreement with people), refusal rate, multiple choice by log-likelihood, GSM8K, IFEval, drift,
IFBench, intervals and paired tests (``ogpsa_jax.eval.stats``), and an lm-eval adapter.

Example:
    >>> from ogpsa_jax import eval as ev
    >>> rows = ev.load_prompt_set("strongreject", limit=4)
    >>> ev.refusal_judge("I'm sorry, but I can't help with that.")
    True
"""

from ogpsa_jax.eval import stats
from ogpsa_jax.eval.carriers import CARRIERS, DataFileError
from ogpsa_jax.eval.choice_tasks import chance_rate, load_choice_task
from ogpsa_jax.eval.drift import drift, reference_answers
from ogpsa_jax.eval.generation import (
    encode_prompts,
    eos_token_ids,
    generate_from_ids,
    generate_responses,
    generate_token_ids,
)
from ogpsa_jax.eval.gsm8k import (
    extract_last_number,
    gsm8k_exact_match,
    gsm8k_mc_accuracy,
    score_gsm8k_responses,
)
from ogpsa_jax.eval.ifbench import (
    evaluate_ifbench,
    load_ifbench,
    score_ifbench,
    unavailable_instructions,
)
from ogpsa_jax.eval.ifeval import (
    evaluate_ifeval,
    load_ifeval,
    punkt_data_dir,
    score_ifeval,
    short_answer_rows,
)
from ogpsa_jax.eval.judge import (
    REFUSAL_PATTERNS,
    AnchoredJudge,
    Judge,
    KeywordJudge,
    ModelJudge,
    anchored_refusal_judge,
    default_judge,
    parse_strongreject_rubric,
    refusal_judge,
    strongreject_rubric_prompt,
)
from ogpsa_jax.eval.judge_agreement import agreement, agreement_rows, load_judge_comparison
from ogpsa_jax.eval.lm_eval_adapter import LMEvalAdapter
from ogpsa_jax.eval.multiple_choice import check_mc_items, multiple_choice_accuracy
from ogpsa_jax.eval.prompts import (
    GSM8K_ANSWER_CUE,
    HARMFUL_EVAL_SETS,
    PROMPT_SET_NAMES,
    gsm8k_choices,
    licence_path,
    load_prompt_set,
    normalise_prompt,
    prompt_texts,
)
from ogpsa_jax.eval.refusal import judge_refusals, refusal_rate
from ogpsa_jax.eval.scoring import score_continuations
from ogpsa_jax.eval.suite import drift_reference, evaluate_alignment
from ogpsa_jax.eval.suite_config import (
    CHOICE_TASKS,
    EVAL_SETS,
    OPTIONAL_EVAL_SETS,
    TRUTHFULQA_NOTE,
    EvalConfig,
    full_eval_config,
    load_eval_sets,
)

__all__ = [
    "CARRIERS",
    "CHOICE_TASKS",
    "EVAL_SETS",
    "OPTIONAL_EVAL_SETS",
    "TRUTHFULQA_NOTE",
    "AnchoredJudge",
    "DataFileError",
    "agreement",
    "agreement_rows",
    "anchored_refusal_judge",
    "chance_rate",
    "default_judge",
    "evaluate_ifbench",
    "evaluate_ifeval",
    "load_choice_task",
    "load_ifbench",
    "load_ifeval",
    "load_judge_comparison",
    "punkt_data_dir",
    "score_ifbench",
    "score_ifeval",
    "short_answer_rows",
    "unavailable_instructions",
    "stats",
    "EvalConfig",
    "GSM8K_ANSWER_CUE",
    "HARMFUL_EVAL_SETS",
    "PROMPT_SET_NAMES",
    "REFUSAL_PATTERNS",
    "Judge",
    "KeywordJudge",
    "LMEvalAdapter",
    "ModelJudge",
    "check_mc_items",
    "drift",
    "drift_reference",
    "encode_prompts",
    "eos_token_ids",
    "evaluate_alignment",
    "extract_last_number",
    "full_eval_config",
    "generate_from_ids",
    "generate_responses",
    "generate_token_ids",
    "gsm8k_choices",
    "gsm8k_exact_match",
    "gsm8k_mc_accuracy",
    "judge_refusals",
    "licence_path",
    "load_eval_sets",
    "load_prompt_set",
    "multiple_choice_accuracy",
    "normalise_prompt",
    "prompt_texts",
    "parse_strongreject_rubric",
    "reference_answers",
    "refusal_judge",
    "refusal_rate",
    "score_continuations",
    "score_gsm8k_responses",
    "strongreject_rubric_prompt",
]
