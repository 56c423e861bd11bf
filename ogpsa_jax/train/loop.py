"""The training driver: `train` and the stage loop, a thin stateful shell over the pure step.

``train(command, config, output_dir)`` validates the config and loads tokenizer, data and the
model folder before it writes anything (`ogpsa_jax.train.inputs`), prepares the run folder
(`ogpsa_jax.train.run_dir`), then runs each stage: build it (data, sharded model, optimiser,
jitted step, basis refresh), restore its latest checkpoint, and step -- refresh the basis when
due, run one step, log, checkpoint -- until done, then export ``final/``
(`ogpsa_jax.train.export`). Each of those is a small function below; what changes from step to
step is one `Carry`, all of it checkpointed.

Layout: stages "sft" and "dpo" write ``DIR/{config.json, metrics.jsonl, tb/, checkpoints/,
final/, done.json}``; "sft-dpo" writes the SFT stage under ``DIR/sft/`` and the DPO stage
(started from, and referenced to, ``DIR/sft/final``) in ``DIR`` itself. With LoRA adapters
``final/`` is a PEFT adapter folder, ``final-merged/`` the full model, ``base/`` the base when it
is not a folder already (`ogpsa_jax.train.lora`), and the DPO stage of "sft-dpo" trains new
adapters on ``DIR/sft/final-merged``.

Example:
    >>> from ogpsa_jax.train import preset
    >>> result = train("sft", preset("tiny"), "runs/tiny")  # doctest: +SKIP
    >>> result.final_dir  # doctest: +SKIP
    'runs/tiny/final'
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ogpsa_jax import logs, models
from ogpsa_jax.overrides import to_dict
from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.budget import StageBudget, schedule_change, stage_budget
from ogpsa_jax.train.dpo_reference import attach_ref_logps
from ogpsa_jax.train.export import export_final, export_step
from ogpsa_jax.train.inputs import Inputs, load_inputs
from ogpsa_jax.train.metrics import MetricsLog
from ogpsa_jax.train.progress import Progress
from ogpsa_jax.train.run_dir import (
    check_output_dir,
    done_record,
    prepare_output_dir,
    record_schedule_change,
    stage_dirs,
)
from ogpsa_jax.train.schema import TrainConfig, lora_config, stages_of
from ogpsa_jax.train.sharding import place
from ogpsa_jax.train.signals import StopRequest, catch_stop_signals
from ogpsa_jax.train.stage import Carry, Stage, build_stage
from ogpsa_jax.train.validation import validate

logger = logging.getLogger(__name__)


class NonFiniteError(ValueError):
    """A non-finite loss / gradient / basis under ``on_nonfinite="stop"`` or too many skips."""


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a `train` call did."""

    output_dir: str  # the run folder
    step: int  # optimiser steps completed in the last stage that ran
    preempted: bool  # True: stopped by SIGTERM or Ctrl-C after a checkpoint (rerun to resume)
    final_dir: str | None  # the export of the last stage: an HF folder, with LoRA a PEFT adapter
    # folder (None if preempted)
    stopped_by: str | None = None  # "SIGTERM" or "SIGINT" when preempted
    model_dir: str | None = None  # the trained model as a full HF folder: final_dir, or with
    # LoRA final-merged/ (None if preempted)


# ----------------------------------------------------------------------------- one step


def _restore(stage: Stage, carry: Carry, manager: Any) -> dict | None:
    """Loads the latest complete checkpoint into ``carry`` and the data iterator; returns its
    meta (None: no checkpoint)."""
    latest = manager.latest_step()
    if latest is None:
        return None
    carry.params, carry.opt_state, meta = ckpt.restore(
        manager, latest, ckpt.abstract_like(carry.params), ckpt.abstract_like(carry.opt_state)
    )
    stage.batches.restore(meta["data"])
    carry.step, carry.skips = meta["step"], meta["skips"]
    carry.consecutive = meta["consecutive_skips"]
    carry.rng = np.asarray(meta["rng"], np.uint32)
    logger.info("%s: resumed from checkpoint step %d", stage.kind, carry.step)
    return meta


def _refresh_basis(stage: Stage, carry: Carry) -> dict[str, Any]:
    """Recomputes the basis when due; a non-finite one is kept out (or stops the run)."""
    if stage.refresh is None or carry.step % stage.st.ogpsa.refresh_every:
        return {}
    step = carry.step + 1  # the step the new basis is for
    stage.hooks.fault("refresh", step)
    carry.params, carry.opt_state, metrics = stage.refresh(carry.params, carry.opt_state)
    record: dict[str, Any] = {}
    bad = metrics.pop("nonfinite_at")
    if not metrics.pop("basis_finite"):
        where = f"capability basis refresh at {bad}"
        if stage.config.on_nonfinite == "stop":
            raise NonFiniteError(f"{stage.kind} step {step}: non-finite {where}")
        logger.warning("%s step %d: non-finite %s; old basis kept", stage.kind, step, where)
        record["refresh_skipped"] = 1
    record.update(metrics)
    return record


def _next_batch(stage: Stage, step: int) -> dict[str, np.ndarray]:
    """The host batch of 1-based ``step``: accumulation axis first, DPO references attached."""
    batch = stage.batches.next_step(stage.st.accum_steps)
    if stage.ref_table is not None:
        batch = attach_ref_logps(batch, stage.ref_table)
    for name, value in stage.hooks.extra_inputs(step).items():
        batch[name] = np.full((stage.st.accum_steps,), value, np.float32)
    return batch


def _count_skip(stage: Stage, carry: Carry, skipped: int, first_bad: int) -> None:
    """Updates the skip counters after a step; stops the run when the config says so."""
    if not skipped:
        carry.consecutive = 0
        return
    where = "the loss" if first_bad == -1 else f"parameter {stage.paths[first_bad]!r}"
    kind, step = stage.kind, carry.step
    if stage.config.on_nonfinite == "stop":
        raise NonFiniteError(f"{kind} step {step}: non-finite gradient at {where}")
    carry.skips, carry.consecutive = carry.skips + 1, carry.consecutive + 1
    logger.warning("%s step %d skipped: non-finite value at %s", kind, step, where)
    if carry.consecutive >= stage.config.max_consecutive_skips:
        raise NonFiniteError(
            f"{kind} step {step}: {carry.consecutive} consecutive non-finite steps "
            f"(last at {where}); stopping"
        )


def _train_step(stage: Stage, carry: Carry) -> dict[str, Any]:
    """One optimiser step on the next batch; returns its metrics record."""
    stage.hooks.fault("step", carry.step + 1)
    batch = _next_batch(stage, carry.step + 1)
    lr = float(stage.schedule(carry.step - carry.skips))
    t0 = time.perf_counter()
    device_batch = place(batch, stage.batch_shardings)
    carry.params, carry.opt_state, metrics = stage.step_fn(
        carry.params, carry.opt_state, device_batch, stage.ref_params
    )
    m = {k: v.item() for k, v in jax.device_get(metrics).items()}
    dt = time.perf_counter() - t0
    carry.rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(carry.rng))[0])
    carry.step += 1
    _count_skip(stage, carry, m["skipped"], m.pop("first_nonfinite_leaf"))
    tokens = int(batch["attention_mask"].sum())
    return dict(m, learning_rate=lr, skips=carry.skips, tokens=tokens, tokens_per_s=tokens / dt)


def _save(stage: Stage, carry: Carry, manager: Any) -> None:
    """Checkpoints ``carry`` and the data position at the current step."""
    meta = {
        "data": stage.batches.state(),
        "rng": np.asarray(carry.rng).tolist(),
        "skips": carry.skips,
        "consecutive_skips": carry.consecutive,
        "config": to_dict(stage.config),
        "total": stage.total,
    }
    stage.hooks.fault("save", carry.step)
    ckpt.save(manager, carry.step, carry.params, carry.opt_state, meta)


# ----------------------------------------------------------------------------- one stage


@dataclass(frozen=True, kw_only=True)
class _Run:
    """What every stage of one `train` call shares."""

    config: TrainConfig
    inputs: Inputs
    mesh: Any
    output_dir: str
    stop: StopRequest
    log_every: int | None
    step_callback: Callable[[int, dict], None] | None


def _note_budget_change(stage: Stage, carry: Carry, found: dict | None, run: _Run) -> None:
    """Logs and records (config.json) a changed step budget of a continued stage."""
    old_total = (found or {}).get("total")
    if old_total is None or old_total == stage.total:
        return
    change = schedule_change(stage.st, old_total, stage.total, carry.step - carry.skips)
    logger.info("%s: %s", stage.kind, change["schedule"])
    record_schedule_change(run.output_dir, stage.kind, change)


def _all_skipped(kind: str, carry: Carry) -> None:
    """A stage whose every step was skipped changed nothing: never a success."""
    if carry.step and carry.skips >= carry.step:
        raise NonFiniteError(
            f"{kind}: every one of the {carry.step} steps was skipped as non-finite, so the "
            "model is unchanged and nothing was exported (a tokenizer that does not match the "
            "model, or a far too high learning rate, are the usual causes)"
        )


def _steps(stage: Stage, carry: Carry, manager: Any, run: _Run, resumed: bool) -> bool:
    """Steps until the budget is done (True) or a stop is requested (False, checkpointed)."""
    log = MetricsLog(stage.stage_dir, resume_step=carry.step, enabled=jax.process_index() == 0)
    progress = Progress(stage.kind, total=stage.total, initial=carry.step, every=run.log_every)
    last_saved = carry.step if resumed else 0
    every = stage.config.checkpoint_every  # 0: no checkpoints but the stop one
    first, refreshed = carry.step + 1, False
    run.stop.unsaved = False
    try:
        while carry.step < stage.total:
            if run.stop.requested():
                if carry.step != last_saved:
                    _save(stage, carry, manager)
                    logger.warning("%s: checkpoint saved at step %d", stage.kind, carry.step)
                return False
            record: dict[str, Any] = {}
            if stage.refresh is not None and carry.step % stage.st.ogpsa.refresh_every == 0:
                what = f"basis refresh before step {carry.step + 1}"
                with progress.phase(what, slow=None if refreshed else True):
                    record = _refresh_basis(stage, carry)
                refreshed = True
            if carry.step + 1 == first:
                with progress.phase(f"step {first} (compiles the train step)", slow=True):
                    record.update(_train_step(stage, carry))
            else:
                record.update(_train_step(stage, carry))
            run.stop.unsaved = True
            log.write(carry.step, record)
            progress.step(carry.step, record)
            if run.step_callback is not None:
                run.step_callback(carry.step, record)
            if carry.step in run.config.export_at and carry.step < stage.total:
                export_step(stage, carry, run.inputs.tokenizer)
            if every and (carry.step % every == 0 or carry.step == stage.total):
                _save(stage, carry, manager)
                last_saved, run.stop.unsaved = carry.step, False
        if every and last_saved != carry.step:
            _save(stage, carry, manager)
        run.stop.unsaved = False
    finally:
        progress.close()
        log.close()
    return True


def _run_stage(
    kind: str, stage_dir: str, init_path: str | None, budget: StageBudget, run: _Run
) -> TrainResult:
    final_dir = os.path.join(stage_dir, "final")
    lora = lora_config(run.config.model.lora) is not None
    model_dir = os.path.join(stage_dir, "final-merged") if lora else final_dir
    done = done_record(stage_dir)
    if done is not None and done["step"] >= budget.total:
        logger.info("%s: already complete in %s (step %d)", kind, stage_dir, done["step"])
        return TrainResult(
            output_dir=stage_dir,
            step=done["step"],
            preempted=False,
            final_dir=final_dir,
            model_dir=model_dir,
        )
    preempted = TrainResult(
        output_dir=stage_dir, step=0, preempted=True, final_dir=None, stopped_by=run.stop.signal
    )
    if run.stop.requested():  # asked before this stage began: nothing of it to save
        return preempted
    logger.info("%s: %d steps: %s", kind, budget.total, budget.reason)
    stage, carry = build_stage(kind, run.config, run.inputs, run.mesh, stage_dir, init_path)
    manager = ckpt.open_manager(
        os.path.join(stage_dir, "checkpoints"), max_to_keep=run.config.max_to_keep
    )
    try:
        meta = _restore(stage, carry, manager)
        if done is not None and (meta is None or meta["step"] < done["step"]):
            logger.warning(
                "%s: no checkpoint of the finished step %d to continue from (checkpoint_every=0 "
                "or removed); continuing from step %d",
                kind,
                done["step"],
                carry.step,
            )
        _note_budget_change(stage, carry, meta if meta and "total" in meta else done, run)
        finished = _steps(stage, carry, manager, run, resumed=meta is not None)
    finally:
        ckpt.close_manager(manager)
    if not finished:
        return dataclasses.replace(preempted, step=carry.step, stopped_by=run.stop.signal)
    _all_skipped(kind, carry)
    export_final(stage, carry, run.inputs.tokenizer, final_dir)
    logger.info(
        "%s: done after %d steps (%s); model exported to %s",
        kind,
        carry.step,
        budget.reason,
        final_dir,
    )
    return TrainResult(
        output_dir=stage_dir,
        step=carry.step,
        preempted=False,
        final_dir=final_dir,
        model_dir=model_dir,
    )


# ----------------------------------------------------------------------------- entry point


def train(
    command: str,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    step_callback: Callable[[int, dict], None] | None = None,
    log_every: int | None = None,
) -> TrainResult:
    """Runs (or resumes, or extends) ``sft``, ``dpo`` or ``sft-dpo`` training into ``output_dir``.

    Args:
        command: "sft", "dpo" or "sft-dpo".
        config: the run config (validated here before anything is loaded or written).
        output_dir: run folder; an existing run with the same config is resumed, one that
            differs only by a larger step or epoch budget is continued (extended), one with
            another config is an error unless ``overwrite``.
        overwrite: replace an existing run with a different config.
        step_callback: called on the host after every step with ``(step, metrics)``.
        log_every: without a terminal, a progress line every this many steps (None: about 20
            per stage).

    Returns:
        A `TrainResult`; ``preempted=True`` after SIGTERM or Ctrl-C (checkpoint saved; rerun
        resumes), ``stopped_by`` naming the signal.

    Raises:
        ValueError: bad config, data, model folder or output folder (before any compute);
            `NonFiniteError` when non-finite values stop the run or every step was skipped;
            KeyboardInterrupt on a second Ctrl-C (or a first one with nothing unsaved).

    Example:
        >>> from ogpsa_jax.train import preset
        >>> train("sft", preset("tiny"), "/tmp/run").final_dir  # doctest: +SKIP
        '/tmp/run/final'
    """
    output_dir = os.fspath(output_dir)
    shape = validate(config, command, jax.device_count())
    record = {"command": command, "config": to_dict(config)}
    plan = check_output_dir(output_dir, record, overwrite)  # read only: before any loading
    stages = stages_of(command)
    with catch_stop_signals() as stop:
        inputs = load_inputs(command, config)
        budgets = {k: stage_budget(k, getattr(config, k), len(inputs.encoded[k])) for k in stages}
        prepare_output_dir(output_dir, record, overwrite, plan)
        devices = jax.devices()[: math.prod(shape)]
        mesh = models.make_mesh(shape, axis_type=config.mesh_axis_type, devices=devices)
        run = _Run(
            config=config,
            inputs=inputs,
            mesh=mesh,
            output_dir=output_dir,
            stop=stop,
            log_every=log_every,
            step_callback=step_callback,
        )
        result, init_path = None, inputs.model_path
        for kind, stage_dir in zip(stages, stage_dirs(output_dir, command), strict=True):
            os.makedirs(stage_dir, exist_ok=True)
            with logs.stage(kind), jax.set_mesh(mesh):
                result = _run_stage(kind, stage_dir, init_path, budgets[kind], run)
            if result.preempted or (stop.requested() and kind != stages[-1]):
                # a stop during a stage's export: stop before the next stage starts
                return dataclasses.replace(
                    result,
                    preempted=True,
                    output_dir=output_dir,
                    final_dir=None,
                    stopped_by=stop.signal,
                )
            init_path = result.model_dir  # with LoRA: new adapters on the merged model
    assert result is not None
    return dataclasses.replace(result, output_dir=output_dir)
