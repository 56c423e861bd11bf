"""What a stage builds once before its first step, and what changes from step to step.

`build_stage` makes the stage's data iterator, its sharded model, the optimiser (the public
alias, `ogpsa_jax.train.optimizer`) and its state, the DPO reference (a frozen copy or a table
of log-probs), the jitted train step with explicit shardings and donation, and the basis
refresh, into one `Stage`; the weights, optimiser state, RNG and counters go into a `Carry`,
which the loop updates step by step and checkpoints whole.

Example:
    >>> stage, carry = build_stage("sft", config, inputs, mesh, "runs/r", None)  # doctest: +SKIP
    >>> params, opt_state, metrics = stage.step_fn(  # doctest: +SKIP
    ...     carry.params, carry.opt_state, batch, stage.ref_params)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax import models
from ogpsa_jax._tree import leaf_paths
from ogpsa_jax.data import Batches, bucket_lengths
from ogpsa_jax.train import hooks as train_hooks
from ogpsa_jax.train.budget import stage_budget
from ogpsa_jax.train.dpo_reference import reference_logps_table
from ogpsa_jax.train.inputs import Inputs
from ogpsa_jax.train.optimizer import Optimizer, make_optimizer, make_schedule
from ogpsa_jax.train.refresh import Refresh, make_refresh
from ogpsa_jax.train.schema import StageConfig, TrainConfig
from ogpsa_jax.train.sharding import batch_shardings, opt_shardings
from ogpsa_jax.train.step import dpo_micro_loss, make_train_step, sft_micro_loss

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """What a stage builds once, before its first step."""

    kind: str  # "sft" or "dpo"
    config: TrainConfig
    stage_dir: str
    total: int  # optimiser steps of the stage
    batches: Batches  # the data iterator (its position is checkpointed)
    graphdef: Any  # the decoder's graph; `rest` its non-parameter state
    rest: Any
    schedule: optax.Schedule
    step_fn: Callable  # jitted (params, opt_state, batch, ref_params) -> (..., metrics)
    batch_shardings: dict[str, NamedSharding]
    ref_params: Any  # frozen DPO reference weights (dpo_reference="model"), else None
    ref_table: dict[bytes, float] | None  # precomputed DPO reference log-probs, else None
    refresh: Refresh | None  # the basis refresh (None: OGPSA off)
    paths: list[str]  # parameter leaf paths, to name a non-finite leaf
    hooks: train_hooks.Hooks

    @property
    def st(self) -> StageConfig:
        """The stage's own config (``config.sft`` or ``config.dpo``)."""
        return getattr(self.config, self.kind)


@dataclass(kw_only=True)
class Carry:
    """What changes from step to step; all of it is in every checkpoint."""

    params: Any
    opt_state: Any
    rng: Any  # uint32 key data
    step: int = 0  # optimiser steps done
    skips: int = 0  # non-finite steps skipped so far
    consecutive: int = 0  # ... in a row


def _make_batches(kind: str, config: TrainConfig, inputs: Inputs) -> tuple[Batches, int]:
    """The stage's data iterator and its number of optimiser steps (`stage_budget`)."""
    st: StageConfig = getattr(config, kind)
    total = stage_budget(kind, st, len(inputs.encoded[kind])).total
    batches = Batches(
        inputs.encoded[kind],
        batch_size=st.batch_size,
        pad_id=inputs.pad_id,
        buckets=bucket_lengths(st.max_length),
        seed=config.seed,
    )
    return batches, total


def _make_model(config: TrainConfig, inputs: Inputs, mesh: Any, init_path: str | None) -> Any:
    """The sharded decoder: loaded from ``init_path`` or freshly initialised."""
    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    if init_path is not None:
        model = models.load_hf(init_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    else:
        tok, arch = inputs.tokenizer, config.model.arch
        if arch == "tiny":
            cfg = models.tiny_config(vocab_size=len(tok))
        else:
            cfg = getattr(models, f"{arch}_config")()
        ids = dict(pad_token_id=inputs.pad_id)
        if tok.eos_token_id is not None:
            ids["eos_token_id"] = tok.eos_token_id
        if tok.bos_token_id is not None:
            ids["bos_token_id"] = tok.bos_token_id
        cfg = dataclasses.replace(cfg, **ids)
        model = models.init_random(
            cfg, seed=config.seed, dtype=dtype, param_dtype=param_dtype, mesh=mesh
        )
    # How the forward runs (not what it computes): plain attributes of the decoder.
    model.scan_unroll = config.model.scan_unroll
    model.attention_chunk = config.model.attention_chunk
    return model


def _init_opt_state(optimizer: Optimizer, params: Any, mesh: Any) -> tuple[Any, Any]:
    """(the optimiser state, sharded like the parameters it mirrors; its shardings)."""
    opt_sh = opt_shardings(jax.eval_shape(optimizer.init, params), params, mesh)
    return jax.jit(optimizer.init, out_shardings=opt_sh)(params), opt_sh


def _loss_and_reference(
    kind: str, st: StageConfig, apply_fn: Any, params: Any, inputs: Inputs, mesh: Any
) -> tuple[Any, Any, dict[bytes, float] | None]:
    """The micro-batch loss and, for DPO, its reference: frozen weights or a log-prob table."""
    if kind == "sft":
        return sft_micro_loss(apply_fn), None, None
    micro_loss = dpo_micro_loss(apply_fn, st)
    if st.dpo_reference == "model":
        return micro_loss, jax.tree.map(jnp.copy, params), None
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    logger.info(
        "dpo: reference log-probs of the starting model on %d pairs (one pass before step 1)",
        len(inputs.encoded[kind]),
    )
    table = reference_logps_table(
        apply_fn,
        params,
        inputs.encoded[kind],
        st,
        inputs.pad_id,
        mesh=mesh,
        param_shardings=param_sh,
    )
    return micro_loss, None, table


def _jit_step(
    micro_loss: Any,
    optimizer: Optimizer,
    mesh: Any,
    batch_sh: dict[str, NamedSharding],
    param_sh: Any,
    opt_sh: Any,
    with_ref_params: bool,
) -> Callable:
    """The train step jitted with explicit shardings, (params, opt_state) donated."""
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        make_train_step(micro_loss, optimizer),
        in_shardings=(param_sh, opt_sh, batch_sh, param_sh if with_ref_params else None),
        out_shardings=(param_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )


def build_stage(
    kind: str,
    config: TrainConfig,
    inputs: Inputs,
    mesh: Any,
    stage_dir: str,
    init_path: str | None,
) -> tuple[Stage, Carry]:
    """Data, model, optimiser, DPO reference, jitted step and refresh of one stage.

    Args:
        kind: "sft" or "dpo".
        config: the validated run config.
        inputs: from `ogpsa_jax.train.inputs.load_inputs`.
        mesh: the training mesh.
        stage_dir: the stage's folder.
        init_path: the HF folder to start from (None: a random init of ``model.arch``).

    Returns:
        The `Stage`, and the `Carry` at step 0 (the loop restores a checkpoint into it).

    Raises:
        ValueError: the data make no full optimiser step.
    """
    st: StageConfig = getattr(config, kind)
    hooks = train_hooks.active()
    batches, total = _make_batches(kind, config, inputs)
    model = _make_model(config, inputs, mesh, init_path)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    frozen = config.model.frozen_layers

    def apply_fn(p: Any, ids: jax.Array, attn: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p, rest)(ids, attn, frozen_layers=frozen)

    param_sh = jax.tree.map(lambda x: x.sharding, params)
    optimizer = make_optimizer(st, total)
    opt_state, opt_sh = _init_opt_state(optimizer, params, mesh)
    micro_loss, ref_params, table = _loss_and_reference(kind, st, apply_fn, params, inputs, mesh)
    # [A, rows, L] token arrays, [A, rows] reference log-probs, [A] extra inputs of the hooks
    ranks = {"input_ids": 3, "attention_mask": 3, "loss_mask": 3}
    ranks.update({"ref_logps": 2} if table is not None else {})
    ranks.update({name: 1 for name in hooks.extra_inputs(0)})
    rows = st.batch_size * (2 if kind == "dpo" else 1)
    batch_shs = batch_shardings(mesh, rows, ranks)
    step_fn = _jit_step(
        hooks.wrap_loss(micro_loss),
        optimizer,
        mesh,
        batch_shs,
        param_sh,
        opt_sh,
        with_ref_params=ref_params is not None,
    )
    refresh = make_refresh(
        st.ogpsa,
        apply_fn=apply_fn,
        graphdef=graphdef,
        rest=rest,
        groups=inputs.ref_groups.get(kind, []),
        param_shardings=param_sh,
        mesh=mesh,
        seed=config.seed,
    )
    stage = Stage(
        kind=kind,
        config=config,
        stage_dir=stage_dir,
        total=total,
        batches=batches,
        graphdef=graphdef,
        rest=rest,
        schedule=make_schedule(st, total),
        step_fn=step_fn,
        batch_shardings=batch_shs,
        ref_params=ref_params,
        ref_table=table,
        refresh=refresh,
        paths=leaf_paths(params),
        hooks=hooks,
    )
    rng = jax.random.key_data(jax.random.key(config.seed))
    return stage, Carry(params=params, opt_state=opt_state, rng=rng)
