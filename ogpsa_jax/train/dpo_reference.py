"""DPO reference log-probabilities computed once before training (``dpo_reference=precompute``).

The frozen reference model scores every pair's chosen and rejected rows in one pass; the
results are kept in a table keyed by each row's tokens and loss mask, so any batch, in any
order and after a resume, finds its rows' values (`attach_ref_logps`). The alternative,
``dpo_reference=model``, keeps a frozen copy of the weights and runs it inside the step.

Example:
    >>> table = reference_logps_table(logps_fn, params, pairs, stage, pad_id,  # doctest: +SKIP
    ...     mesh=mesh, param_shardings=param_sh)
    >>> batch = attach_ref_logps(batches.next_step(2), table)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax.data import EncodedPair, pad_batch
from ogpsa_jax.train.schema import StageConfig
from ogpsa_jax.train.sharding import BoundProgram, jit_bound, place, rows_sharding
from ogpsa_jax.train.step import LogpsFn, make_logps_fn

logger = logging.getLogger(__name__)


def row_key(batch: dict[str, np.ndarray], r: int) -> bytes:
    """The table key of row ``r`` of a host batch: its tokens and loss mask (padding cut)."""
    n = int(batch["attention_mask"][r].sum())
    return batch["input_ids"][r, :n].tobytes() + batch["loss_mask"][r, :n].astype(np.int8).tobytes()


def reference_logps_program(
    logps_fn: LogpsFn, stage: StageConfig, mesh: jax.sharding.Mesh, param_shardings: Any
) -> BoundProgram:
    """The jitted reference pass: ``(params, batch of 2 * batch_size rows) -> log-probs [rows]``
    with the rows split over data x fsdp (memory planning compiles the same program).

    Args:
        logps_fn: the model's `LogpsFn` (a ``jax.tree_util.Partial`` binding the frozen
            weights, or a plain function): passed as an argument (`jit_bound`), never a constant.
        stage: the DPO stage config (``batch_size``, ``loss_type``).
        mesh: the training mesh.
        param_shardings: the shardings of the reference weights.

    Returns:
        The jitted function (`BoundProgram`).
    """
    rows_sh = rows_sharding(mesh, 2 * stage.batch_size, 2, 0)
    return jit_bound(
        lambda f, p, b: make_logps_fn(f, stage)(p, b),
        logps_fn,
        in_shardings=(param_shardings, rows_sh),
        out_shardings=NamedSharding(mesh, P()),  # every process reads every row's value
    )


def reference_logps_table(
    logps_fn: LogpsFn,
    params: Any,
    pairs: Sequence[EncodedPair],
    stage: StageConfig,
    pad_id: int,
    *,
    mesh: jax.sharding.Mesh,
    param_shardings: Any,
) -> dict[bytes, float]:
    """Reference log-probs of every chosen and rejected row, at ``params``.

    Args:
        logps_fn: the model's `LogpsFn`.
        params: the reference weights (the stage's starting weights).
        pairs: the stage's encoded preference pairs.
        stage: the DPO stage config (``batch_size``, ``max_length``, ``loss_type``).
        pad_id: the padding token id.
        mesh: the training mesh.
        param_shardings: the shardings of ``params``.

    Returns:
        `row_key` -> log-prob (per-token mean for IPO).
    """
    t0 = time.time()
    rows = 2 * stage.batch_size
    rows_sh = rows_sharding(mesh, rows, 2, 0)
    logps_jit = reference_logps_program(logps_fn, stage, mesh, param_shardings)
    table: dict[bytes, float] = {}
    bs = stage.batch_size
    for start in range(0, len(pairs), bs):
        chunk = list(pairs[start : start + bs]) + [None] * (bs - len(pairs[start : start + bs]))
        batch_rows = [p.chosen if p else None for p in chunk]
        batch_rows += [p.rejected if p else None for p in chunk]
        batch = pad_batch(batch_rows, stage.max_length, pad_id)
        lp = np.asarray(jax.device_get(logps_jit(params, place(batch, rows_sh))))
        for r, row in enumerate(batch_rows):
            if row is not None:
                table[row_key(batch, r)] = float(lp[r])
    logger.info("reference log-probs of %d rows in %.1fs", len(table), time.time() - t0)
    return table


def attach_ref_logps(batch: dict[str, np.ndarray], table: dict[bytes, float]) -> dict:
    """``batch`` (arrays ``[A, rows, ...]``) with ``ref_logps`` ``[A, rows]`` from ``table``."""
    a, rows = batch["input_ids"].shape[:2]
    ref = np.zeros((a, rows), np.float32)
    for i in range(a):
        micro = {k: v[i] for k, v in batch.items()}
        for r in range(rows):
            ref[i, r] = table[row_key(micro, r)]
    return dict(batch, ref_logps=ref)
