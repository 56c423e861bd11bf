"""The demo's training stages: the library `TrainConfig` of each stage, training it (or reusing
a finished identical run), and where its time went.

A demo run is one stage ("sft" or "dpo") or two ("sft-dpo": the DPO stage starts from, and
references, that method's SFT output). `Stages` trains each (method, stage) once.

Example:
    >>> from experiments.demo.config import default_config
    >>> cfg = stage_train_config(default_config(), method="ogpsa-svd", stage="dpo",
    ...     model_dir="m", data="d.jsonl", reference=("a.jsonl", "b.jsonl"), n_rows=64)
    >>> cfg.dpo.ogpsa.method, cfg.dpo.ogpsa.k, cfg.dpo.ogpsa.refresh_every
    ('svd', 4, 4)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time

from experiments.demo.config import DemoConfig
from experiments.demo.data import TrainingData
from ogpsa_jax.experiment import targets
from ogpsa_jax.experiment.timing import PhaseClock
from ogpsa_jax.train import (
    DPOConfig,
    LoRASettings,
    ModelConfig,
    OGPSAConfig,
    SFTConfig,
    TrainConfig,
    train,
)


def stage_train_config(
    config: DemoConfig,
    *,
    method: str,
    stage: str,
    model_dir: str,
    data: str,
    reference: tuple[str, ...],
    n_rows: int,
) -> TrainConfig:
    """The library `TrainConfig` of one stage (SFT or DPO) of a demo run.

    Example:
        >>> from experiments.demo.config import default_config
        >>> cfg = stage_train_config(default_config(), method="ogpsa", stage="sft",
        ...     model_dir="m", data="d.jsonl", reference=("a.jsonl", "b.jsonl"), n_rows=96)
        >>> cfg.sft.ogpsa.method, cfg.sft.ogpsa.k, cfg.sft.max_steps
        ('gram_schmidt', 2, 24)
    """
    sft = stage == "sft"
    steps = config.sft_steps if sft else config.dpo_steps
    batch = config.sft_batch if sft else config.dpo_batch
    basis = {  # method -> (OGPSAConfig.method, k, energy)
        "ogpsa": ("gram_schmidt", len(reference), 0.0),
        "ogpsa-svd": ("svd", config.svd_k, 0.0),
        "ogpsa-gpm": ("activation", config.gpm_k, config.gpm_energy),
        "ogpsa-lora": ("activation", config.gpm_k, config.gpm_energy),
    }
    lora = method in ("lora", "ogpsa-lora")  # adapters only (LoRASettings), new per stage
    lr = (config.sft_lr if sft else config.dpo_lr) * (config.lora_lr_scale if lora else 1.0)
    kind, k, energy = basis.get(method, ("gram_schmidt", len(reference), 0.0))
    og = OGPSAConfig(
        enabled=method in basis,
        method=kind,
        k=k,
        energy=energy,
        refresh_every=config.sft_refresh if sft else config.dpo_refresh,
        reference=reference,
        reference_rows=max(1, config.reference_prompts // len(reference)),
        reference_batch_size=config.reference_batch,
        capture_rows=config.gpm_rows,
    )
    common = dict(
        data=data,
        epochs=math.ceil(steps * batch / max(n_rows, 1)) + 1,
        max_steps=steps,
        batch_size=batch,
        accum_steps=1,
        max_length=config.max_length,
        learning_rate=lr,
        schedule="cosine",
        ogpsa=og,
    )
    st = SFTConfig(**common) if sft else DPOConfig(**common, beta=config.dpo_beta)
    tokenizer = "" if config.model == "smollm2" else model_dir
    model = ModelConfig(
        path=model_dir,
        tokenizer=tokenizer,
        dtype=config.dtype,
        param_dtype="float32",
        frozen_layers=config.frozen_layers,
        lora=LoRASettings(rank=config.lora_rank if lora else 0, alpha=config.lora_alpha),
    )
    base = TrainConfig(
        seed=config.seed,
        num_devices=config.num_devices,
        mesh=(1, -1, 1),
        model=model,
        # No orbax checkpoints (each would write ~1.6 GB of weights and AdamW moments): a demo
        # stage is minutes long and is simply rerun if killed; its result is the final export.
        checkpoint_every=0,
        max_to_keep=1,
    )
    return dataclasses.replace(base, **{stage: st})


def train_stage(kind: str, train_config: TrainConfig, run_dir: str) -> tuple[str, int, float]:
    """Trains one stage (or reuses a finished identical run); returns (the trained model's HF
    folder: ``final/``, or ``final-merged/`` for a LoRA run, steps, seconds)."""
    timing = os.path.join(run_dir, "demo_timing.json")
    t0 = time.perf_counter()
    result = train(kind, train_config, run_dir, overwrite=True)
    seconds = time.perf_counter() - t0
    if result.model_dir is None:
        raise RuntimeError(f"training in {run_dir} was preempted; rerun the demo to resume")
    if os.path.isfile(timing) and seconds < 5.0:  # reused a finished run: report its real cost
        with open(timing) as f:
            seconds = json.load(f)["seconds"]
    else:
        with open(timing, "w") as f:
            json.dump({"seconds": seconds, "steps": result.step}, f)
    return result.model_dir, result.step, seconds


def stage_breakdown(run_dir: str) -> dict[str, float]:
    """Step and basis-refresh seconds of a finished stage, read from its metrics.jsonl (the first
    step's time includes compiling the step)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    out = {"first_step_s": 0.0, "steps_s": 0.0, "refresh_s": 0.0}
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows):
        dt = r["tokens"] / r["tokens_per_s"] if r.get("tokens_per_s") else 0.0
        out["first_step_s" if i == 0 else "steps_s"] += dt
        out["refresh_s"] += r.get("refresh_s", 0.0)
    return {k: round(v, 2) for k, v in out.items()}


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Stages:
    """Trains each (method, stage) once; a later run that needs it (SFT->DPO) reuses it.

    Args:
        config: the demo config.
        data: the training files.
        clock: times each stage as phase ``train METHOD TAG``.
        runs_dir: where the run folders go (named by method, tag and a hash of their data).
    """

    def __init__(
        self, config: DemoConfig, data: TrainingData, clock: PhaseClock, runs_dir: str
    ) -> None:
        self.config, self.data, self.clock, self.runs_dir = config, data, clock, runs_dir
        self.done: dict[tuple[str, str], tuple[str, int, float]] = {}
        self.breakdown: dict[str, dict[str, float]] = {}  # phase name -> stage_breakdown

    def get(self, method: str, kind: str, init_dir: str, tag: str) -> tuple[str, int, float]:
        """``(final dir, steps, seconds)`` of ``method``'s stage ``kind`` from ``init_dir``."""
        if (method, tag) in self.done:
            return self.done[(method, tag)]
        data, n_rows = self.data.stage_file(kind, replay=method == "replay")
        cfg = stage_train_config(
            self.config,
            method=method,
            stage=kind,
            model_dir=init_dir,
            data=data,
            reference=self.data.reference,
            n_rows=n_rows,
        )
        # The run folder is named by the data it trains on: train() resumes or reuses a run
        # whose config matches, and the config names the data files, not their contents.
        stamp = targets.cache_key(*(_digest(f) for f in (data, *self.data.reference)), init_dir)
        run_dir = os.path.join(self.runs_dir, f"{method}-{tag}-{stamp[:8]}")
        phase = f"train {method} {tag}"
        with self.clock.phase(phase):
            self.done[(method, tag)] = train_stage(kind, cfg, run_dir)
        self.breakdown[phase] = stage_breakdown(run_dir)
        return self.done[(method, tag)]
