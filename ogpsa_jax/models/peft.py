"""Hugging Face PEFT adapter folders <-> LoRA adapters on a `Decoder`.

A PEFT LoRA folder holds ``adapter_config.json`` (``peft_type`` LORA, ``task_type``
CAUSAL_LM, ``r``, ``lora_alpha``, ``target_modules``, ``use_rslora``,
``base_model_name_or_path``, ...) and ``adapter_model.safetensors`` with one A and one B per
layer and target, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``
([r, d_in]) and ``...lora_B.weight`` ([d_out, r]). `save_peft` writes such a folder (PEFT's
``PeftModel.from_pretrained`` loads it); `load_peft` reads one onto a base decoder and is
stricter than PEFT: missing or unexpected tensors, wrong shapes, adapter features we do not
implement and a folder made for another architecture are errors, raised before any compute.

Example:
    >>> model = load_peft(load_hf("base/"), "adapter/")  # doctest: +SKIP
    >>> save_peft(model, "again/", base_model_name_or_path="base/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from ogpsa_jax.models.config import ARCHITECTURES, DecoderConfig
from ogpsa_jax.models.decoder import Decoder
from ogpsa_jax.models.hf import HF_LAYER_NAMES
from ogpsa_jax.models.lora import TARGETS, LoRAConfig, adapters, add_lora, lora_shapes

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper of a *ForCausalLM model
# PEFT settings that change what an adapter computes and that we do not implement: the folder
# is refused unless each is absent or empty/false.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "fan_in_fan_out": "transposed (Conv1D) base weights",
    "lora_bias": "biases on lora_B",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "adapters on some layers only",
    "layers_pattern": "adapters on some layers only",
    "exclude_modules": "excluded modules",
    "modules_to_save": "fully trained extra modules",
    "target_parameters": "adapters on parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "replicated layers",
    "loftq_config": "LoftQ (a modified base model)",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "use_bdlora": "block-diagonal LoRA",
}


def peft_module(target: str) -> str:
    """The Hugging Face module path of a target inside a layer.

    Example:
        >>> peft_module("gate")
        'mlp.gate_proj'
    """
    return HF_LAYER_NAMES[TARGETS[target]][0].removesuffix(".weight")


def peft_tensor_name(layer: int, target: str, which: str) -> str:
    """PEFT's saved name of one adapter matrix (`which` is "A" or "B").

    Example:
        >>> peft_tensor_name(0, "q", "A")
        'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'
    """
    return f"{PREFIX}model.layers.{layer}.{peft_module(target)}.lora_{which}.weight"


def save_peft(
    model: Decoder, path: str | os.PathLike, *, base_model_name_or_path: str | os.PathLike
) -> str:
    """Writes the model's adapters as a PEFT LoRA folder (float32 tensors).

    Args:
        model: a decoder with adapters (`add_lora` or `load_peft`).
        path: output folder (created).
        base_model_name_or_path: where PEFT finds the base model: a hub id, or a local folder
            (written as an absolute path: PEFT resolves a relative one against the current
            directory, not the adapter folder).

    Returns:
        The folder path.

    Raises:
        ValueError: the model has no adapters.

    Example:
        >>> import tempfile
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> from ogpsa_jax.models.lora import LoRAConfig, add_lora
        >>> model = add_lora(init_random(tiny_config()), LoRAConfig(rank=2, alpha=4, targets="q"))
        >>> with tempfile.TemporaryDirectory() as out:
        ...     again = load_peft(init_random(tiny_config()), save_peft(model, out,
        ...         base_model_name_or_path="org/tiny"))
        >>> again.lora == model.lora
        True
    """
    lora: LoRAConfig | None = getattr(model, "lora", None)
    if lora is None:
        raise ValueError("the model has no LoRA adapters to save: add_lora or load_peft first")
    base = os.fspath(base_model_name_or_path)
    if os.path.isdir(base):
        base = os.path.abspath(base)
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    tensors = {}
    for t, adapter in adapters(model).items():
        a_LxIxR = np.asarray(jax.device_get(adapter.a[...])).astype(np.float32)
        b_LxRxO = np.asarray(jax.device_get(adapter.b[...])).astype(np.float32)
        for i in range(a_LxIxR.shape[0]):
            tensors[peft_tensor_name(i, t, "A")] = np.ascontiguousarray(a_LxIxR[i].T)
            tensors[peft_tensor_name(i, t, "B")] = np.ascontiguousarray(b_LxRxO[i].T)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "target_modules": [TARGETS[t] for t in lora.targets],
        "use_rslora": lora.use_rslora,
        "base_model_name_or_path": base,
        "bias": "none",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2)
    return path


def _lora_config(c: dict[str, Any], where: str, config: DecoderConfig) -> LoRAConfig:
    """The `LoRAConfig` of an adapter_config.json dict, refusing what we do not implement."""
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type {c.get('peft_type')!r} is not LORA")
    if c.get("task_type") not in (None, "CAUSAL_LM"):
        raise ValueError(f"{where}: task_type {c['task_type']!r} is not CAUSAL_LM")
    used = {k: c[k] for k in _UNSUPPORTED if c.get(k)}
    if c.get("bias", "none") not in (None, "none"):
        used["bias"] = c["bias"]
    if used:
        what = ", ".join(
            f"{k}={v!r} ({_UNSUPPORTED.get(k, 'trained biases')})" for k, v in used.items()
        )
        raise ValueError(f"{where}: unsupported adapter settings: {what}")
    modules = c.get("target_modules")
    if modules == "all-linear":
        modules = list(TARGETS.values())
    if isinstance(modules, str) or not modules:
        raise ValueError(
            f"{where}: target_modules must list module names (e.g. ['q_proj', 'v_proj']), got "
            f"{modules!r}"
        )
    ours = {p: t for t, p in TARGETS.items()}
    missing = sorted(set(modules) - set(ours))
    if missing:
        raise ValueError(
            f"{where}: target modules {missing} not found in the {config.architecture} decoder, "
            f"whose adaptable modules are {list(TARGETS.values())}"
        )
    r = c.get("r")
    if isinstance(r, bool) or not isinstance(r, int):
        raise ValueError(f"{where}: r must be an int, got {r!r}")
    return LoRAConfig(
        rank=r,
        alpha=c.get("lora_alpha", 8),  # PEFT's default
        targets=tuple(ours[m] for m in modules),
        use_rslora=bool(c.get("use_rslora", False)),
    )


def _check_base(c: dict[str, Any], where: str, config: DecoderConfig) -> None:
    """When the folder names a local base model, it must have our base model's architecture."""
    base = c.get("base_model_name_or_path")
    cfg_file = os.path.join(base, "config.json") if isinstance(base, str) and base else ""
    if not cfg_file or not os.path.isfile(cfg_file):
        log.info("%s: base model %r is not a local folder; not compared", where, base)
        return
    with open(cfg_file) as f:
        hf = json.load(f)
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise ValueError(
            f"{where} was made for a {kind!r} model ({base}), not a {config.architecture} decoder"
        )
    theirs = DecoderConfig.from_hf(hf)
    fields = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers")
    fields += ("num_heads", "num_kv_heads", "head_dim")
    diff = {k: (getattr(theirs, k), getattr(config, k)) for k in fields}
    diff = {k: v for k, v in diff.items() if v[0] != v[1]}
    if diff:
        raise ValueError(
            f"{where} was made for another base model ({base}): (its, ours) differ in {diff}"
        )


def is_peft_folder(path: str | os.PathLike) -> bool:
    """True for a PEFT adapter folder (``adapter_config.json`` and no model ``config.json``).

    Example:
        >>> is_peft_folder("/nonexistent")
        False
    """
    path = os.fspath(path)
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and not os.path.isfile(
        os.path.join(path, "config.json")
    )


def _read_config(path: str) -> tuple[str, dict[str, Any]]:
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise ValueError(f"no {CONFIG_FILE} in {path}: not a PEFT adapter folder")
    if not os.path.isfile(os.path.join(path, WEIGHTS_FILE)):
        raise ValueError(f"no {WEIGHTS_FILE} in {path} (only safetensors adapters are read)")
    try:
        with open(cfg_file) as f:
            return cfg_file, json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_file} is not readable JSON: {e}") from None


def peft_base_folder(path: str | os.PathLike) -> str:
    """The local base-model folder an adapter folder names (``base_model_name_or_path``).

    Args:
        path: a PEFT adapter folder.

    Returns:
        The base folder, as written (absolute for the folders `save_peft` writes).

    Raises:
        ValueError: the folder is not a PEFT adapter folder, or its base is not a local folder
            with a ``config.json`` (e.g. a hub id: load that base and use `load_peft`).

    Example:
        >>> peft_base_folder("adapter/")  # doctest: +SKIP
        '/abs/path/base'
    """
    path = os.fspath(path)
    cfg_file, c = _read_config(path)
    base = c.get("base_model_name_or_path")
    if not isinstance(base, str) or not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(
            f"{cfg_file}: base_model_name_or_path {base!r} is not a local model folder with a "
            "config.json (download the base and point the adapter at it)"
        )
    return base


def check_peft(path: str | os.PathLike, config: DecoderConfig) -> tuple[LoRAConfig, str]:
    """Checks a PEFT LoRA folder against a base architecture, reading no tensor data.

    Args:
        path: a folder with adapter_config.json and adapter_model.safetensors.
        config: the base decoder's architecture.

    Returns:
        (the adapters' `LoRAConfig`, the weights file).

    Raises:
        ValueError: no such files, not a LORA / CAUSAL_LM adapter, settings we do not
            implement, target modules the decoder lacks, a local base model of another
            architecture or size, missing or unexpected tensors, or shapes that do not fit.

    Example:
        >>> check_peft("adapter/", load_hf("base/").config)  # doctest: +SKIP
        (LoRAConfig(rank=16, ...), 'adapter/adapter_model.safetensors')
    """
    path = os.fspath(path)
    cfg_file, c = _read_config(path)
    weights_file = os.path.join(path, WEIGHTS_FILE)
    lora = _lora_config(c, cfg_file, config)
    _check_base(c, cfg_file, config)
    shapes = lora_shapes(lora, config)
    expected = {}
    for t, (shape_a, shape_b) in shapes.items():
        for i in range(config.num_layers):
            expected[peft_tensor_name(i, t, "A")] = (shape_a[2], shape_a[1])  # [r, d_in]
            expected[peft_tensor_name(i, t, "B")] = (shape_b[2], shape_b[1])  # [d_out, r]
    try:
        with safe_open(weights_file, framework="numpy") as f:
            present = set(f.keys())
            got = {n: tuple(f.get_slice(n).get_shape()) for n in expected if n in present}
    except Exception as e:  # safetensors raises its own error type for a bad header
        raise ValueError(f"{weights_file} is not a readable safetensors file: {e}") from None
    missing, extra = sorted(set(expected) - present), sorted(present - set(expected))
    if missing or extra:
        raise ValueError(
            f"{weights_file} does not match its config on this base model: missing tensors "
            f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; unexpected tensors "
            f"{extra[:8]}{' ...' if len(extra) > 8 else ''}"
        )
    wrong = {n: (got[n], want) for n, want in expected.items() if got[n] != want}
    if wrong:
        first = dict(list(wrong.items())[:4])
        raise ValueError(
            f"{weights_file}: {len(wrong)} tensors have shapes that do not fit this base "
            f"model (got, expected): {first}"
        )
    return lora, weights_file


def load_peft(base_model: Decoder, path: str | os.PathLike) -> Decoder:
    """Reads a PEFT LoRA folder onto a copy of `base_model`.

    Args:
        base_model: the decoder the adapter was trained on, without adapters (on a mesh or
            not: the adapters are placed like their base weights).
        path: a folder with adapter_config.json and adapter_model.safetensors.

    Returns:
        A `Decoder` with the folder's adapters (``model.lora`` holds r, alpha, targets).

    Raises:
        ValueError: before reading any tensor: everything `check_peft` refuses, or a base
            model that already has adapters.

    Example:
        >>> model = load_peft(load_hf("base/"), "adapter/")  # doctest: +SKIP
    """
    path = os.fspath(path)
    if getattr(base_model, "lora", None) is not None:
        _read_config(path)  # a missing folder is named first
        raise ValueError("base_model already has LoRA adapters: pass the model without them")
    config: DecoderConfig = base_model.config
    lora, weights_file = check_peft(path, config)
    with safe_open(weights_file, framework="numpy") as f:
        weights = {}
        for t in lora.targets:
            a = [f.get_tensor(peft_tensor_name(i, t, "A")).T for i in range(config.num_layers)]
            b = [f.get_tensor(peft_tensor_name(i, t, "B")).T for i in range(config.num_layers)]
            weights[t] = (np.stack(a).astype(np.float32), np.stack(b).astype(np.float32))
    log.info("loaded LoRA adapter %s (r=%d, targets %s)", path, lora.rank, lora.targets)
    return add_lora(base_model, lora, weights=weights)


__all__ = [
    "CONFIG_FILE",
    "PREFIX",
    "WEIGHTS_FILE",
    "check_peft",
    "is_peft_folder",
    "load_peft",
    "peft_base_folder",
    "peft_module",
    "peft_tensor_name",
    "save_peft",
]
