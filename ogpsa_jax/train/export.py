"""A stage's model folders: ``final/`` at its end and ``step-N/`` at the steps of ``export_at``.

The trained weights live sharded over the mesh (and, in a multi-process job, over processes);
every process joins the gather, and process 0 alone merges them into the decoder and writes.
``final/`` is a full HF folder with the tokenizer files, or with LoRA adapters the folders of
`ogpsa_jax.train.lora.export_lora`; ``step-N/`` is always a full HF folder (with LoRA the merged
model), so a point along the run is evaluated like any model.

Example:
    >>> export_final(stage, carry, tokenizer, "runs/r/final")  # doctest: +SKIP
    >>> export_step(stage, carry, tokenizer)  # runs/r/step-N/  # doctest: +SKIP
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from ogpsa_jax import models
from ogpsa_jax.models.lora import merge_lora
from ogpsa_jax.train.lora import export_lora
from ogpsa_jax.train.processes import sync_processes
from ogpsa_jax.train.run_dir import mark_done
from ogpsa_jax.train.stage import Carry, Stage


def _host_model(stage: Stage, carry: Carry) -> Any:
    """The trained decoder on process 0 (every process joins the gather); None elsewhere."""
    params, rest = carry.params, stage.rest
    if jax.process_count() > 1:  # every process joins the gather; process 0 writes
        params = multihost_utils.process_allgather(params, tiled=True)
        rest = multihost_utils.process_allgather(rest, tiled=True)
        if jax.process_index() == 0:  # host copies it may write to (merging LoRA does)
            params, rest = jax.tree.map(np.array, (params, rest))
    if jax.process_index() != 0:
        return None
    return nnx.merge(stage.graphdef, params, rest)


def _write_hf(model: Any, tokenizer: Any, path: str) -> None:
    """A full HF folder with the tokenizer files at ``path`` (replacing one that is there)."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    models.save_hf(model, path)
    tokenizer.save_pretrained(path)


def export_final(stage: Stage, carry: Carry, tokenizer: Any, final_dir: str) -> None:
    """Writes ``final/`` (with LoRA, `export_lora`'s folders), then ``done.json``.

    Args:
        stage: the finished stage.
        carry: its trained weights and counters.
        tokenizer: the run's tokenizer (its files go into every folder written).
        final_dir: the stage's ``final/`` folder.
    """
    model = _host_model(stage, carry)
    if model is not None:
        if stage.lora is not None:
            export_lora(model, stage.stage_dir, tokenizer, stage.base_dir)
        else:
            _write_hf(model, tokenizer, final_dir)
        mark_done(stage.stage_dir, carry.step, carry.skips, stage.total)
    sync_processes(f"{stage.kind} exported")  # the next stage of sft-dpo reads final/


def export_step(stage: Stage, carry: Carry, tokenizer: Any) -> None:
    """Writes ``step-N/`` (a full HF folder; with LoRA the merged model) for ``export_at``.

    Args:
        stage: the running stage.
        carry: its weights at step N (``carry.step``).
        tokenizer: the run's tokenizer.
    """
    model = _host_model(stage, carry)
    if model is not None:
        path = os.path.join(stage.stage_dir, f"step-{carry.step}")
        _write_hf(merge_lora(model) if stage.lora is not None else model, tokenizer, path)
