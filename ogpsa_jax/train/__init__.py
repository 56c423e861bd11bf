"""Sharded SFT / DPO / SFT->DPO training with OGPSA: configs, losses, steps, loop, checkpoints.

Example:
    >>> from ogpsa_jax.train import preset, train
    >>> train("sft", preset("tiny"), "runs/tiny-sft")  # doctest: +SKIP
"""

from ogpsa_jax.train.config import (
    PRESETS,
    ModelConfig,
    OGPSAConfig,
    StageConfig,
    TrainConfig,
    apply_overrides,
    preset,
    validate,
)
from ogpsa_jax.train.loop import EXIT_PREEMPTED, NonFiniteError, TrainResult, train
from ogpsa_jax.train.losses import dpo_loss, dpo_rewards, token_nll
from ogpsa_jax.train.step import make_optimizer, make_train_step

__all__ = [
    "EXIT_PREEMPTED",
    "PRESETS",
    "ModelConfig",
    "NonFiniteError",
    "OGPSAConfig",
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
