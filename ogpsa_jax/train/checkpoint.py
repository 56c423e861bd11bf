"""Orbax checkpoints of a training stage: params, opt state (basis included), and host state.

Each checkpoint ``DIR/checkpoints/<step>`` holds two items: ``state`` (params and opt state,
restored against an abstract target so NamedTuples come back as NamedTuples and every array
gets its sharding) and ``meta`` (JSON: step, data-iterator position, RNG, skip counters and the
parameter and optimizer-state shapes and the run config, checked before restoring so a
checkpoint of another model or config is a named error, not an orbax shape error). Orbax writes
to a temporary folder, puts ``commit_success.txt`` in it and renames it when complete; a
checkpoint without that marker (a save or a clean-up cut short) and any temporary folder are
removed by `open_manager`, so the previous complete checkpoint is the one resumed.

Example:
    >>> mngr = open_manager(path, max_to_keep=2)  # doctest: +SKIP
    >>> save(mngr, 10, params, opt_state, meta)  # doctest: +SKIP
    >>> params, opt_state, meta = restore(  # doctest: +SKIP
    ...     mngr, 10, abstract_like(params), abstract_like(opt_state))
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from ogpsa_jax._tree import path_str
from ogpsa_jax.train.processes import sync_processes

logger = logging.getLogger(__name__)


# Written by orbax into a checkpoint folder as the last step before the rename that commits it.
_COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE


def is_complete(step_dir: str | os.PathLike) -> bool:
    """True when a checkpoint folder was fully written (orbax's commit marker is present)."""
    step_dir = os.fspath(step_dir)
    return os.path.isfile(os.path.join(step_dir, _COMMIT_FILE)) and all(
        os.path.isfile(os.path.join(step_dir, item, _COMMIT_FILE)) for item in ("state", "meta")
    )


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a complete checkpoint in ``directory``, ascending (read only)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    names = [n for n in os.listdir(directory) if n.isdigit()]
    return sorted(int(n) for n in names if is_complete(os.path.join(directory, n)))


def _drop_incomplete(directory: str) -> None:
    """Removes temporary and uncommitted checkpoint folders (process 0 only), with a warning."""
    if jax.process_index() != 0 or not os.path.isdir(directory):
        return
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        tmp = ocp.path.step.TMP_DIR_SUFFIX in name
        if os.path.isdir(path) and (tmp or (name.isdigit() and not is_complete(path))):
            logger.warning("removing the incomplete checkpoint %s (an interrupted write)", path)
            shutil.rmtree(path)


def open_manager(directory: str | os.PathLike, *, max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous CheckpointManager keeping the last ``max_to_keep`` checkpoints.

    Incomplete checkpoints (orbax temporary folders, step folders without the commit marker)
    are removed first, so ``latest_step()`` is the last complete one.

    Args:
        directory: the checkpoints folder (created).
        max_to_keep: checkpoints kept.

    Returns:
        The manager.
    """
    directory = os.path.abspath(os.fspath(directory))
    _drop_incomplete(directory)
    sync_processes(f"incomplete checkpoints removed from {directory}")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def close_manager(manager: ocp.CheckpointManager, *, timeout_s: float = 30.0) -> None:
    """Closes ``manager``, then waits (at most ``timeout_s``) for orbax's writer threads.

    A save cut short by a second Ctrl-C can leave orbax's background threads (e.g. the
    metadata writer that follows the array commits) started but not yet run when
    `CheckpointManager.close` returns. Left to the interpreter's exit, they fail ("cannot
    schedule new futures after shutdown") and print a traceback under the run's last line;
    waited for here, while the process is whole, they finish quietly. The cut checkpoint stays
    uncommitted either way (its temporary folder is never renamed), so `open_manager` removes
    it at the next start.

    Args:
        manager: from `open_manager`.
        timeout_s: the longest wait for the writer threads; what still runs after it is left
            to the interpreter.
    """
    manager.close()
    deadline = time.monotonic() + timeout_s
    # threading.enumerate() lists threads from `start()` (even before they first run) until
    # they end; orbax's own `join` would return at once for one not yet running.
    while any(
        type(t).__module__.startswith("orbax.") and not t.daemon for t in threading.enumerate()
    ):
        if time.monotonic() > deadline:
            logger.debug("orbax writer threads still running after %.0f s", timeout_s)
            return
        time.sleep(0.01)


def shapes_of(params: Any) -> dict[str, list[int]]:
    """Leaf path -> shape of a parameter or optimiser-state tree (recorded in every checkpoint;
    masked leaves hold nothing and are left out)."""
    return {path_str(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def save(
    manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any, meta: dict
) -> None:
    """Saves one checkpoint (blocking until it is complete on disk).

    Args:
        manager: from `open_manager`.
        step: the optimiser step reached.
        params: parameters.
        opt_state: optimiser state.
        meta: JSON-serialisable host state.
    """
    meta = dict(
        meta, step=int(step), param_shapes=shapes_of(params), opt_shapes=shapes_of(opt_state)
    )
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()
    logger.debug("checkpoint saved at step %d", step)


def restore(
    manager: ocp.CheckpointManager, step: int, abstract_params: Any, abstract_opt: Any
) -> tuple[Any, Any, dict]:
    """Restores a checkpoint against abstract targets (ShapeDtypeStructs with shardings).

    Args:
        manager: from `open_manager`.
        step: the step to restore.
        abstract_params: ``jax.ShapeDtypeStruct`` tree (with ``sharding``) of the params.
        abstract_opt: same for the optimiser state.

    Returns:
        (params, opt_state, meta).

    Raises:
        ValueError: if the checkpoint's parameter or optimizer-state names or shapes differ
            from this model's / optimizer's.
    """
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    where = f"checkpoint {manager.directory}/{step}"
    _check_shapes(where, "model", meta.get("param_shapes", {}), shapes_of(abstract_params))
    if "opt_shapes" in meta:
        _check_shapes(where, "optimizer state", meta["opt_shapes"], shapes_of(abstract_opt))
    target = {"params": abstract_params, "opt_state": abstract_opt}
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
        "state"
    ]
    return state["params"], state["opt_state"], meta


def _check_shapes(where: str, what: str, have: dict, want: dict) -> None:
    if have == want:
        return
    diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    details = ", ".join(
        f"{k}: checkpoint {have.get(k)} vs this run {want.get(k)}" for k in diff[:5]
    )
    more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
    raise ValueError(f"{where} is from a different {what} ({details}{more})")


def read_meta(directory: str | os.PathLike) -> tuple[int, dict] | None:
    """(step, meta) of the latest complete checkpoint in ``directory``; None if there is none.

    Read only: nothing under ``directory`` is created or removed.
    """
    steps = complete_steps(directory)
    if not steps:
        return None
    options = ocp.CheckpointManagerOptions(read_only=True, enable_async_checkpointing=False)
    manager = ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options, item_names=("state", "meta")
    )
    try:
        args = ocp.args.Composite(meta=ocp.args.JsonRestore())
        return steps[-1], manager.restore(steps[-1], args=args)["meta"]
    finally:
        manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
