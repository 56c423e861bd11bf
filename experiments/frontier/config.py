"""The frontier study's configuration: `FrontierConfig` (the demo's fields plus seeds, the points
of each curve and the reference set), its presets and its validation.

Presets: `default_config` (the full study that results/frontier/ holds: 3 seeds, every method
in SFT and in SFT->DPO; its measured cost is in docs/frontier.md), `reduced_config` (SFT only,
fewer methods) and `tiny_config` (the tiny random model; seconds; used by the tests).

Example:
    >>> tiny_config().seeds
    (0, 1)
    >>> validate(dataclasses.replace(tiny_config(), sft_points=(1, 9)))
    Traceback (most recent call last):
    ...
    ValueError: sft_points must be increasing steps in [1, sft_steps=2], got (1, 9)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from experiments.demo import config as demo

# Trained methods (each a curve along training steps) and the knob-only method.
METHODS = (
    *demo.METHODS,
    "ogpsa-alpaca",
    "ogpsa-gpm-alpaca",
    "ogpsa-after",
    "ogpsa-gpm-after",
)
PIPELINES = ("sft", "sft-dpo")
WEIGHT_AVG = "weight-avg"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrontierConfig(demo.DemoConfig):
    """The demo's settings plus the study's: seeds, curve points, reference set."""

    # Training seeds: each changes the SFT and DPO prompts sampled from Do-Not-Answer and the
    # order of the training batches. The evaluation sets and the reference rows stay those of
    # eval_seed, so every seed is scored on the same items.
    seeds: tuple[int, ...] = (0, 1, 2)
    # Seed of the evaluation sets and reference rows.
    eval_seed: int = 0
    # SFT steps at which the same run is evaluated (the last must be sft_steps).
    sft_points: tuple[int, ...] = (8, 16, 24)
    # DPO steps of the SFT->DPO runs at which they are evaluated (the last must be dpo_steps).
    dpo_points: tuple[int, ...] = (4, 8, 12)
    # Log the diagnostics: the first-order check of the reference loss on gradient bases
    # (ogpsa.first_order), and naive / replay as OGPSA with strength 0 (the same training; their
    # basis refreshes cost time) so that they log it and update_in_span too.
    diagnose: bool = False
    # Keep each run's intermediate exports (step-N/, ~0.5 GB each for SmolLM2-135M) after their
    # point is evaluated. Off, they are deleted once evaluated: a SmolLM2 run then keeps its
    # final model alone (0.5 GB) instead of 1.5 GB, and a rerun that must evaluate the deleted
    # exports trains that run again.
    keep_exports: bool = True
    # Methods with a "-alpaca" suffix use AlpacaEval's instructions and written answers as the
    # capability reference (load_prompt_set("alpaca_reference")) instead of the starting
    # model's own answers to benign prompts; "-after" places the projection after AdamW
    # (ogpsa.placement="after", Adam-NSCL).
    runs: tuple[str, ...] = tuple(
        f"{m}:{p}" for p in PIPELINES for m in (*demo.METHODS, "ogpsa-alpaca", WEIGHT_AVG)
    )


def default_config() -> FrontierConfig:
    """The full study: 3 seeds; SFT and SFT->DPO each with every method (naive, the paper's
    basis projected before and after AdamW, OGPSA-SVD, OGPSA-GPM, replay, LoRA, OGPSA on LoRA,
    the AlpacaEval reference, weight averaging); the set sizes and steps whose costs were
    measured (docs/frontier.md: grid, measured costs)."""
    trained = (
        "naive",
        "ogpsa",
        "ogpsa-after",
        "ogpsa-svd",
        "ogpsa-gpm",
        "replay",
        "lora",
        "ogpsa-lora",
        "ogpsa-alpaca",
    )
    return FrontierConfig(
        runs=tuple(f"{m}:{p}" for p in PIPELINES for m in (*trained, WEIGHT_AVG)),
        seeds=(0, 1, 2),
        harmful=24,
        over_refusal=24,
        gsm8k=16,
        bbq=16,
        ifeval=8,
        ifeval_tokens=64,
        choice=8,
        drift_prompts=12,
        reference_prompts=32,
        sft_steps=16,
        sft_points=(4, 8, 16),
        dpo_steps=12,
        # with the SFT output as DPO's step 0, three points per DPO curve
        dpo_points=(6, 12),
        # the 24 harmful and 24 over-refusal prompts in two full batches
        gen_batch=24,
        alphas=(0.25, 0.5, 0.75),
        keep_exports=False,
    )


def reduced_config() -> FrontierConfig:
    """The full study's sizes, SFT only, four trained methods and weight averaging: the
    study's quick subset."""
    return dataclasses.replace(
        default_config(),
        runs=("naive:sft", "ogpsa:sft", "ogpsa-alpaca:sft", "ogpsa-gpm:sft", "weight-avg:sft"),
    )


def tiny_config() -> FrontierConfig:
    """The same code path on the tiny random model (seconds; the tests)."""
    base = dataclasses.asdict(demo.tiny_config())
    base.pop("runs")
    return FrontierConfig(
        **base,
        seeds=(0, 1),
        sft_points=(1, 2),
        dpo_points=(1, 2),
        runs=("naive:sft", "ogpsa-alpaca:sft", "weight-avg:sft", "naive:sft-dpo"),
    )


def validate(config: FrontierConfig) -> None:
    """Raises ValueError naming the first bad field (before anything is loaded or written).

    Example:
        >>> validate(dataclasses.replace(tiny_config(), runs=("replay:dpo",)))
        Traceback (most recent call last):
        ...
        ValueError: runs: unknown pipeline 'dpo' in 'replay:dpo'; known ('sft', 'sft-dpo')
    """
    demo_runs = tuple(
        r for r in config.runs if r.partition(":")[0] in demo.METHODS and r.endswith(":sft")
    )
    demo.validate(dataclasses.replace(config, runs=demo_runs or ("naive:sft",)))
    if not config.seeds or len(set(config.seeds)) != len(config.seeds):
        raise ValueError(f"seeds must be distinct and non-empty, got {config.seeds}")
    for name, last in (("sft_points", config.sft_steps), ("dpo_points", config.dpo_steps)):
        pts = getattr(config, name)
        ok = pts and all(1 <= a < b for a, b in zip(pts, pts[1:], strict=False)) and pts[0] >= 1
        if not ok or pts[-1] > last:
            raise ValueError(
                f"{name} must be increasing steps in [1, {name[:3]}_steps={last}], got {pts}"
            )
        if pts[-1] != last:
            raise ValueError(f"{name} must end at the stage's last step {last}, got {pts}")
    if not config.runs or len(set(config.runs)) != len(config.runs):
        raise ValueError(f"runs must be distinct and non-empty, got {config.runs}")
    for spec in config.runs:
        method, _, pipeline = spec.partition(":")
        if method not in (*METHODS, WEIGHT_AVG):
            raise ValueError(f"runs: unknown method {method!r} in {spec!r}; known {METHODS}")
        if pipeline not in PIPELINES:
            raise ValueError(f"runs: unknown pipeline {pipeline!r} in {spec!r}; known {PIPELINES}")
        if method == WEIGHT_AVG and f"naive:{pipeline}" not in config.runs:
            raise ValueError(f"runs: {spec!r} averages naive:{pipeline}, which is not in runs")


PRESETS: dict[str, Callable[[], FrontierConfig]] = {
    "default": default_config,
    "reduced": reduced_config,
    "tiny": tiny_config,
}
