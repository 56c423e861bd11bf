"""Presets: functions returning a `TrainConfig`, and `preset(name)` to look one up.

| preset | what it is for |
| --- | --- |
| ``tiny`` | a random 3-layer decoder and the shipped tiny tokenizer and data: seconds on a CPU |
| ``smollm2`` | the real SmolLM2-135M-Instruct (offline), short sequences, top 10 of 30 layers |
| ``qwen2_5_7b_paper`` | Qwen2.5-7B-Instruct with the paper's settings |
| ``llama3_1_8b_paper`` | Llama-3.1-8B-Instruct with the paper's settings |

Example:
    >>> from ogpsa_jax.overrides import apply_overrides
    >>> cfg = apply_overrides(preset("tiny"), ["sft.learning_rate=3e-3", "checkpoint_every=5"])
    >>> cfg.sft.learning_rate, cfg.checkpoint_every
    (0.003, 5)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

from ogpsa_jax.train.schema import DPOConfig, ModelConfig, OGPSAConfig, SFTConfig, TrainConfig


def tiny() -> TrainConfig:
    """Tiny random decoder, tiny tokenizer, shipped data: seconds on CPU."""
    og_sft = OGPSAConfig(k=2, method="svd", refresh_every=4, reference_rows=32)
    og_dpo = OGPSAConfig(k=2, method="svd", refresh_every=2, reference_rows=32)
    common = dict(max_length=96, epochs=3, schedule="cosine")
    return TrainConfig(
        seed=0,
        mesh=(1, -1, 1),
        model=ModelConfig(arch="tiny", scan_unroll=0),
        sft=SFTConfig(
            data="assets:safety_sft.jsonl",
            batch_size=8,
            accum_steps=2,
            learning_rate=3e-3,
            ogpsa=og_sft,
            **common,
        ),
        dpo=DPOConfig(
            data="assets:safety_prefs.jsonl",
            batch_size=8,
            accum_steps=2,
            learning_rate=1e-3,
            beta=0.2,
            ogpsa=og_dpo,
            **common,
        ),
        checkpoint_every=4,
    )


def smollm2() -> TrainConfig:
    """The real SmolLM2-135M-Instruct (offline), short sequences, top 10 of 30 layers trained."""
    og = OGPSAConfig(k=2, method="gram_schmidt", reference_rows=32, reference_batch_size=4)
    common = dict(max_length=128, batch_size=4, accum_steps=1, max_steps=20)
    return TrainConfig(
        mesh=(1, -1, 1),
        model=ModelConfig(path="smollm2", dtype="bfloat16", frozen_layers=20),
        sft=SFTConfig(
            data="assets:safety_sft.jsonl",
            learning_rate=1e-5,
            ogpsa=dataclasses.replace(og, refresh_every=10),
            **common,
        ),
        dpo=DPOConfig(
            data="assets:safety_prefs.jsonl",
            learning_rate=5e-6,
            ogpsa=dataclasses.replace(og, k=1, refresh_every=5),
            **common,
        ),
        checkpoint_every=10,
    )


def _paper(path: str) -> TrainConfig:
    # Reference code: 8 GPUs (ZeRO-2); 4 rows/device x accumulation 4 (SFT), 2 pairs/device x
    # accumulation 16 (DPO); lr 1e-6 cosine to 0, no warm-up; bf16; cutoff 2048. Here: FSDP over
    # 8 devices with the same global batch; scale mesh and batch_size together on a larger pod
    # (e.g. --set mesh=2,16,1 --set sft.batch_size=128).
    # Memory (`ogpsa plan`, docs/benchmarks.md): at 4 rows x 2048 tokens per device the
    # activations of a 7-8B model need every layer rematerialised ("block") and the lm_head's
    # float32 logits taken 512 positions at a time; the step then fits an 80 GB device.
    # Reference batches of 40 rows (5 per device; 200 rows per set = 5 batches): Gram-Schmidt
    # takes the token mean over the whole set, so the batch size changes only the refresh's
    # speed (predicted 1.7x faster than 1 row per device, for 4 GB more at its peak).
    sft_ref = ("HuggingFaceH4/ultrafeedback_binarized", "pminervini/HaluEval")
    return TrainConfig(
        num_devices=8,
        mesh=(1, 8, 1),
        model=ModelConfig(
            path=path, dtype="bfloat16", param_dtype="float32", remat="block", loss_chunk=512
        ),
        sft=SFTConfig(
            data="PKU-Alignment/PKU-SafeRLHF",
            limit=10_000,
            epochs=3,
            batch_size=32,
            accum_steps=4,
            max_length=2048,
            learning_rate=1e-6,
            ogpsa=OGPSAConfig(k=2, reference=sft_ref, refresh_every=30, reference_batch_size=40),
        ),
        dpo=DPOConfig(
            data="PKU-Alignment/PKU-SafeRLHF",
            limit=10_000,
            epochs=1,
            batch_size=16,
            accum_steps=16,
            max_length=2048,
            learning_rate=1e-6,
            beta=0.2,
            label_smoothing=0.0,
            loss_type="sigmoid",
            ogpsa=OGPSAConfig(k=1, reference=sft_ref[:1], refresh_every=5, reference_batch_size=40),
        ),
        checkpoint_every=100,
    )


def qwen2_5_7b_paper() -> TrainConfig:
    """Qwen2.5-7B-Instruct with the paper's settings (HF folder at ./Qwen2.5-7B-Instruct)."""
    cfg = _paper("Qwen2.5-7B-Instruct")
    system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, system_prompt=system))


def llama3_1_8b_paper() -> TrainConfig:
    """Llama-3.1-8B-Instruct with the paper's settings (HF folder at ./Llama-3.1-8B-Instruct)."""
    return _paper("Llama-3.1-8B-Instruct")


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "tiny": tiny,
    "smollm2": smollm2,
    "qwen2_5_7b_paper": qwen2_5_7b_paper,
    "llama3_1_8b_paper": llama3_1_8b_paper,
}


def preset(name: str) -> TrainConfig:
    """Returns the named preset config.

    Args:
        name: one of `PRESETS`.

    Returns:
        The preset's `TrainConfig`.

    Example:
        >>> preset("tiny").model.arch
        'tiny'
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
