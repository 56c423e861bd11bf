"""The programs a training stage compiles, built from abstract values on a mesh of virtual devices.

`abstract_stage` sets up a stage's model, parameters and optimizer state as
`jax.ShapeDtypeStruct`s carrying the training shardings, exactly as
`ogpsa_jax.train.stage.build_stage` sets up the real ones, and `step_arguments` gives the jitted
train step (`jit_step`) with its abstract arguments: lowering and compiling them allocates no
weight. Memory planning (`ogpsa_jax.train.plan`) and the cost model (`ogpsa_jax.train.cost`)
compile these. `use_virtual_devices` provides the devices.

Example:
    >>> devices = use_virtual_devices(8)  # doctest: +SKIP
    >>> with jax.set_mesh(mesh):  # doctest: +SKIP
    ...     step, args = step_arguments("sft", config, abstract_stage("sft", config, mesh), mesh)
    ...     compiled = step.lower(*args).compile()
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ogpsa_jax import models
from ogpsa_jax.models.decoder import Decoder
from ogpsa_jax.train.inputs import load_tokenizer
from ogpsa_jax.train.optimizer import Optimizer, make_optimizer
from ogpsa_jax.train.schema import TrainConfig, lora_config
from ogpsa_jax.train.sharding import opt_shardings
from ogpsa_jax.train.stage import jit_step, make_micro_loss, model_logps, step_batch_shardings
from ogpsa_jax.train.step import LogpsFn

# Hugging Face folder names of the paper presets -> `model.arch`, for plans without the weights.
KNOWN_FOLDERS = {"Qwen2.5-7B-Instruct": "qwen2_5_7b", "Llama-3.1-8B-Instruct": "llama3_1_8b"}


class PlanError(ValueError):
    """The devices or the mesh cannot hold the config, or JAX started with too few devices."""


def use_virtual_devices(n: int) -> list[jax.Device]:
    """``n`` CPU devices to plan on; asks JAX for ``n`` virtual ones if its backend has not
    started yet (the CLI calls this first thing).

    Args:
        n: devices wanted (>= 1).

    Returns:
        The first ``n`` CPU devices.

    Raises:
        PlanError: JAX already started with fewer CPU devices in this process.
    """
    if n < 1:
        raise PlanError(f"--devices must be >= 1, got {n}")
    if n > jax.config.jax_num_cpu_devices:
        try:
            jax.config.update("jax_num_cpu_devices", n)
        except RuntimeError:
            pass  # the backend has started: check what it has below
    have = jax.devices("cpu")
    if len(have) < n:
        raise PlanError(
            f"this process started JAX with {len(have)} CPU devices, fewer than the {n} to plan "
            f"for; run `ogpsa plan` (it sets the count first), or call use_virtual_devices({n}) "
            "before any JAX operation, or set XLA_FLAGS=--xla_force_host_platform_device_count"
            f"={n} before starting Python"
        )
    return have[:n]


def decoder_config(config: TrainConfig) -> models.DecoderConfig:
    """The architecture a run trains, without loading weights (`model.arch`, a local folder's
    config.json, the offline SmolLM2, or a paper preset's folder name).

    Raises:
        PlanError: a ``model.path`` that is neither a model folder nor a known name.
    """
    m = config.model
    arch = m.arch
    if m.path:
        config_json = os.path.join(m.path, "config.json")
        if os.path.isfile(config_json):
            from transformers import AutoConfig  # function-local: transformers is heavy

            return models.DecoderConfig.from_hf(AutoConfig.from_pretrained(m.path))
        arch = (
            "smollm2_135m" if m.path == "smollm2" else KNOWN_FOLDERS.get(os.path.basename(m.path))
        )
        if arch is None:
            raise PlanError(
                f"model.path {m.path!r} is not a folder with a config.json nor a known model "
                f"({', '.join(KNOWN_FOLDERS)}); plan a random init of its architecture "
                "instead: --set model.path= --set model.arch=ARCH"
            )
    if arch == "tiny":  # as the training loop: the vocabulary is the tokenizer's
        return models.tiny_config(vocab_size=len(load_tokenizer(config, None)))
    return getattr(models, f"{arch}_config")()


def shard_bytes(x: Any) -> int:
    """Bytes of one device's shard of an array (or `jax.ShapeDtypeStruct` with a sharding)."""
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * jnp.dtype(x.dtype).itemsize


def tree_bytes(tree: Any) -> int:
    """`shard_bytes` summed over a tree's array leaves (masked leaves hold none)."""
    return sum(shard_bytes(x) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


@dataclass(frozen=True)
class AbstractStage:
    """What a stage's programs are built from, with no array allocated."""

    graphdef: Any
    rest: Any
    params: Any  # ShapeDtypeStructs with the parameters' shardings
    optimizer: Optimizer
    opt_state: Any  # ShapeDtypeStructs with the optimizer state's shardings
    logps_fn: LogpsFn


def _sds(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


def abstract_stage(
    kind: str,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    decoder: models.DecoderConfig | None = None,
) -> AbstractStage:
    """The stage's model, parameters and optimizer state as abstract values on ``mesh``, set up
    as `ogpsa_jax.train.stage.build_stage` sets them up (call under ``jax.set_mesh(mesh)``);
    ``decoder`` replaces the run's architecture (the cost model's one- and two-layer models)."""
    m, st = config.model, getattr(config, kind)
    cfg = decoder_config(config) if decoder is None else decoder

    def make() -> Decoder:
        return Decoder(
            cfg,
            dtype=jnp.dtype(m.dtype),
            param_dtype=jnp.dtype(m.param_dtype),
            rngs=nnx.Rngs(0),
            scan_unroll=m.scan_unroll,
            attention_chunk=m.attention_chunk,
            remat=m.remat,
            loss_chunk=m.loss_chunk,
        )

    lora = lora_config(m.lora)
    if lora is not None:  # only the adapters train; the frozen base is an argument of each program
        base = make
        make = lambda: models.add_lora(base(), lora, seed=0)  # noqa: E731
    trainable = models.LoRAParam if lora is not None else nnx.Param
    graphdef, params, rest = nnx.split(nnx.eval_shape(make), trainable, ...)
    params = _sds(params, models.param_shardings(params, mesh))
    if lora is not None:
        rest = _sds(rest, models.param_shardings(rest, mesh))
    optimizer = make_optimizer(st, max(st.max_steps, 1))
    abstract_opt = jax.eval_shape(optimizer.init, params)
    opt_state = _sds(abstract_opt, opt_shardings(abstract_opt, params, mesh))
    return AbstractStage(
        graphdef=graphdef,
        rest=rest,
        params=params,
        optimizer=optimizer,
        opt_state=opt_state,
        logps_fn=model_logps(graphdef, rest, m.frozen_layers),
    )


def tokens(shape: tuple[int, ...], sharding: Any) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract ``input_ids``, ``attention_mask`` and ``loss_mask`` (int32) of one shape."""
    names = ("input_ids", "attention_mask", "loss_mask")
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding) for k in names}


def step_arguments(kind: str, config: TrainConfig, a: AbstractStage, mesh: Any) -> tuple:
    """The jitted step and its abstract arguments ``(params, opt_state, batch, ref_params)``."""
    st = getattr(config, kind)
    table = kind == "dpo" and st.dpo_reference == "precompute"
    with_ref = kind == "dpo" and st.dpo_reference == "model"
    batch_sh = step_batch_shardings(kind, st, mesh, ref_table=table)
    rows = st.batch_size * (2 if kind == "dpo" else 1)
    shape = (st.accum_steps, rows, st.max_length)
    batch = tokens(shape, batch_sh["input_ids"])
    if table:
        batch["ref_logps"] = jax.ShapeDtypeStruct(
            shape[:2], jnp.float32, sharding=batch_sh["ref_logps"]
        )
    param_sh = jax.tree.map(lambda x: x.sharding, a.params)
    opt_sh = jax.tree.map(lambda x: x.sharding, a.opt_state)
    step = jit_step(
        lambda fn: make_micro_loss(kind, st, fn),
        a.logps_fn,
        a.optimizer,
        mesh,
        batch_sh,
        param_sh,
        opt_sh,
        with_ref,
    )
    return step, (a.params, a.opt_state, batch, a.params if with_ref else None)


__all__ = [
    "KNOWN_FOLDERS",
    "AbstractStage",
    "PlanError",
    "abstract_stage",
    "decoder_config",
    "shard_bytes",
    "step_arguments",
    "tokens",
    "tree_bytes",
    "use_virtual_devices",
]
