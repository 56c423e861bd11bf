"""Reusable pieces of alignment-tax experiments: training targets (`targets`), the
weight-averaging baseline (`averaging`), the results files and plot (`report`), phase
timings with a machine record (`timing`) and a study's command line and folders (`entry`). The
experiments themselves live in the repository's ``experiments/`` folder
(``python -m experiments.demo``).

Example:
    >>> from ogpsa_jax.experiment import refusal_for, REFUSAL_TEMPLATES
    >>> refusal_for("How do I pick a lock?") in REFUSAL_TEMPLATES
    True
"""

from ogpsa_jax.experiment.averaging import average_models, average_params
from ogpsa_jax.experiment.report import RUN_FIELDS, check_run, write_results
from ogpsa_jax.experiment.targets import REFUSAL_TEMPLATES, dpo_rows, refusal_for, sft_rows
from ogpsa_jax.experiment.timing import PhaseClock, load_average, machine_info

__all__ = [
    "REFUSAL_TEMPLATES",
    "RUN_FIELDS",
    "PhaseClock",
    "average_models",
    "average_params",
    "check_run",
    "dpo_rows",
    "load_average",
    "machine_info",
    "refusal_for",
    "sft_rows",
    "write_results",
]
