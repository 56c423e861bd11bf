"""Sharded SFT / DPO / SFT->DPO training with OGPSA: configs, presets, losses, step, loop.

Files: `schema` (the config dataclasses), `validation` (`validate`: the checks before any
compute), `presets`, `inputs` (everything read before the run folder is touched), `run_dir` (the
run folder), `optimizer` (the public OGPSA alias built from a stage config), `step` (the pure
train step), `losses`, `dpo_reference`, `refresh` (basis refreshes), `lora` (LoRA runs: starting
model, checks, export), `lora_refresh` (the matrix basis on adapters), `sharding`, `checkpoint`,
`metrics`, `budget` (a stage's steps and an extension's schedule), `signals` (SIGTERM and
Ctrl-C), `progress` (bar or log lines), `config_doc` (the generated config reference), `loop`
(`train` and the stage loop), `export` (the ``final/`` and ``step-N/`` model folders), `hooks`
(the loop's seams for `ogpsa_jax.testing`).

Example:
    >>> from ogpsa_jax.train import apply_overrides, preset, train
    >>> config = apply_overrides(preset("tiny"), ["sft.max_steps=3"])
    >>> train("sft", config, "runs/tiny-sft")  # doctest: +SKIP
"""

from ogpsa_jax.overrides import apply_overrides
from ogpsa_jax.train.loop import NonFiniteError, TrainResult, train
from ogpsa_jax.train.losses import dpo_loss, dpo_rewards, token_nll
from ogpsa_jax.train.optimizer import Optimizer, make_optimizer
from ogpsa_jax.train.presets import PRESETS, preset
from ogpsa_jax.train.schema import (
    DPOConfig,
    LoRASettings,
    ModelConfig,
    OGPSAConfig,
    SFTConfig,
    StageConfig,
    TrainConfig,
)
from ogpsa_jax.train.signals import EXIT_INTERRUPTED, EXIT_PREEMPTED
from ogpsa_jax.train.step import make_train_step
from ogpsa_jax.train.validation import validate

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PREEMPTED",
    "LoRASettings",
    "PRESETS",
    "DPOConfig",
    "ModelConfig",
    "NonFiniteError",
    "OGPSAConfig",
    "Optimizer",
    "SFTConfig",
    "StageConfig",
    "TrainConfig",
    "TrainResult",
    "apply_overrides",
    "dpo_loss",
    "dpo_rewards",
    "make_optimizer",
    "make_train_step",
    "preset",
    "token_nll",
    "train",
    "validate",
]
