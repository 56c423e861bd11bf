"""The alignment-tax experiment: the offline demo (`demo`), its training targets (`targets`),
the weight-averaging baseline (`averaging`) and the results files and plot (`report`).

Example:
    >>> from ogpsa_jax.experiment import demo
    >>> demo.main(["--tiny", "--out", "/tmp/demo"])  # doctest: +SKIP
    0
"""

from ogpsa_jax.experiment.averaging import average_models, average_params
from ogpsa_jax.experiment.report import RUN_FIELDS, check_run, write_results
from ogpsa_jax.experiment.targets import REFUSAL_TEMPLATES, dpo_rows, refusal_for, sft_rows

__all__ = [
    "REFUSAL_TEMPLATES",
    "RUN_FIELDS",
    "average_models",
    "average_params",
    "check_run",
    "dpo_rows",
    "refusal_for",
    "sft_rows",
    "write_results",
]
