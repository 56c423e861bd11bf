"""The run folder: its config record, the guard against mixing configs, extensions, completion.

``DIR/config.json`` records the command and the resolved config. `check_output_dir` (read only,
run before anything is loaded) decides what a new command does with the folder: create it, resume
the same config, extend a run by a larger step or epoch budget (`BUDGET_FIELDS`, each only
larger), or replace it (``overwrite``); any other difference is a ValueError listing the changed
fields, and a folder that is not an ogpsa run is never touched without ``overwrite``. The latest
complete checkpoint of every stage must also come from this config, budget aside.
`prepare_output_dir` then writes: an extension keeps the earlier records in
``config.json["extensions"]``. ``done.json`` marks a finished stage (written atomically after its
export) with its step and its step budget.

Example:
    >>> record = {"command": "sft", "config": {"seed": 0}}
    >>> prepare_output_dir("runs/r", record, overwrite=False)  # doctest: +SKIP
    >>> config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c: 2 -> 3']
    >>> budget_increase("sft.max_steps", 3, 5), budget_increase("sft.seed", 3, 5)
    (True, False)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import jax

from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.processes import sync_processes

logger = logging.getLogger(__name__)

# Stage fields a finished or stopped run may be continued with, when larger.
BUDGET_FIELDS = ("epochs", "max_steps")


@dataclass(frozen=True)
class RunPlan:
    """What a command does with its output folder (decided by `check_output_dir`)."""

    action: str  # "new", "resume" (same config), "extend" (larger budget) or "replace"
    changes: list[str] = field(default_factory=list)  # "field: old -> new" of an extension
    old: dict | None = None  # the folder's config.json (resume, extend)


def _diff_items(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_items(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [(prefix[:-1], a, b)]


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """``"field: old -> new"`` for every dotted field where two config records differ."""
    return [f"{k}: {x!r} -> {y!r}" for k, x, y in _diff_items(a, b, prefix)]


def budget_increase(name: str, old: Any, new: Any) -> bool:
    """True when a dotted field is a stage budget (``sft.max_steps``, ``dpo.epochs``, ...) and
    ``new`` allows at least as many steps as ``old`` (``max_steps`` 0 = no cap)."""
    stage, _, leaf = name.rpartition(".")
    if stage not in ("sft", "dpo", "config.sft", "config.dpo") or leaf not in BUDGET_FIELDS:
        return False
    if not (isinstance(old, int) and isinstance(new, int)):
        return False
    if leaf == "max_steps" and new == 0:
        return True
    return old != 0 and new >= old if leaf == "max_steps" else new >= old


def _write_json(path: str, value: Any) -> None:
    """Writes ``value`` to ``path`` atomically: a kill leaves no half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def stage_dirs(output_dir: str, command: str) -> list[str]:
    """The folder of each stage: ``sft-dpo`` puts SFT in ``DIR/sft`` and DPO in ``DIR``."""
    return [os.path.join(output_dir, "sft"), output_dir] if command == "sft-dpo" else [output_dir]


def _stage_started(stage_dir: str) -> bool:
    return os.path.isfile(os.path.join(stage_dir, "done.json")) or bool(
        ckpt.complete_steps(os.path.join(stage_dir, "checkpoints"))
    )


def check_output_dir(output_dir: str, record: dict, overwrite: bool) -> RunPlan:
    """Decides what the command does with ``output_dir``, reading only (nothing is written).

    Args:
        output_dir: the run folder.
        record: ``{"command": ..., "config": to_dict(config)}``.
        overwrite: replace a folder that holds something else.

    Returns:
        The `RunPlan`.

    Raises:
        ValueError: the folder holds another config (beyond a larger budget) or is not an
            ogpsa run, and not ``overwrite``; a checkpoint was written by another config; an
            SFT stage whose DPO stage already started would be extended.
    """
    cfg_path = os.path.join(output_dir, "config.json")
    if not (os.path.isdir(output_dir) and os.listdir(output_dir)):
        if os.path.exists(output_dir) and not os.path.isdir(output_dir):
            raise ValueError(f"output dir {output_dir!r} exists and is not a folder")
        return RunPlan("new")
    old = _read_json(cfg_path) if os.path.isfile(cfg_path) else None
    if old is None:
        if overwrite:
            return RunPlan("replace")
        raise ValueError(
            f"output dir {output_dir!r} exists and is not an ogpsa run; pass --overwrite"
        )
    core = {k: v for k, v in old.items() if k != "extensions"}  # the earlier command and config
    same = core == record
    items = _diff_items(core, record)
    extend = bool(items) and all(budget_increase(k, x, y) for k, x, y in items)
    if not (same or extend):
        if overwrite:
            return RunPlan("replace")
        diff = config_diff(core, record)
        raise ValueError(
            f"output dir {output_dir!r} holds a run with a different config "
            f"({', '.join(diff[:6])}); only a larger step or epoch budget can continue it "
            "(sft/dpo.max_steps, sft/dpo.epochs, --max-steps); pass --overwrite to replace it"
        )
    changes = [f"{k.removeprefix('config.')}: {x!r} -> {y!r}" for k, x, y in items]
    if extend and record.get("command") == "sft-dpo" and any(c.startswith("sft.") for c in changes):
        if _stage_started(output_dir):
            raise ValueError(
                f"the SFT stage of {output_dir!r} cannot be extended: its DPO stage already "
                "started from the SFT model. Extend the DPO stage alone (--set dpo.max_steps=N "
                "or dpo.epochs=N, not --max-steps), or use a new --output-dir"
            )
    check_checkpoints(output_dir, record.get("command", ""), record["config"])
    return RunPlan("extend" if extend else "resume", changes, old)


def prepare_output_dir(
    output_dir: str, record: dict, overwrite: bool, plan: RunPlan | None = None
) -> RunPlan:
    """Creates the run folder and its ``config.json``, or updates or checks an existing one.

    Args:
        output_dir: the run folder.
        record: ``{"command": ..., "config": to_dict(config)}``.
        overwrite: delete an existing folder that holds something else.
        plan: `check_output_dir`'s decision (computed here when None).

    Returns:
        The plan carried out.

    Raises:
        ValueError: as `check_output_dir` (nothing is changed then).
    """
    plan = check_output_dir(output_dir, record, overwrite) if plan is None else plan
    cfg_path = os.path.join(output_dir, "config.json")
    sync_processes("run folder checked")  # every process has read it before process 0 writes
    if plan.action == "resume":
        logger.info("resuming the run in %s (same config)", output_dir)
        return plan
    if plan.action == "replace":
        logger.warning("--overwrite: deleting %s", output_dir)
        if jax.process_index() == 0:
            shutil.rmtree(output_dir)
        sync_processes("run folder removed")
    value = dict(record)
    if plan.action == "extend":
        logger.info("extending the run in %s: %s", output_dir, ", ".join(plan.changes))
        when = datetime.datetime.now().isoformat(timespec="seconds")
        value["extensions"] = [
            *plan.old.get("extensions", []),
            {"time": when, "changes": plan.changes, "stages": {}},
        ]
    os.makedirs(output_dir, exist_ok=True)
    if jax.process_index() == 0:
        _write_json(cfg_path, value)
    sync_processes("run folder written")
    return plan


def record_schedule_change(output_dir: str, stage: str, change: dict) -> None:
    """Adds what an extension did to a stage's schedule to the latest ``extensions`` entry of
    ``config.json`` (process 0; written atomically)."""
    path = os.path.join(output_dir, "config.json")
    if jax.process_index() != 0 or not os.path.isfile(path):
        return
    value = _read_json(path)
    if not value.get("extensions"):
        return
    value["extensions"][-1].setdefault("stages", {})[stage] = change
    _write_json(path, value)


def check_checkpoints(output_dir: str, command: str, config: dict) -> None:
    """A resumed folder's latest complete checkpoints must come from this config, up to a
    larger budget (read only).

    Raises:
        ValueError: naming the checkpoint and the differing fields.
    """
    for stage_dir in stage_dirs(output_dir, command):
        found = ckpt.read_meta(os.path.join(stage_dir, "checkpoints"))
        if found is None or "config" not in found[1]:
            continue
        items = _diff_items(found[1]["config"], config)
        if all(budget_increase(k, x, y) for k, x, y in items):
            continue
        diff = config_diff(found[1]["config"], config)
        raise ValueError(
            f"checkpoint {stage_dir}/checkpoints/{found[0]} was written by a different config "
            f"({', '.join(diff[:6])}); use another --output-dir or pass --overwrite"
        )


def done_record(stage_dir: str) -> dict | None:
    """A finished stage's ``done.json`` (``step``, ``skips``, ``total``), or None."""
    path = os.path.join(stage_dir, "done.json")
    return _read_json(path) if os.path.isfile(path) else None


def done_step(stage_dir: str) -> int | None:
    """The last step of a finished stage (``done.json``), or None if it is not finished."""
    done = done_record(stage_dir)
    return None if done is None else done["step"]


def mark_done(stage_dir: str, step: int, skips: int, total: int | None = None) -> None:
    """Writes ``done.json`` (atomically) once a stage is exported."""
    value = {"step": step, "skips": skips}
    if total is not None:
        value["total"] = total
    _write_json(os.path.join(stage_dir, "done.json"), value)
