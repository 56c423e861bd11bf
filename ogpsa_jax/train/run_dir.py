"""The run folder: its config record, the guard against mixing configs, and stage completion.

``DIR/config.json`` records the command and the resolved config. A rerun with the same record
resumes; a different record is a ValueError listing the changed fields unless ``overwrite``,
and a folder that is not an ogpsa run is never touched without it. The latest complete
checkpoint of every stage must also come from this config (`check_checkpoints`, read only).
``done.json`` marks a finished stage (written atomically after its export).

Example:
    >>> record = {"command": "sft", "config": {"seed": 0}}
    >>> prepare_output_dir("runs/r", record, overwrite=False)  # doctest: +SKIP
    >>> config_diff({"a": 1, "b": {"c": 2}}, {"a": 1, "b": {"c": 3}})
    ['b.c: 2 -> 3']
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import jax

from ogpsa_jax.train import checkpoint as ckpt

logger = logging.getLogger(__name__)


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """``"field: old -> new"`` for every dotted field where two config records differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += config_diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


def _write_json(path: str, value: Any) -> None:
    """Writes ``value`` to ``path`` atomically: a kill leaves no half-written file."""
    with open(path + ".tmp", "w") as f:
        json.dump(value, f, indent=2)
    os.replace(path + ".tmp", path)


def prepare_output_dir(output_dir: str, record: dict, overwrite: bool) -> None:
    """Creates the run folder and its ``config.json``, or checks an existing one.

    Args:
        output_dir: the run folder.
        record: ``{"command": ..., "config": to_dict(config)}``.
        overwrite: delete an existing folder that holds something else.

    Raises:
        ValueError: the folder holds another config or is not an ogpsa run (and not
            ``overwrite``); nothing is changed then.
    """
    cfg_path = os.path.join(output_dir, "config.json")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        old = None
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                old = json.load(f)
        if old == record:
            logger.info("resuming the run in %s (same config)", output_dir)
            return
        if not overwrite:
            if old is None:
                raise ValueError(
                    f"output dir {output_dir!r} exists and is not an ogpsa run; pass --overwrite"
                )
            diff = config_diff(old, record)
            raise ValueError(
                f"output dir {output_dir!r} holds a run with a different config "
                f"({', '.join(diff[:6])}); pass --overwrite to replace it"
            )
        logger.warning("--overwrite: deleting %s", output_dir)
        if jax.process_index() == 0:
            shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if jax.process_index() == 0:
        _write_json(cfg_path, record)


def stage_dirs(output_dir: str, command: str) -> list[str]:
    """The folder of each stage: ``sft-dpo`` puts SFT in ``DIR/sft`` and DPO in ``DIR``."""
    return [os.path.join(output_dir, "sft"), output_dir] if command == "sft-dpo" else [output_dir]


def check_checkpoints(output_dir: str, command: str, config: dict) -> None:
    """A resumed folder's latest complete checkpoints must come from this config (read only).

    Raises:
        ValueError: naming the checkpoint and the differing fields.
    """
    for stage_dir in stage_dirs(output_dir, command):
        found = ckpt.read_meta(os.path.join(stage_dir, "checkpoints"))
        if found is None or "config" not in found[1] or found[1]["config"] == config:
            continue
        diff = config_diff(found[1]["config"], config)
        raise ValueError(
            f"checkpoint {stage_dir}/checkpoints/{found[0]} was written by a different config "
            f"({', '.join(diff[:6])}); use another --output-dir or pass --overwrite"
        )


def done_step(stage_dir: str) -> int | None:
    """The last step of a finished stage (``done.json``), or None if it is not finished."""
    path = os.path.join(stage_dir, "done.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)["step"]


def mark_done(stage_dir: str, step: int, skips: int) -> None:
    """Writes ``done.json`` (atomically) once a stage is exported."""
    path = os.path.join(stage_dir, "done.json")
    with open(path + ".tmp", "w") as f:
        json.dump({"step": step, "skips": skips}, f)
    os.replace(path + ".tmp", path)
