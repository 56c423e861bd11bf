"""The checks of a training config before any compute: `validate` and `resolve_mesh_shape`.

`validate` checks types, ranges, choices, the combinations a stage does not support and the
mesh, and raises a ValueError naming the first bad field (``config field 'sft.ogpsa.k' ...``),
so a bad value never touches the output folder or the devices.

Example:
    >>> from ogpsa_jax.train.schema import SFTConfig, TrainConfig
    >>> validate(TrainConfig(sft=SFTConfig(learning_rate=3e-3)), "sft", device_count=8)
    (1, 8, 1)
    >>> validate(TrainConfig(seed=1.5), "sft", device_count=8)
    Traceback (most recent call last):
    ...
    ValueError: config field 'seed': expected <class 'int'>, got 1.5
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ogpsa_jax import overrides
from ogpsa_jax.models.layers import REMAT_CHOICES
from ogpsa_jax.projection import ogpsa_matrix
from ogpsa_jax.train.schema import (
    ARCHS,
    MATRIX_METHODS,
    METHODS,
    DPOConfig,
    SFTConfig,
    StageConfig,
    TrainConfig,
    lora_config,
    stages_of,
)


def _choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"config field {name!r} must be one of {list(allowed)}, got {value!r}")


def _stage_checks(name: str, st: StageConfig) -> None:
    def pos(field_name: str, value: float, zero_ok: bool = False) -> None:
        if value < 0 or (value == 0 and not zero_ok):
            cmp = ">= 0" if zero_ok else "> 0"
            raise ValueError(f"config field '{name}.{field_name}' must be {cmp}, got {value}")

    pos("epochs", st.epochs)
    pos("max_steps", st.max_steps, zero_ok=True)
    pos("limit", st.limit, zero_ok=True)
    pos("batch_size", st.batch_size)
    pos("accum_steps", st.accum_steps)
    pos("max_length", st.max_length)
    pos("learning_rate", st.learning_rate, zero_ok=True)
    pos("warmup_steps", st.warmup_steps, zero_ok=True)
    pos("max_grad_norm", st.max_grad_norm, zero_ok=True)
    pos("weight_decay", st.weight_decay, zero_ok=True)
    pos("eps", st.eps, zero_ok=True)
    for b in ("b1", "b2"):
        if not 0.0 <= getattr(st, b) < 1.0:
            raise ValueError(f"config field '{name}.{b}' must be in [0, 1), got {getattr(st, b)}")
    _choice(f"{name}.truncation", st.truncation, ("left", "right", "error"))
    _choice(f"{name}.schedule", st.schedule, ("cosine", "constant"))
    _choice(f"{name}.optimizer", st.optimizer, ("adamw", "sgd"))
    if isinstance(st, SFTConfig):
        _choice(f"{name}.train_turns", st.train_turns, ("all", "last"))
    if isinstance(st, DPOConfig):
        _choice(f"{name}.loss_type", st.loss_type, ("sigmoid", "ipo"))
        _choice(f"{name}.dpo_reference", st.dpo_reference, ("precompute", "model"))
        pos("beta", st.beta)
        if not 0.0 <= st.label_smoothing < 0.5:
            raise ValueError(
                f"config field '{name}.label_smoothing' must be in [0, 0.5), "
                f"got {st.label_smoothing}"
            )
    og = st.ogpsa
    _choice(f"{name}.ogpsa.method", og.method, METHODS)
    _choice(f"{name}.ogpsa.basis_dtype", og.basis_dtype, ("float32", "bfloat16"))
    _choice(f"{name}.ogpsa.placement", og.placement, ("before", "after"))
    if og.first_order and og.method == "activation":
        raise ValueError(
            f"config field '{name}.ogpsa.first_order' needs a gradient basis (gram_schmidt, "
            "svd or gradient): the activation refresh computes no reference gradient"
        )
    if og.k < 1:
        raise ValueError(f"config field '{name}.ogpsa.k' must be >= 1, got {og.k}")
    if not 0.0 <= og.strength <= 1.0:
        raise ValueError(
            f"config field '{name}.ogpsa.strength' must be in [0, 1], got {og.strength}"
        )
    if not 0.0 <= og.energy <= 1.0:
        raise ValueError(f"config field '{name}.ogpsa.energy' must be in [0, 1], got {og.energy}")
    if not 0.0 <= og.lora_tol < 1.0:
        raise ValueError(
            f"config field '{name}.ogpsa.lora_tol' must be in [0, 1), got {og.lora_tol}"
        )
    for f in ("refresh_every", "reference_rows", "reference_batch_size", "capture_rows"):
        pos(f"ogpsa.{f}", getattr(og, f))
    if og.union and og.method != "activation":
        raise ValueError(
            f"config field '{name}.ogpsa.union' needs method='activation', got {og.method!r}"
        )
    if og.enabled and not og.reference:
        raise ValueError(f"config field '{name}.ogpsa.reference' is empty but OGPSA is enabled")
    if og.enabled and og.method in MATRIX_METHODS:
        try:  # the matrix transform's own rule (e.g. no conflict_only), checked before any compute
            ogpsa_matrix(og.k, conflict_only=og.conflict_only)
        except ValueError as e:
            raise ValueError(f"config field '{name}.ogpsa.conflict_only': {e}") from None


def resolve_mesh_shape(config: TrainConfig, device_count: int) -> tuple[int, int, int]:
    """The concrete (data, fsdp, tensor) shape, checked against the devices used.

    Args:
        config: the run config.
        device_count: number of visible devices (``jax.device_count()``).

    Returns:
        The mesh shape with any -1 filled in.
    """
    n = config.num_devices or device_count
    if n > device_count:
        raise ValueError(f"num_devices={n} but only {device_count} devices are visible")
    shape = list(config.mesh)
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
        raise ValueError(f"mesh {tuple(config.mesh)}: entries must be >= 1, with at most one -1")
    if -1 in shape:
        rest = -math.prod(shape)
        if rest == 0 or n % rest:
            raise ValueError(f"mesh {tuple(config.mesh)} does not divide {n} devices")
        shape[shape.index(-1)] = n // rest
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh {tuple(shape)} has {math.prod(shape)} devices but {n} are used "
            f"(num_devices={config.num_devices}, visible={device_count})"
        )
    return tuple(shape)  # type: ignore[return-value]


def validate(config: TrainConfig, command: str, device_count: int | None) -> tuple[int, ...]:
    """Checks types, ranges, choices and the mesh before any compute.

    Args:
        config: the config to check.
        command: "sft", "dpo" or "sft-dpo".
        device_count: visible devices; None skips the checks that depend on them (the mesh
            and the batch divisibility), e.g. to show a config for another machine.

    Returns:
        The resolved mesh shape (``config.mesh`` as given when ``device_count`` is None).

    Raises:
        ValueError: naming the first bad field.
    """
    overrides.check_types(config)
    stages = stages_of(command)
    _choice("model.dtype", config.model.dtype, ("float32", "bfloat16"))
    _choice("model.param_dtype", config.model.param_dtype, ("float32", "bfloat16"))
    _choice("mesh_axis_type", config.mesh_axis_type, ("auto", "explicit"))
    _choice("on_nonfinite", config.on_nonfinite, ("skip", "stop"))
    if not config.model.path:
        _choice("model.arch", config.model.arch, ARCHS)
    if config.model.frozen_layers < 0:
        raise ValueError("config field 'model.frozen_layers' must be >= 0")
    if config.model.scan_unroll < 0:
        raise ValueError(
            f"config field 'model.scan_unroll' must be >= 0 (0 = unroll every layer), "
            f"got {config.model.scan_unroll}"
        )
    lora_config(config.model.lora)
    if config.model.attention_chunk < -1:
        raise ValueError(
            f"config field 'model.attention_chunk' must be >= -1 (-1 = auto, 0 = one block), "
            f"got {config.model.attention_chunk}"
        )
    _choice("model.remat", config.model.remat, REMAT_CHOICES)
    if config.model.loss_chunk < 0:
        raise ValueError(
            f"config field 'model.loss_chunk' must be >= 0 (0 = all positions at once), "
            f"got {config.model.loss_chunk}"
        )
    if config.checkpoint_every < 0:
        raise ValueError(
            f"config field 'checkpoint_every' must be >= 0, got {config.checkpoint_every}"
        )
    if any(n < 1 for n in config.export_at):
        raise ValueError(f"config field 'export_at' must hold steps >= 1, got {config.export_at}")
    for f in ("max_to_keep", "max_consecutive_skips"):
        if getattr(config, f) < 1:
            raise ValueError(f"config field {f!r} must be >= 1, got {getattr(config, f)}")
    if config.num_devices < 0:
        raise ValueError(f"config field 'num_devices' must be >= 0, got {config.num_devices}")
    for stage in stages:
        _stage_checks(stage, getattr(config, stage))
        og = getattr(config, stage).ogpsa
        if og.enabled and og.placement == "after" and config.model.lora.rank > 0:
            raise ValueError(
                f"config field '{stage}.ogpsa.placement' = 'after' is for full fine-tuning; "
                "with LoRA (model.lora.rank > 0) use 'before'"
            )
    if device_count is None:
        return tuple(config.mesh)
    shape = resolve_mesh_shape(config, device_count)
    for stage in stages:
        rows = getattr(config, stage).batch_size
        if rows % (shape[0] * shape[1]):
            raise ValueError(
                f"config field '{stage}.batch_size'={rows} is not divisible by the mesh's "
                f"data*fsdp={shape[0] * shape[1]}"
            )
    return shape
