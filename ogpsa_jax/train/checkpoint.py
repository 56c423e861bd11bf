"""Orbax checkpoints of a training stage: params, opt state (basis included), and host state.

Each checkpoint ``DIR/checkpoints/<step>`` holds two items: ``state`` (params and opt state,
restored against an abstract target so NamedTuples come back as NamedTuples and every array
gets its sharding) and ``meta`` (JSON: step, data-iterator position, RNG, skip counters and the
parameter shapes, checked before restoring so a checkpoint of another model is a named error,
not an orbax shape error). Orbax writes to a temporary folder and renames it when complete, so
an interrupted save is never listed as a step and the previous complete one is used.

Example:
    >>> mngr = open_manager(path, max_to_keep=2)  # doctest: +SKIP
    >>> save(mngr, 10, params, opt_state, meta)  # doctest: +SKIP
    >>> params, opt_state, meta = restore(mngr, 10, abstract_params, abstract_opt)  # +SKIP
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from ogpsa_jax.train.step import leaf_paths

logger = logging.getLogger(__name__)


def open_manager(directory: str | os.PathLike, *, max_to_keep: int) -> ocp.CheckpointManager:
    """A synchronous CheckpointManager keeping the last ``max_to_keep`` checkpoints.

    Args:
        directory: the checkpoints folder (created).
        max_to_keep: checkpoints kept.

    Returns:
        The manager.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options, item_names=("state", "meta")
    )


def shapes_of(params: Any) -> dict[str, list[int]]:
    """Parameter path -> shape (recorded in every checkpoint)."""
    leaves = jax.tree.leaves(params)
    return {p: list(x.shape) for p, x in zip(leaf_paths(params), leaves, strict=True)}


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
    meta = dict(meta, step=int(step), param_shapes=shapes_of(params))
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({"params": params, "opt_state": opt_state}),
            meta=ocp.args.JsonSave(meta),
        ),
        force=True,
    )
    manager.wait_until_finished()
    logger.info("checkpoint saved at step %d", step)


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
        ValueError: if the checkpoint's parameter names or shapes differ from this model's.
    """
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    want = shapes_of(abstract_params)
    have = meta.get("param_shapes", {})
    if have != want:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:5]
        details = ", ".join(f"{k}: checkpoint {have.get(k)} vs model {want.get(k)}" for k in diff)
        raise ValueError(
            f"checkpoint {manager.directory}/{step} is from a different model ({details})"
        )
    target = {"params": abstract_params, "opt_state": abstract_opt}
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))[
        "state"
    ]
    return state["params"], state["opt_state"], meta


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) for a tree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
