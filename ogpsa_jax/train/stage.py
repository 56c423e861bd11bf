"""What a stage builds once before its first step, and what changes from step to step.

`build_stage` makes the stage's data iterator, its sharded model, the optimiser (the public
alias, `ogpsa_jax.train.optimizer`) and its state, the DPO reference (a frozen copy or a table
of log-probs), the jitted train step with explicit shardings and donation, and the basis
refresh, into one `Stage`; the trainable weights, optimiser state, RNG and counters go into a
`Carry`, which the loop updates step by step and checkpoints whole.

The trainable weights are every `nnx.Param`, or, with LoRA adapters (``model.lora.rank >= 1``),
the adapters' `LoRAParam` alone (`ogpsa_jax.train.lora`): the frozen rest of the model is then
bound to the model function (a ``jax.tree_util.Partial``) that every jitted program takes as an
argument, so it is neither differentiated, nor in the optimiser state, nor embedded in a program.

Example:
    >>> stage, carry = build_stage("sft", config, inputs, mesh, "runs/r", None)  # doctest: +SKIP
    >>> params, opt_state, metrics = stage.step_fn(  # doctest: +SKIP
    ...     carry.params, carry.opt_state, batch, stage.ref_params)
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Sequence
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
from ogpsa_jax.train.lora import base_folder, load_start
from ogpsa_jax.train.lora_refresh import make_lora_refresh
from ogpsa_jax.train.optimizer import Optimizer, make_optimizer, make_schedule
from ogpsa_jax.train.refresh import make_refresh
from ogpsa_jax.train.schema import MATRIX_METHODS, StageConfig, TrainConfig, lora_config
from ogpsa_jax.train.sharding import (
    BoundProgram,
    batch_shardings,
    jit_bound,
    opt_shardings,
    shardings_of,
)
from ogpsa_jax.train.step import (
    LogpsFn,
    MicroLoss,
    dpo_micro_loss,
    make_train_step,
    sft_micro_loss,
)

# refresh(params, opt_state) -> (params, opt_state, metrics): a LoRA refresh may change params
StageRefresh = Callable[[Any, Any], tuple[Any, Any, dict]]
logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Stage:
    """What a stage builds once, before its first step."""

    kind: str  # "sft" or "dpo"
    config: TrainConfig
    stage_dir: str
    total: int  # optimiser steps of the stage
    batches: Batches  # the data iterator (its position is checkpointed)
    graphdef: Any  # the decoder's graph; `rest` its state besides the trainable weights
    rest: Any
    schedule: optax.Schedule
    step_fn: Callable  # jitted (params, opt_state, batch, ref_params) -> (..., metrics)
    batch_shardings: dict[str, NamedSharding]
    ref_params: Any  # frozen DPO reference weights (dpo_reference="model"), else None
    ref_table: dict[bytes, float] | None  # precomputed DPO reference log-probs, else None
    refresh: StageRefresh | None  # the basis refresh (None: OGPSA off)
    paths: list[str]  # parameter leaf paths, to name a non-finite leaf
    hooks: train_hooks.Hooks
    lora: models.LoRAConfig | None  # the adapters trained (None: every weight trains)
    base_dir: str | None  # LoRA: the HF folder of the base (None: the export writes base/)

    @property
    def st(self) -> StageConfig:
        """The stage's own config (``config.sft`` or ``config.dpo``)."""
        return getattr(self.config, self.kind)


@dataclass(kw_only=True)
class Carry:
    """What changes from step to step; all of it is in every checkpoint."""

    params: Any  # the trainable weights (all parameters, or the LoRA adapters)
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
    """The sharded decoder: loaded from ``init_path`` or freshly initialised, with fresh LoRA
    adapters (B = 0: the same function) when ``model.lora.rank >= 1``."""
    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    if init_path is not None:
        model = load_start(init_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
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
    lora = lora_config(config.model.lora)
    if lora is not None:
        model = models.add_lora(model, lora, seed=config.seed)
    # How the forward runs (not what it computes): plain attributes of the decoder.
    model.scan_unroll = config.model.scan_unroll
    model.attention_chunk = config.model.attention_chunk
    model.remat = config.model.remat
    model.loss_chunk = config.model.loss_chunk
    return model


def _apply(graphdef: Any, frozen_layers: int, rest: Any, p: Any, ids: Any, attn: Any) -> Any:
    return nnx.merge(graphdef, p, rest)(ids, attn, frozen_layers=frozen_layers)


def model_function(graphdef: Any, rest: Any, frozen_layers: int = 0) -> jax.tree_util.Partial:
    """The decoder as ``apply_fn(params, input_ids, attention_mask) -> logits`` of its
    trainable state, with the rest of its state (with LoRA: the frozen base weights) bound as a
    ``jax.tree_util.Partial``: passed to a jitted function as an argument, the rest is an input
    of the program, never a constant embedded in it.

    Args:
        graphdef: from ``nnx.split(model, trainable_filter, ...)``.
        rest: the state that split leaves over.
        frozen_layers: the bottom layers run without gradients.

    Returns:
        The model function (a pytree whose leaves are ``rest``'s arrays).

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> graphdef, params, rest = nnx.split(init_random(tiny_config()), nnx.Param, ...)
        >>> apply_fn = model_function(graphdef, rest)
        >>> forward = jax.jit(lambda f, p, ids: f(p, ids, None))
        >>> forward(apply_fn, params, jnp.ones((1, 3), int)).shape
        (1, 3, 97)
    """
    return jax.tree_util.Partial(functools.partial(_apply, graphdef, frozen_layers), rest)


def _init_opt_state(optimizer: Optimizer, params: Any, mesh: Any) -> tuple[Any, Any]:
    """(the optimiser state, sharded like the parameters it mirrors; its shardings)."""
    opt_sh = opt_shardings(jax.eval_shape(optimizer.init, params), params, mesh)
    return jax.jit(optimizer.init, out_shardings=opt_sh)(params), opt_sh


def _logps(
    graphdef: Any, frozen_layers: int, rest: Any, p: Any, ids: Any, attn: Any, lm: Any
) -> Any:
    model = nnx.merge(graphdef, p, rest)
    return model.sequence_logprobs(ids, attn, lm, frozen_layers=frozen_layers)


def model_logps(graphdef: Any, rest: Any, frozen_layers: int = 0) -> jax.tree_util.Partial:
    """The stage's `LogpsFn`: the decoder's `sequence_logprobs` (lm_head in chunks of
    ``model.loss_chunk`` positions) with the bottom ``frozen_layers`` layers frozen, and the
    rest of the decoder's state (with LoRA: the frozen base weights) bound as a
    ``jax.tree_util.Partial``, so that every jitted program takes it as an argument.

    Args:
        graphdef: the decoder's graphdef (``nnx.split(model, trainable_filter, ...)``).
        rest: the state that split leaves over.
        frozen_layers: ``model.frozen_layers``.

    Returns:
        ``(params, input_ids, attention_mask, loss_mask) -> (sum_B, count_B)``.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> graphdef, params, rest = nnx.split(init_random(tiny_config()), nnx.Param, ...)
        >>> logps = model_logps(graphdef, rest)
        >>> ids = jnp.ones((2, 5), int)
        >>> s, n = jax.jit(lambda f, p: f(p, ids, None, jnp.ones_like(ids)))(logps, params)
        >>> s.shape, n.tolist()
        ((2,), [4.0, 4.0])
    """
    return jax.tree_util.Partial(functools.partial(_logps, graphdef, frozen_layers), rest)


def make_micro_loss(kind: str, st: StageConfig, logps_fn: LogpsFn) -> MicroLoss:
    """The stage's micro-batch loss: SFT's token NLL or DPO's pair loss."""
    return sft_micro_loss(logps_fn) if kind == "sft" else dpo_micro_loss(logps_fn, st)


def step_batch_shardings(
    kind: str, st: StageConfig, mesh: Any, *, ref_table: bool, extra: Sequence[str] = ()
) -> dict[str, NamedSharding]:
    """The shardings of a step's batch: [A, rows, L] token arrays, [A, rows] precomputed DPO
    reference log-probs (``ref_table``), [A] extra inputs (the test hooks')."""
    ranks = {"input_ids": 3, "attention_mask": 3, "loss_mask": 3}
    ranks.update({"ref_logps": 2} if ref_table else {})
    ranks.update({name: 1 for name in extra})
    rows = st.batch_size * (2 if kind == "dpo" else 1)
    return batch_shardings(mesh, rows, ranks)


def _reference(
    kind: str, st: StageConfig, logps_fn: LogpsFn, params: Any, inputs: Inputs, mesh: Any
) -> tuple[Any, dict[bytes, float] | None]:
    """The DPO reference, the stage's starting point: a copy of the trainable weights (with
    LoRA, of the adapters alone: the frozen base is shared) or a log-prob table."""
    if kind == "sft":
        return None, None
    if st.dpo_reference == "model":
        return jax.tree.map(jnp.copy, params), None
    logger.info(
        "dpo: reference log-probs of the starting model on %d pairs (one pass before step 1)",
        len(inputs.encoded[kind]),
    )
    table = reference_logps_table(
        logps_fn,
        params,
        inputs.encoded[kind],
        st,
        inputs.pad_id,
        mesh=mesh,
        param_shardings=shardings_of(params),
    )
    return None, table


def jit_step(
    micro_loss_of: Callable[[LogpsFn], MicroLoss],
    logps_fn: LogpsFn,
    optimizer: Optimizer,
    mesh: Any,
    batch_sh: dict[str, NamedSharding],
    param_sh: Any,
    opt_sh: Any,
    with_ref_params: bool,
) -> BoundProgram:
    """The train step jitted with explicit shardings, (params, opt_state) donated, the model
    function (and the frozen weights it binds) an argument bound here: the result is called
    (and lowered, by memory planning: `ogpsa_jax.train.plan`) as
    ``step(params, opt_state, batch, ref_params)``."""
    replicated = NamedSharding(mesh, P())

    def step(fn: Any, params: Any, opt_state: Any, batch: dict, ref_params: Any) -> Any:
        return make_train_step(micro_loss_of(fn), optimizer)(params, opt_state, batch, ref_params)

    return jit_bound(
        step,
        logps_fn,
        in_shardings=(param_sh, opt_sh, batch_sh, param_sh if with_ref_params else None),
        out_shardings=(param_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )


def _make_stage_refresh(
    st: StageConfig,
    lora: Any,
    logps_fn: LogpsFn,
    graphdef: Any,
    rest: Any,
    groups: list,
    params: Any,
    mesh: Any,
    seed: int,
) -> StageRefresh | None:
    """The basis refresh of the stage (the LoRA one for adapters with a matrix method)."""

    def inner(mask: Any = None) -> Any:
        return make_refresh(
            st.ogpsa,
            logps_fn=logps_fn,
            graphdef=graphdef,
            rest=rest,
            groups=groups,
            param_shardings=shardings_of(params),
            mesh=mesh,
            seed=seed,
            mask=mask,
        )

    if not st.ogpsa.enabled:
        return None
    if lora is not None and st.ogpsa.method in MATRIX_METHODS:
        return make_lora_refresh(st.ogpsa, inner, params, mesh)
    refresh = inner()
    return lambda p, opt_state: (p, *refresh(p, opt_state))


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
    lora = model.lora
    graphdef, params, rest = nnx.split(model, models.LoRAParam if lora else nnx.Param, ...)
    del model
    logps_fn = model_logps(graphdef, rest, config.model.frozen_layers)
    param_sh = shardings_of(params)
    optimizer = make_optimizer(st, total)
    opt_state, opt_sh = _init_opt_state(optimizer, params, mesh)
    ref_params, table = _reference(kind, st, logps_fn, params, inputs, mesh)
    batch_shs = step_batch_shardings(
        kind, st, mesh, ref_table=table is not None, extra=list(hooks.extra_inputs(0))
    )
    step_fn = jit_step(
        lambda fn: hooks.wrap_loss(make_micro_loss(kind, st, fn)),
        logps_fn,
        optimizer,
        mesh,
        batch_shs,
        param_sh,
        opt_sh,
        with_ref_params=ref_params is not None,
    )
    groups = inputs.ref_groups.get(kind, [])
    refresh = _make_stage_refresh(
        st, lora, logps_fn, graphdef, rest, groups, params, mesh, config.seed
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
        lora=lora,
        base_dir=base_folder(init_path) if lora else None,
    )
    rng = jax.random.key_data(jax.random.key(config.seed))
    return stage, Carry(params=params, opt_state=opt_state, rng=rng)
