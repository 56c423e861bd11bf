"""The training configuration: frozen kw-only dataclasses with a comment per field.

`TrainConfig` holds a run (one or two stages); `SFTConfig` and `DPOConfig` one stage each (the
fields both have are `StageConfig`'s), with its `OGPSAConfig`; `ModelConfig` the model, with its
`LoRASettings` (``model.lora``: rank 0 trains every weight, rank >= 1 only low-rank adapters).
Presets are functions returning a `TrainConfig` (`ogpsa_jax.train.presets`);
`dataclasses.replace`, or `ogpsa_jax.overrides.apply_overrides` with dotted ``field=value``
strings, derives variants. Every field is listed with its type, default and comment in
docs/config.md, generated from this file by `ogpsa_jax.train.config_doc`.
`ogpsa_jax.train.validation.validate` checks types, ranges, choices and the mesh before any
compute, so a bad value never touches the output folder.

Example:
    >>> config = TrainConfig(sft=SFTConfig(learning_rate=3e-3))
    >>> config.sft.learning_rate, config.sft.ogpsa.k, config.dpo.ogpsa.k
    (0.003, 2, 1)
    >>> stages_of("sft-dpo")
    ('sft', 'dpo')
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ogpsa_jax.models.lora import TARGETS, LoRAConfig

METHODS = ("gram_schmidt", "svd", "gradient", "activation")
FLAT_METHODS = ("gram_schmidt", "svd")
MATRIX_METHODS = ("gradient", "activation")
ARCHS = ("tiny", "smollm2_135m", "qwen2_5_7b", "llama3_1_8b")  # random-init architectures


@dataclass(frozen=True, kw_only=True)
class LoRASettings:
    """LoRA adapters (fields ``model.lora.*``): with rank >= 1 only the adapters train."""

    # Adapter rank r: 0 = no adapters (every weight trains), >= 1 = train only the adapters
    # (the base weights are frozen: no gradients, no optimizer state).
    rank: int = 0
    # Scaling numerator: the update is (alpha / rank) * (x @ A) @ B (alpha / sqrt(rank) with
    # use_rslora).
    alpha: float = 16.0
    # Adapted projections, of q, k, v, o, gate, up, down (e.g. "q,v").
    targets: tuple[str, ...] = tuple(TARGETS)
    # Rank-stabilised scaling alpha / sqrt(rank).
    use_rslora: bool = False


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model to train and how it computes."""

    # Hugging Face folder to start from ("" = fresh random weights of `arch`); the special value
    # "smollm2" is the offline SmolLM2-135M-Instruct (converted once into $OGPSA_CACHE).
    path: str = ""
    # Architecture of a random init, used only when `path` is "": tiny | smollm2_135m |
    # qwen2_5_7b | llama3_1_8b.
    arch: str = "tiny"
    # Tokenizer folder; "" = the model folder's own (the shipped tiny ChatML tokenizer for a
    # random init); "tiny" = the shipped tiny tokenizer.
    tokenizer: str = ""
    # Activation / matmul dtype (float32 | bfloat16).
    dtype: str = "float32"
    # Parameter (master weight) dtype (float32 | bfloat16).
    param_dtype: str = "float32"
    # Freeze the bottom n layers (only the top layers get gradients).
    frozen_layers: int = 0
    # Layers per iteration of the layer scan: 1 = a loop (compiles once; best for deep models),
    # 0 = every layer unrolled (faster steps for a few small layers, slower compiles for many).
    scan_unroll: int = 1
    # Query rows per block of the causal attention: -1 = auto (64, or length / 16 beyond 1024
    # tokens), 0 = one L x L block. Blocks skip the masked upper triangle (same result).
    attention_chunk: int = -1
    # Rematerialisation of each layer in the backward pass: "none", "block" (keep only the
    # layer's input; least memory, about one more forward pass of compute) or "dots" (also
    # keep the outputs of its linear layers). Same gradients.
    remat: str = "none"
    # Positions per chunk of the lm_head + log-softmax in the losses (0 = all at once): the
    # float32 logits of only one chunk [rows, loss_chunk, vocab] exist at a time.
    loss_chunk: int = 0
    # Optional system prompt put in every rendered conversation ("" = the template's default).
    system_prompt: str = ""
    # LoRA adapters (rank 0 = none: full fine-tuning).
    lora: LoRASettings = field(default_factory=LoRASettings)


@dataclass(frozen=True, kw_only=True)
class OGPSAConfig:
    """The capability subspace and how it is used."""

    # False = plain optimiser (same step, no projection): the naive baseline.
    enabled: bool = True
    # Basis estimator: gram_schmidt | svd (flat, per tensor) | gradient | activation (matrix).
    method: str = "gram_schmidt"
    # Directions per tensor (flat) or rank per matrix (matrix methods).
    k: int = 2
    # svd / gradient / activation: smallest rank capturing this energy fraction (0 = always k;
    # for activation this is GPM's threshold on each layer's input energy, e.g. 0.97).
    energy: float = 0.0
    # Fraction of the subspace component removed, in [0, 1].
    strength: float = 1.0
    # Remove a direction only when the step would raise the reference loss ("threshold" mode).
    conflict_only: bool = False
    # Projected tensors: "all", "no_embed", or a regex matched against the "/"-joined path.
    mask: str = "all"
    # Recompute the basis at the current weights every this many steps (reference: 30 / 5).
    refresh_every: int = 30
    # Reference sources (HF ids, local files, or "assets:NAME"); each is its own set.
    reference: tuple[str, ...] = ("assets:general.jsonl",)
    # First rows taken from each reference source (reference code: 200).
    reference_rows: int = 200
    # Rows per reference micro-batch.
    reference_batch_size: int = 8
    # activation only: token rows (layer-input samples) drawn over the whole reference set,
    # spread evenly over its batches; bounds the refresh's memory (rows x d_in per layer).
    capture_rows: int = 512
    # Storage dtype of the basis: "float32" or "bfloat16" (half the bytes; the coefficients
    # and the subtraction stay float32).
    basis_dtype: str = "float32"
    # activation only: keep the previous basis and add the new input directions to it (GPM's
    # accumulation) instead of replacing it; needs energy > 0 to leave room for new directions.
    union: bool = False
    # LoRA with a matrix method: B is kept off the directions x @ A of protected inputs x larger
    # than lora_tol * ||A||_2 (0 = all above float32 round-off: exact; B may stop moving after
    # a refresh that rotates the basis), in [0, 1).
    lora_tol: float = 0.0
    # Where the projection sits: "before" AdamW (the reference code: the gradient is projected)
    # or "after" it (Adam-NSCL's placement: the update AdamW computed is projected, so the
    # applied step itself stays out of the span; full fine-tuning only).
    placement: str = "before"
    # Gradient bases: at each refresh also log the reference loss's change since the previous
    # refresh against its first-order prediction <g_ref, delta params> (keeps a copy of the
    # parameters and of the reference gradient between refreshes).
    first_order: bool = False
    # Log update_in_span every step: the share of the update AdamW applied that lies in the
    # capability span (one more pass over the update and the basis per step; on XLA:CPU a
    # 7B step with a bfloat16 basis held a float32 copy of it for this, 3.8 GB per device).
    update_in_span: bool = False


@dataclass(frozen=True, kw_only=True)
class StageConfig:
    """The fields both training stages have: data, budget, optimiser and OGPSA settings."""

    # Training data: a local file (any extension), a Hugging Face data set id ("org/name"), or
    # "assets:NAME" (a file shipped in ogpsa_jax/assets/data); formats in docs/data.md.
    data: str = "assets:safety_sft.jsonl"
    # Split, for hub ids.
    split: str = "train"
    # Use at most this many rows (0 = all).
    limit: int = 0
    # Passes over the data.
    epochs: int = 1
    # Stop after this many optimiser steps (0 = the epochs decide).
    max_steps: int = 0
    # Global rows (pairs for DPO) per micro-batch; divisible by mesh data*fsdp.
    batch_size: int = 8
    # Micro-batches accumulated per optimiser step.
    accum_steps: int = 1
    # Token cutoff per example.
    max_length: int = 256
    # Over-long rows: "left" drops prompt start, "right" drops response end, "error" raises.
    truncation: str = "left"
    # Peak learning rate.
    learning_rate: float = 1e-6
    # "cosine" (to 0 at the last step) or "constant".
    schedule: str = "cosine"
    # Linear warm-up steps before the schedule (paper: 0).
    warmup_steps: int = 0
    # "adamw" (paper) or "sgd" (used by tests: the applied update is then exactly -lr * P g).
    optimizer: str = "adamw"
    # AdamW first-moment decay.
    b1: float = 0.9
    # AdamW second-moment decay.
    b2: float = 0.999
    # AdamW epsilon.
    eps: float = 1e-8
    # AdamW decoupled weight decay.
    weight_decay: float = 0.0
    # Global-norm clip after projection (0 = no clipping).
    max_grad_norm: float = 1.0
    # The capability subspace.
    ogpsa: OGPSAConfig = field(default_factory=OGPSAConfig)


@dataclass(frozen=True, kw_only=True)
class SFTConfig(StageConfig):
    """The SFT stage: the fields of `StageConfig` and the SFT-only ones."""

    # Rows with several assistant turns (a messages list, or a history before the prompt): "all"
    # trains every assistant turn, "last" only the final reply.
    train_turns: str = "all"


@dataclass(frozen=True, kw_only=True)
class DPOConfig(StageConfig):
    """The DPO stage: the fields of `StageConfig` (with DPO defaults) and the DPO-only ones."""

    # Preference data: a local file (any extension), a Hugging Face data set id ("org/name"),
    # or "assets:NAME"; formats in docs/data.md.
    data: str = "assets:safety_prefs.jsonl"
    # Global pairs per micro-batch; divisible by mesh data*fsdp.
    batch_size: int = 2
    # Micro-batches accumulated per optimiser step.
    accum_steps: int = 16
    # The capability subspace (the reference code: one direction, refreshed every 5 steps).
    ogpsa: OGPSAConfig = field(default_factory=lambda: OGPSAConfig(k=1, refresh_every=5))
    # Inverse temperature of the DPO loss.
    beta: float = 0.2
    # Label smoothing, in [0, 0.5) (sigmoid loss only).
    label_smoothing: float = 0.0
    # "sigmoid" or "ipo".
    loss_type: str = "sigmoid"
    # Reference log-probs: "precompute" (one pass before training) or "model" (kept frozen).
    dpo_reference: str = "precompute"
    # PKU-SafeRLHF preferences: keep only pairs with exactly one safe response.
    safe_pairs_only: bool = False


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """A full training run (one or two stages)."""

    # Seed for initialisation, shuffling and everything random.
    seed: int = 0
    # Devices used (0 = all visible); the mesh product must equal it.
    num_devices: int = 0
    # Mesh shape (data, fsdp, tensor); one entry may be -1 (= the rest of the devices).
    mesh: tuple[int, int, int] = (1, -1, 1)
    # Mesh axis type: "auto" (GSPMD) or "explicit".
    mesh_axis_type: str = "auto"
    # The model.
    model: ModelConfig = field(default_factory=ModelConfig)
    # SFT stage settings (commands "sft" and "sft-dpo").
    sft: SFTConfig = field(default_factory=SFTConfig)
    # DPO stage settings (commands "dpo" and "sft-dpo").
    dpo: DPOConfig = field(default_factory=DPOConfig)
    # Save a checkpoint every this many steps (and always at the end); 0 = none (only the final
    # HF export and the checkpoint of a stop by SIGTERM or Ctrl-C; a killed stage restarts from
    # its beginning, and a finished one cannot be extended).
    checkpoint_every: int = 100
    # Checkpoints kept on disk.
    max_to_keep: int = 2
    # Also export the model as a full HF folder ``step-N/`` in the stage folder after each of
    # these steps of every stage (the same run evaluated along its training length; with LoRA the
    # merged model). The last step is always exported as ``final/``.
    export_at: tuple[int, ...] = ()
    # "skip": a non-finite step changes nothing and is counted; "stop": raise at once.
    on_nonfinite: str = "skip"
    # Stop after this many consecutive skipped steps.
    max_consecutive_skips: int = 5


# ----------------------------------------------------------------------------- helpers


def lora_config(settings: LoRASettings) -> LoRAConfig | None:
    """The adapters' `LoRAConfig` of ``model.lora`` (None for rank 0: no adapters).

    Raises:
        ValueError: naming the field: rank < 0, alpha <= 0, unknown, repeated or no targets.

    Example:
        >>> lora_config(LoRASettings(rank=4, targets=("q", "v"))).scaling
        4.0
        >>> lora_config(LoRASettings()) is None
        True
    """
    if settings.rank < 0:
        raise ValueError(
            f"config field 'model.lora.rank' must be >= 0 (0 = no adapters), got {settings.rank}"
        )
    if settings.rank == 0:
        return None
    try:
        return LoRAConfig(
            rank=settings.rank,
            alpha=settings.alpha,
            targets=settings.targets,
            use_rslora=settings.use_rslora,
        )
    except ValueError as e:
        field_name = "alpha" if "alpha" in str(e) else "targets"
        raise ValueError(f"config field 'model.lora.{field_name}': {e}") from None


def stages_of(command: str) -> tuple[str, ...]:
    """The stages a ``train`` sub-command runs: sft -> (sft,), sft-dpo -> (sft, dpo)."""
    table = {"sft": ("sft",), "dpo": ("dpo",), "sft-dpo": ("sft", "dpo")}
    if command not in table:
        raise ValueError(f"unknown training command {command!r}; known: {', '.join(table)}")
    return table[command]
