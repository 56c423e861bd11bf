"""Hugging Face checkpoint I/O: config.json + safetensors (single file or sharded) <-> Decoder.

Tensors are read one at a time and placed directly with their sharding, so loading never holds
more than one (stacked) parameter on the host besides the memory-mapped files.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from ogpsa_jax._tree import path_str
from ogpsa_jax.models.config import ARCHITECTURES, DecoderConfig
from ogpsa_jax.models.decoder import Decoder, layer_param_shapes
from ogpsa_jax.models.sharding import param_shardings

log = logging.getLogger(__name__)

# our stacked layer name -> (HF per-layer module path, is a Linear weight stored (out, in))
HF_LAYER_NAMES: dict[str, tuple[str, bool]] = {
    "attn_norm": ("input_layernorm.weight", False),
    "q_proj": ("self_attn.q_proj.weight", True),
    "k_proj": ("self_attn.k_proj.weight", True),
    "v_proj": ("self_attn.v_proj.weight", True),
    "q_bias": ("self_attn.q_proj.bias", False),
    "k_bias": ("self_attn.k_proj.bias", False),
    "v_bias": ("self_attn.v_proj.bias", False),
    "o_proj": ("self_attn.o_proj.weight", True),
    "mlp_norm": ("post_attention_layernorm.weight", False),
    "gate_proj": ("mlp.gate_proj.weight", True),
    "up_proj": ("mlp.up_proj.weight", True),
    "down_proj": ("mlp.down_proj.weight", True),
}
# tensors HF checkpoints may carry that hold no parameters of ours
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def hf_tensor_names(config: DecoderConfig) -> list[str]:
    """The HF tensor names a checkpoint of this config holds (in our save order)."""
    names = ["model.embed_tokens.weight"]
    for i in range(config.num_layers):
        names += [f"model.layers.{i}.{HF_LAYER_NAMES[k][0]}" for k in layer_param_shapes(config)]
    names.append("model.norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


@contextlib.contextmanager
def _open_checkpoint(path: str) -> Iterator[tuple[set[str], Callable[[str], np.ndarray]]]:
    """Yields (names, get) for the safetensors files of a checkpoint folder."""
    index_file = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
    elif os.path.exists(single):
        with safe_open(single, framework="numpy") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
    else:
        raise ValueError(f"{path} has neither model.safetensors nor model.safetensors.index.json")
    with contextlib.ExitStack() as stack:
        handles = {
            fname: stack.enter_context(safe_open(os.path.join(path, fname), framework="numpy"))
            for fname in sorted(set(weight_map.values()))
        }
        yield set(weight_map), lambda name: handles[weight_map[name]].get_tensor(name)


def load_hf(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
) -> Decoder:
    """Loads a Llama / Qwen2 HF checkpoint folder into a `Decoder`.

    Args:
        path: local folder with config.json and model.safetensors (or a sharded index).
        dtype: compute dtype of the model.
        param_dtype: dtype the parameters are stored in.
        mesh: when given, each parameter is placed directly with its sharding on this mesh.

    Returns:
        The loaded `Decoder`.

    Raises:
        ValueError: unknown model_type, missing or unexpected tensors, or wrong shapes.

    Example:
        >>> model = load_hf("ckpt/", dtype=jnp.float32)  # doctest: +SKIP
        >>> # round trip: see `save_hf`
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    if not os.path.exists(cfg_file):
        raise ValueError(f"no config.json in {path}")
    with open(cfg_file) as f:
        model_type = json.load(f).get("model_type")
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown model_type {model_type!r} in {cfg_file}; supported: {sorted(ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    config = DecoderConfig.from_hf(AutoConfig.from_pretrained(path, local_files_only=True))
    expected = hf_tensor_names(config)
    with _open_checkpoint(path) as (present, get):
        ignorable = {n for n in present if n.endswith(_IGNORED_SUFFIXES)}
        if config.tie_word_embeddings:
            ignorable |= {"lm_head.weight"} & present  # a tied copy some checkpoints carry
        missing = sorted(set(expected) - present)
        extra = sorted(present - set(expected) - ignorable)
        if missing or extra:
            raise ValueError(
                f"checkpoint {path} does not match its config: missing tensors {missing[:8]}"
                f"{' ...' if len(missing) > 8 else ''}; unexpected tensors {extra[:8]}"
                f"{' ...' if len(extra) > 8 else ''}"
            )

        make = lambda: Decoder(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
        with jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            graphdef, abstract = nnx.split(nnx.eval_shape(make))
        shardings = param_shardings(abstract, mesh) if mesh is not None else None
        is_var = lambda x: isinstance(x, nnx.Variable)

        def read(key: str) -> np.ndarray:
            if key == "embed_tokens":
                return get("model.embed_tokens.weight")
            if key == "final_norm":
                return get("model.norm.weight")
            if key == "lm_head":
                return get("lm_head.weight").T
            name, transpose = HF_LAYER_NAMES[key.removeprefix("layers/")]
            per_layer = [get(f"model.layers.{i}.{name}") for i in range(config.num_layers)]
            return np.stack([t.T if transpose else t for t in per_layer])

        def fill(kp: tuple[Any, ...], var: nnx.Variable, sharding: Any = None) -> nnx.Variable:
            key = path_str(kp)
            arr = read(key)
            if arr.shape != tuple(var.shape):
                raise ValueError(f"tensor for {key} has shape {arr.shape}, expected {var.shape}")
            arr = np.ascontiguousarray(arr.astype(jnp.dtype(param_dtype)))
            target = sharding.get_value() if sharding is not None else None
            return var.replace(jax.device_put(arr, target))

        if shardings is None:
            state = jax.tree_util.tree_map_with_path(fill, abstract, is_leaf=is_var)
        else:
            state = jax.tree_util.tree_map_with_path(fill, abstract, shardings, is_leaf=is_var)
    log.info("loaded %s (%s, %d params)", path, config.architecture, config.num_params)
    return nnx.merge(graphdef, state)


def save_hf(
    model: Decoder,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = 2 * 1024**3,
) -> str:
    """Writes config.json and safetensors in HF layout (loads unchanged in transformers).

    Args:
        model: the decoder.
        path: output folder (created).
        dtype: stored dtype (default: the parameters' dtype, float32 unless changed).
        max_shard_bytes: above this total size the weights are split into shards + an index.

    Returns:
        The folder path.

    Raises:
        ValueError: the model has LoRA adapters (merge them first), or a bad `dtype`.

    Example:
        >>> import tempfile
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     again = load_hf(save_hf(model, out), dtype=jnp.float32)
        >>> same = jax.tree.map(jnp.array_equal, again.params(), model.params())
        >>> all(jax.tree.leaves(same))
        True
    """
    if getattr(model, "lora", None) is not None:
        raise ValueError(
            "the model has LoRA adapters: save_hf(merge_lora(model), ...) writes the merged "
            "model, save_peft(model, ...) the adapters alone"
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    config: DecoderConfig = model.config
    params = model.params()
    out_dtype = np.dtype(jnp.dtype(dtype if dtype is not None else params["final_norm"].dtype))
    if out_dtype.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"save dtype must be float32, bfloat16 or float16, got {out_dtype}")

    host = lambda a: np.ascontiguousarray(np.asarray(jax.device_get(a)).astype(out_dtype))
    layers = params["layers"]

    def tensor(name: str) -> np.ndarray:  # one HF tensor, fetched from device on demand
        if name == "model.embed_tokens.weight":
            return host(params["embed_tokens"])
        if name == "model.norm.weight":
            return host(params["final_norm"])
        if name == "lm_head.weight":
            return host(params["lm_head"]).T.copy()
        i, rest = name.removeprefix("model.layers.").split(".", 1)
        key = next(k for k, (n, _) in HF_LAYER_NAMES.items() if n == rest)
        arr = host(layers[key][int(i)])
        return arr.T.copy() if HF_LAYER_NAMES[key][1] else arr

    # plan the shards from the shapes, then write one shard at a time
    abstract = jax.eval_shape(lambda: params)
    shapes = {
        "model.embed_tokens.weight": abstract["embed_tokens"].shape,
        "model.norm.weight": abstract["final_norm"].shape,
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = abstract["lm_head"].shape[::-1]
    for key, (n, transpose) in HF_LAYER_NAMES.items():
        if key in layers:
            shape = abstract["layers"][key].shape[1:]
            for i in range(config.num_layers):
                shapes[f"model.layers.{i}.{n}"] = shape[::-1] if transpose else shape
    plan: list[list[str]] = [[]]
    size = total = 0
    for name in hf_tensor_names(config):
        nbytes = int(np.prod(shapes[name])) * out_dtype.itemsize
        if plan[-1] and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(name)
        size += nbytes
        total += nbytes
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(dtype=out_dtype.name), f, indent=2)
    if len(plan) == 1:
        tensors = {name: tensor(name) for name in plan[0]}
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return path
    weight_map = {}
    for i, names in enumerate(plan):
        fname = f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        tensors = {name: tensor(name) for name in names}
        save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return path
