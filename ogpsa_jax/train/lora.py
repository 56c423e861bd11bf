"""LoRA in training: the starting model, the checks made before any compute, and the export.

With ``model.lora.rank >= 1`` a stage trains adapters only (`ogpsa_jax.models.lora`): its
trainable tree is the `LoRAParam` variables, and the frozen base weights are an argument of
every jitted program (never closed over, which would embed them in the program as constants).

* **Where a stage starts.** ``model.path`` may be a full Hugging Face folder or a PEFT adapter
  folder; an adapter folder is its base (``base_model_name_or_path``, a local folder) with the
  adapter merged into the weights (`load_start`). Fresh adapters (B = 0) are then added, so the
  stage starts exactly at that model. The DPO stage of ``sft-dpo`` starts from the SFT stage's
  merged model (``DIR/sft/final-merged``) with new adapters, as InfLoRA does per task: merge
  the finished branch, open a new one.
* **Checks.** `check_lora` refuses a rank larger than a target's width on the model's
  architecture (read from ``config.json``, no weights) before the run folder is touched.
* **Export.** `export_lora` writes ``final/`` (a PEFT adapter folder and the tokenizer files),
  ``final-merged/`` (a full HF folder with the adapters merged) and, when the base the
  adapters apply to is not a folder on disk (a random init, or a merged adapter folder),
  ``base/`` (that base), which ``final/adapter_config.json`` then names by absolute path.

Example:
    >>> from ogpsa_jax.train.presets import preset
    >>> from ogpsa_jax.overrides import apply_overrides
    >>> cfg = apply_overrides(preset("tiny"), ["model.lora.rank=65"])
    >>> check_lora(cfg, None)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: config field 'model.lora.rank': LoRA rank 65 exceeds target 'q' ...
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from typing import Any

from ogpsa_jax import models
from ogpsa_jax.models.lora import adapter_key, lora_shapes, merge_lora, remove_lora
from ogpsa_jax.models.peft import is_peft_folder, peft_base_folder
from ogpsa_jax.train.schema import MATRIX_METHODS, TrainConfig, lora_config

logger = logging.getLogger(__name__)


def architecture(config: TrainConfig, model_path: str | None) -> models.DecoderConfig:
    """The architecture a run trains: ``model.arch`` for a random init, else the ``config.json``
    of the model folder (of an adapter folder's base). The vocabulary of ``tiny`` is the
    tokenizer's at run time; the projections' widths do not depend on it.

    Example:
        >>> from ogpsa_jax.train.presets import preset
        >>> architecture(preset("tiny"), None).hidden_size
        64
    """
    if model_path is None:
        return getattr(models, f"{config.model.arch}_config")()
    folder = peft_base_folder(model_path) if is_peft_folder(model_path) else model_path
    with open(os.path.join(folder, "config.json")) as f:
        return models.DecoderConfig.from_hf(json.load(f))


def check_lora(config: TrainConfig, model_path: str | None) -> None:
    """Checks ``model.lora`` against the model's architecture (no weights are read).

    Args:
        config: the validated run config.
        model_path: the checked model folder (None: a random init of ``model.arch``).

    Raises:
        ValueError: naming ``model.lora.rank`` when it exceeds a target's input or output width,
            or an ``ogpsa.mask`` regex that splits an adapter's A from its B (matrix methods).
    """
    lora = lora_config(config.model.lora)
    if lora is None:
        return
    try:
        lora_shapes(lora, architecture(config, model_path))
    except ValueError as e:
        raise ValueError(f"config field 'model.lora.rank': {e}") from None
    for stage in ("sft", "dpo"):  # a matrix basis needs both matrices of an adapter or neither
        og = getattr(config, stage).ogpsa
        if not og.enabled or og.method not in MATRIX_METHODS or og.mask in ("all", "no_embed"):
            continue
        try:
            pattern = re.compile(og.mask)
        except re.error as e:
            raise ValueError(
                f"config field '{stage}.ogpsa.mask' is not a valid regex: {e}"
            ) from None
        for t in lora.targets:
            a, b = (f"layers/{adapter_key(t)}/{m}" for m in "ab")
            if bool(pattern.search(a)) != bool(pattern.search(b)):
                raise ValueError(
                    f"config field '{stage}.ogpsa.mask' {og.mask!r} selects one of {a} and {b}: "
                    "with LoRA a matrix basis needs both matrices of an adapter or neither"
                )


def adapter_tokenizer_folder(model_path: str | None) -> str | None:
    """Where the tokenizer of a model folder is: the folder itself, or, for an adapter folder
    without tokenizer files, its base folder.

    Example:
        >>> adapter_tokenizer_folder(None) is None
        True
    """
    if model_path is None or not is_peft_folder(model_path):
        return model_path
    if os.path.isfile(os.path.join(model_path, "tokenizer_config.json")):
        return model_path
    return peft_base_folder(model_path)


def load_start(path: str, *, dtype: Any, param_dtype: Any, mesh: Any) -> models.Decoder:
    """The model a stage starts from: `load_hf` of a full folder, or, for a PEFT adapter
    folder, its base with the adapter merged into the weights (a plain `Decoder`).

    Args:
        path: a Hugging Face model folder or a PEFT adapter folder (checked beforehand).
        dtype: compute dtype.
        param_dtype: parameter dtype.
        mesh: the training mesh (the weights are created on their shardings).

    Returns:
        The decoder, without adapters.
    """
    if not is_peft_folder(path):
        return models.load_hf(path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    base = models.load_hf(peft_base_folder(path), dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    logger.info("starting from the adapter %s merged into its base", path)
    return merge_lora(models.load_peft(base, path))


def base_folder(init_path: str | None) -> str | None:
    """The full HF folder the adapters of a stage started at ``init_path`` apply to, or None
    when that base is not on disk (a random init, or an adapter folder merged at load)."""
    if init_path is None or is_peft_folder(init_path):
        return None
    return os.path.abspath(init_path)


def _fresh(path: str) -> str:
    if os.path.isdir(path):
        shutil.rmtree(path)
    return path


def export_lora(
    model: models.Decoder,
    stage_dir: str,
    tokenizer: Any,
    base_dir: str | None,
) -> tuple[str, str]:
    """Writes a stage's adapters: ``final/`` (PEFT), ``final-merged/`` (full HF), ``base/``.

    Args:
        model: the trained decoder with adapters (weights on this host).
        stage_dir: the stage's folder.
        tokenizer: its tokenizer (saved into ``final/``, ``final-merged/`` and ``base/``).
        base_dir: the full HF folder of the base (None: ``stage_dir/base`` is written).

    Returns:
        (the adapter folder, the merged folder).
    """
    if base_dir is None:
        base_dir = _fresh(os.path.join(stage_dir, "base"))
        models.save_hf(remove_lora(model), base_dir)
        tokenizer.save_pretrained(base_dir)
    final_dir = _fresh(os.path.join(stage_dir, "final"))
    models.save_peft(model, final_dir, base_model_name_or_path=os.path.abspath(base_dir))
    tokenizer.save_pretrained(final_dir)
    merged_dir = _fresh(os.path.join(stage_dir, "final-merged"))
    models.save_hf(merge_lora(model), merged_dir)
    tokenizer.save_pretrained(merged_dir)
    return final_dir, merged_dir


__all__ = [
    "architecture",
    "base_folder",
    "check_lora",
    "export_lora",
    "load_start",
    "adapter_tokenizer_folder",
]
