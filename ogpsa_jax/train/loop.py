"""The training driver: a thin stateful shell over the pure, jitted steps.

``train(command, config, output_dir)`` validates everything and loads tokenizer, data and the
model folder before it writes anything; then per stage it builds the mesh and the sharded model,
computes the capability basis (refreshed every K steps in a separately jitted function), runs
the jitted step, logs metrics, checkpoints with orbax, and exports the final model with
``save_hf`` (plus tokenizer files) to ``final/``.

Layout: stages "sft" and "dpo" write ``DIR/{config.json, metrics.jsonl, tb/, checkpoints/,
final/}``; "sft-dpo" writes the SFT stage under ``DIR/sft/`` and the DPO stage (started from,
and referenced to, ``DIR/sft/final``) in ``DIR`` itself.

Example:
    >>> result = train("sft", preset("tiny"), "runs/tiny")  # doctest: +SKIP
    >>> result.final_dir
    'runs/tiny/final'
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax.train import checkpoint as ckpt
from ogpsa_jax.train.config import FLAT_METHODS, StageConfig, TrainConfig, stages_of, to_dict
from ogpsa_jax.train.config import validate as validate_config
from ogpsa_jax.train.metrics import MetricsLog
from ogpsa_jax.train.step import (
    dpo_micro_loss,
    leaf_paths,
    make_logps_fn,
    make_optimizer,
    make_ref_grad_fn,
    make_schedule,
    make_train_step,
    param_mask,
    path_str,
    sft_micro_loss,
)

logger = logging.getLogger(__name__)

# Exit status of a run that checkpointed after SIGTERM (EX_TEMPFAIL: "try again" -> resume).
EXIT_PREEMPTED = 75
_ROWS = ("data", "fsdp")


class NonFiniteError(ValueError):
    """A non-finite loss / gradient / basis under ``on_nonfinite="stop"`` or too many skips."""


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    """What a `train` call did."""

    output_dir: str  # the run folder
    step: int  # optimiser steps completed in the last stage that ran
    preempted: bool  # True: stopped by SIGTERM after a checkpoint (rerun to resume)
    final_dir: str | None  # the exported HF folder of the last stage (None if preempted)


@dataclass(frozen=True, kw_only=True)
class _Inputs:
    """Everything loaded before the output folder is touched."""

    tokenizer: Any
    pad_id: int
    model_path: str | None
    encoded: dict[str, list]
    ref_groups: dict[str, list]


# ----------------------------------------------------------------------------- inputs


def _resolve_assets(source: str) -> str:
    if source.startswith("assets:"):
        from ogpsa_jax.data import assets_path

        return str(assets_path(source.removeprefix("assets:")))
    return source


def _model_path(config: TrainConfig) -> str | None:
    if config.model.init != "hf":
        return None
    if config.model.path == "smollm2":
        from ogpsa_jax.models.gguf import smollm2_path

        return str(smollm2_path())
    path = config.model.path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path!r} not found or has no config.json")
    _check_model_folder(path)
    return path


def _check_model_folder(path: str) -> None:
    """Reads config.json and the safetensors headers (no weights): a malformed folder is a
    ValueError naming it before anything is computed or written."""
    from safetensors import safe_open

    from ogpsa_jax.models.config import DecoderConfig
    from ogpsa_jax.models.hf import hf_tensor_names

    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        model_cfg = DecoderConfig.from_hf(raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"model folder {path!r}: config.json is malformed: {e}") from None
    index, single = os.path.join(path, "model.safetensors.index.json"), "model.safetensors"
    try:
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [single]
        names = set()
        for name in files:
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                names |= set(f.keys())
    except Exception as e:  # missing file, bad JSON, or safetensors' own error for a bad header
        raise ValueError(f"model folder {path!r}: cannot read the weights: {e}") from None
    missing = sorted(set(hf_tensor_names(model_cfg)) - names)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"model folder {path!r}: missing tensors {missing[:5]}{more}")


def _load_tokenizer(config: TrainConfig, model_path: str | None) -> Any:
    from transformers import AutoTokenizer

    name = config.model.tokenizer or model_path
    if name == "tiny":
        name = _resolve_assets("assets:tiny_tokenizer")
    if not name or not os.path.isdir(name):
        raise ValueError(f"tokenizer folder {name!r} not found (config field model.tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the tokenizer from {name!r}: {e}") from e


def _system_prompt(config: TrainConfig) -> str | None:
    return config.model.system_prompt or None


def _load_inputs(command: str, config: TrainConfig) -> _Inputs:
    from ogpsa_jax import data

    model_path = _model_path(config)
    tok = _load_tokenizer(config, model_path)
    pad_id = data.pad_token_id(tok)
    system = _system_prompt(config)
    encoded, refs = {}, {}
    for stage in stages_of(command):
        st: StageConfig = getattr(config, stage)
        src = _resolve_assets(st.data)
        limit = st.limit or None
        common = dict(max_length=st.max_length, truncation=st.truncation, system_prompt=system)
        if stage == "sft":
            examples = data.load_sft(src, split=st.split, limit=limit)
            encoded[stage] = data.tokenize_sft(tok, examples, **common)
        else:
            pairs = data.load_preferences(
                src, split=st.split, limit=limit, safe_pairs_only=st.safe_pairs_only
            )
            encoded[stage] = data.tokenize_preferences(tok, pairs, **common)
        if st.ogpsa.enabled:
            sources = [
                _reference_source(s, stage, st.ogpsa.reference_rows) for s in st.ogpsa.reference
            ]
            refs[stage] = data.reference_batches(
                sources,
                tokenizer=tok,
                batch_size=st.ogpsa.reference_batch_size,
                max_length=st.max_length,
                n=st.ogpsa.reference_rows,
                system_prompt=system,
                buckets=(st.max_length,),
            )
    return _Inputs(
        tokenizer=tok, pad_id=pad_id, model_path=model_path, encoded=encoded, ref_groups=refs
    )


def _reference_source(source: str, stage: str, rows: int) -> Any:
    """DPO stage: preference sources give NLL on chosen and rejected; SFT files are used as is."""
    from ogpsa_jax import data

    path = _resolve_assets(source)
    if stage != "dpo":
        return path
    try:
        return data.load_preferences(path, limit=rows)
    except ValueError as e:
        logger.info("reference %s has no preference pairs (%s); using it as SFT data", path, e)
        return path


# ----------------------------------------------------------------------------- output folder


def _prepare_output_dir(output_dir: str, record: dict, overwrite: bool) -> None:
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
            diff = _diff(old, record)
            raise ValueError(
                f"output dir {output_dir!r} holds a run with a different config "
                f"({', '.join(diff[:6])}); pass --overwrite to replace it"
            )
        logger.warning("--overwrite: deleting %s", output_dir)
        if jax.process_index() == 0:
            shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    if jax.process_index() != 0:
        return
    with open(cfg_path + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(cfg_path + ".tmp", cfg_path)


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]}: {a!r} -> {b!r}"]


# ----------------------------------------------------------------------------- sharding helpers


def _rows_sharding(mesh: jax.sharding.Mesh, rows: int, ndim: int, axis: int) -> NamedSharding:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    spec = [None] * ndim
    if rows % n == 0:
        spec[axis] = _ROWS
    return NamedSharding(mesh, P(*spec))


def _place(batch: dict, shardings: Any) -> dict:
    """Host batch -> global arrays. Every process holds the same global batch (the iterator is
    deterministic), and each keeps only its addressable shards, so this is multi-host safe."""

    def one(x: np.ndarray, sh: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    if isinstance(shardings, NamedSharding):
        return {k: one(v, shardings) for k, v in batch.items()}
    return {k: one(v, shardings[k]) for k, v in batch.items()}


def _opt_shardings(abstract_opt: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Each param-shaped opt-state leaf takes its parameter's sharding; the rest replicate."""
    by_path = {
        p: (x.shape, x.sharding)
        for p, x in zip(leaf_paths(params), jax.tree.leaves(params), strict=True)
    }
    replicated = NamedSharding(mesh, P())

    def one(path: Any, leaf: Any) -> Any:
        s = path_str(path)
        best = None
        for p, (shape, sharding) in by_path.items():
            if (s == p or s.endswith("/" + p)) and tuple(shape) == tuple(leaf.shape):
                if best is None or len(p) > len(best[0]):
                    best = (p, sharding)
        return best[1] if best else replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)


# ----------------------------------------------------------------------------- DPO references


def _row_key(batch: dict, r: int) -> bytes:
    n = int(batch["attention_mask"][r].sum())
    return batch["input_ids"][r, :n].tobytes() + batch["loss_mask"][r, :n].astype(np.int8).tobytes()


def _precompute_ref_logps(
    logps_jit: Callable, params: Any, pairs: list, st: StageConfig, pad_id: int
):
    from ogpsa_jax.data import pad_batch

    table: dict[bytes, float] = {}
    bs = st.batch_size
    for start in range(0, len(pairs), bs):
        chunk = list(pairs[start : start + bs]) + [None] * (bs - len(pairs[start : start + bs]))
        rows = [p.chosen if p else None for p in chunk] + [p.rejected if p else None for p in chunk]
        batch = pad_batch(rows, st.max_length, pad_id)
        lp = np.asarray(jax.device_get(logps_jit(params, batch)))
        for r, row in enumerate(rows):
            if row is not None:
                table[_row_key(batch, r)] = float(lp[r])
    return table


def _attach_ref_logps(batch: dict, table: dict[bytes, float]) -> dict:
    a, rows = batch["input_ids"].shape[:2]
    ref = np.zeros((a, rows), np.float32)
    for i in range(a):
        micro = {k: v[i] for k, v in batch.items()}
        for r in range(rows):
            ref[i, r] = table[_row_key(micro, r)]
    return dict(batch, ref_logps=ref)


# ----------------------------------------------------------------------------- one stage


def _make_model(config: TrainConfig, inputs: _Inputs, mesh: Any, init_path: str | None) -> Any:
    model = _build_model(config, inputs, mesh, init_path)
    # How the forward runs (not what it computes): plain attributes of the decoder.
    model.scan_unroll = config.model.scan_unroll
    model.attention_chunk = config.model.attention_chunk
    return model


def _build_model(config: TrainConfig, inputs: _Inputs, mesh: Any, init_path: str | None) -> Any:
    from ogpsa_jax import models

    dtype, param_dtype = jnp.dtype(config.model.dtype), jnp.dtype(config.model.param_dtype)
    if init_path is not None:
        return models.load_hf(init_path, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
    tok = inputs.tokenizer
    arch = config.model.arch
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
    return models.init_random(
        cfg, seed=config.seed, dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )


def _install_sigterm(flag: list[bool]) -> Callable[[], None]:
    """Sets flag[0] on SIGTERM; returns a function restoring the old handler."""
    if sys.modules.get("threading") and __import__("threading").current_thread() is not (
        __import__("threading").main_thread()
    ):
        return lambda: None
    old = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        logger.warning("SIGTERM: checkpointing at the next step boundary, then exiting")
        flag[0] = True

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, old)


def _run_stage(
    kind: str,
    config: TrainConfig,
    inputs: _Inputs,
    mesh: Any,
    stage_dir: str,
    init_path: str | None,
    *,
    stop_flag: list[bool],
    step_callback: Callable[[int, dict], None] | None,
    inject_nonfinite_at: Sequence[int],
    fault: Callable[[str, int], None] = lambda phase, step: None,
) -> TrainResult:
    from ogpsa_jax.data import Batches, bucket_lengths

    st: StageConfig = getattr(config, kind)
    og = st.ogpsa
    final_dir = os.path.join(stage_dir, "final")
    done_path = os.path.join(stage_dir, "done.json")
    if os.path.isfile(done_path):
        with open(done_path) as f:
            step = json.load(f)["step"]
        logger.info("%s stage already complete in %s (step %d)", kind, stage_dir, step)
        return TrainResult(output_dir=stage_dir, step=step, preempted=False, final_dir=final_dir)

    batches = Batches(
        inputs.encoded[kind],
        batch_size=st.batch_size,
        pad_id=inputs.pad_id,
        buckets=bucket_lengths(st.max_length),
        seed=config.seed,
    )
    per_epoch = batches.steps_per_epoch(st.accum_steps)
    if per_epoch < 1:
        raise ValueError(
            f"{kind}: {len(inputs.encoded[kind])} examples are fewer than one optimiser step "
            f"(batch_size {st.batch_size} x accum_steps {st.accum_steps})"
        )
    total = st.epochs * per_epoch
    if st.max_steps:
        total = min(total, st.max_steps)

    model = _make_model(config, inputs, mesh, init_path)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model
    frozen = config.model.frozen_layers

    def apply_fn(p: Any, ids: jax.Array, attn: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p, rest)(ids, attn, frozen_layers=frozen)

    param_sh = jax.tree.map(lambda x: x.sharding, params)
    replicated = NamedSharding(mesh, P())
    proj_tx, rest_tx = make_optimizer(st, total)
    schedule = make_schedule(st, total)

    def init_opt(p: Any) -> Any:
        return (proj_tx.init(p), rest_tx.init(p))

    opt_sh = _opt_shardings(jax.eval_shape(init_opt, params), params, mesh)
    opt_state = jax.jit(init_opt, out_shardings=opt_sh)(params)

    rows = st.batch_size * (2 if kind == "dpo" else 1)
    batch_sh = _rows_sharding(mesh, rows, 3, 1)
    keys = ["input_ids", "attention_mask", "loss_mask"]
    ref_params, table = None, None
    if kind == "sft":
        micro_loss = sft_micro_loss(apply_fn)
    else:
        micro_loss = dpo_micro_loss(apply_fn, st)
        if st.dpo_reference == "model":
            ref_params = jax.tree.map(jnp.copy, params)
        else:
            keys.append("ref_logps")
            rows_sh = _rows_sharding(mesh, rows, 2, 0)
            logps_jit = jax.jit(make_logps_fn(apply_fn, st), in_shardings=(param_sh, rows_sh))
            t0 = time.time()
            table = _precompute_ref_logps(
                lambda p, b: logps_jit(p, _place(b, rows_sh)),
                params,
                inputs.encoded[kind],
                st,
                inputs.pad_id,
            )
            logger.info("reference log-probs of %d rows in %.1fs", len(table), time.time() - t0)
    batch_shs = {
        k: (batch_sh if k != "ref_logps" else _rows_sharding(mesh, rows, 2, 1)) for k in keys
    }
    ref_sh = param_sh if ref_params is not None else None
    step_jit = jax.jit(
        make_train_step(micro_loss, proj_tx, rest_tx),
        in_shardings=(param_sh, opt_sh, batch_shs, replicated, ref_sh),
        out_shardings=(param_sh, opt_sh, replicated),
        donate_argnums=(0, 1),
    )

    refresh = None
    if og.enabled and og.method == "activation":  # GPM: the layers' inputs, not gradients
        from ogpsa_jax.train.activation import make_activation_refresh

        groups = inputs.ref_groups[kind]
        ref_sh = _rows_sharding(mesh, groups[0][0]["input_ids"].shape[0], 2, 0)
        refresh = make_activation_refresh(
            graphdef, rest, og, groups, place=lambda b: _place(b, ref_sh), seed=config.seed
        )
    elif og.enabled:
        refresh = _make_refresh(apply_fn, og, inputs.ref_groups[kind], param_sh, mesh)

    manager = ckpt.open_manager(
        os.path.join(stage_dir, "checkpoints"), max_to_keep=config.max_to_keep
    )
    step, skips, consecutive = 0, 0, 0
    rng = jax.random.key_data(jax.random.key(config.seed))
    latest = manager.latest_step()
    if latest is not None:
        params, opt_state, meta = ckpt.restore(
            manager, latest, ckpt.abstract_like(params), ckpt.abstract_like(opt_state)
        )
        batches.restore(meta["data"])
        step, skips, consecutive = meta["step"], meta["skips"], meta["consecutive_skips"]
        rng = np.asarray(meta["rng"], np.uint32)
        logger.info("%s: resumed from checkpoint step %d", kind, step)
    log = MetricsLog(stage_dir, resume_step=step, enabled=jax.process_index() == 0)

    def save() -> None:
        meta = {
            "data": batches.state(),
            "rng": np.asarray(rng).tolist(),
            "skips": skips,
            "consecutive_skips": consecutive,
            "config": to_dict(config),
        }
        fault("save", step)
        ckpt.save(manager, step, params, opt_state, meta)

    paths = leaf_paths(params)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, initial=step, desc=kind, disable=not sys.stderr.isatty())
    last_saved = step if latest is not None else -1
    try:
        while step < total:
            record: dict[str, Any] = {}
            if refresh is not None and step % og.refresh_every == 0:
                fault("refresh", step + 1)
                opt_state, ref_metrics = refresh(params, opt_state)
                bad_ref = ref_metrics.pop("nonfinite_at")
                if not ref_metrics.pop("basis_finite"):
                    where = f"capability basis refresh at {bad_ref}"
                    if config.on_nonfinite == "stop":
                        raise NonFiniteError(f"{kind} step {step + 1}: non-finite {where}")
                    logger.warning(
                        "%s step %d: non-finite %s; old basis kept", kind, step + 1, where
                    )
                    record["refresh_skipped"] = 1
                record.update(ref_metrics)
            fault("step", step + 1)
            batch = batches.next_step(st.accum_steps)
            if table is not None:
                batch = _attach_ref_logps(batch, table)
            poison = np.float32(np.nan if (step + 1) in inject_nonfinite_at else 0.0)
            lr = float(schedule(step - skips))
            t0 = time.perf_counter()
            device_batch = _place(batch, batch_shs)
            params, opt_state, m = step_jit(params, opt_state, device_batch, poison, ref_params)
            m = {k: v.item() for k, v in jax.device_get(m).items()}
            dt = time.perf_counter() - t0
            rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(rng))[0])
            step += 1
            bad = m.pop("first_nonfinite_leaf")
            if m["skipped"]:
                where = "the loss" if bad == -1 else f"parameter {paths[bad]!r}"
                if config.on_nonfinite == "stop":
                    raise NonFiniteError(f"{kind} step {step}: non-finite gradient at {where}")
                skips, consecutive = skips + 1, consecutive + 1
                logger.warning("%s step %d skipped: non-finite value at %s", kind, step, where)
                if consecutive >= config.max_consecutive_skips:
                    raise NonFiniteError(
                        f"{kind} step {step}: {consecutive} consecutive non-finite steps "
                        f"(last at {where}); stopping"
                    )
            else:
                consecutive = 0
            tokens = int(batch["attention_mask"].sum())
            record.update(m, learning_rate=lr, skips=skips, tokens=tokens, tokens_per_s=tokens / dt)
            log.write(step, record)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}")
            if step_callback is not None:
                step_callback(step, record)
            every = config.checkpoint_every  # 0: no checkpoints but the SIGTERM one
            if stop_flag[0] or (every and (step % every == 0 or step == total)):
                save()
                last_saved = step
            if stop_flag[0]:
                logger.warning("%s: preempted at step %d (checkpoint saved)", kind, step)
                return TrainResult(output_dir=stage_dir, step=step, preempted=True, final_dir=None)
        if config.checkpoint_every and last_saved != step:
            save()
    finally:
        bar.close()
        log.close()
        manager.close()

    from ogpsa_jax.models import save_hf

    if jax.process_count() > 1:  # every process joins the gather; process 0 writes
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        if os.path.isdir(final_dir):
            shutil.rmtree(final_dir)
        save_hf(nnx.merge(graphdef, params, rest), final_dir)
        inputs.tokenizer.save_pretrained(final_dir)
        with open(done_path + ".tmp", "w") as f:
            json.dump({"step": step, "skips": skips}, f)
        os.replace(done_path + ".tmp", done_path)  # atomic: a kill leaves no half-written file
    logger.info("%s: done after %d steps; model exported to %s", kind, step, final_dir)
    return TrainResult(output_dir=stage_dir, step=step, preempted=False, final_dir=final_dir)


def _make_refresh(apply_fn: Callable, og: Any, groups: list, param_sh: Any, mesh: Any) -> Callable:
    """``refresh(params, opt_state) -> (opt_state with a new basis, metrics)``."""
    from ogpsa_jax.bases import capability_basis
    from ogpsa_jax.projection import set_basis

    replicated = NamedSharding(mesh, P())
    rows_sh = _rows_sharding(mesh, groups[0][0]["input_ids"].shape[0], 2, 0)
    groups = [[_place(b, rows_sh) for b in group] for group in groups]
    grad_jit = jax.jit(
        make_ref_grad_fn(apply_fn),
        in_shardings=(param_sh, rows_sh),
        out_shardings=(param_sh, replicated, replicated),
    )
    add_jit = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
    scale_jit = jax.jit(lambda a, s: jax.tree.map(lambda x: x * s, a), donate_argnums=0)
    if og.method not in (*FLAT_METHODS, "gradient"):
        raise ValueError(
            f"ogpsa.method {og.method!r} is not wired into training (activation bases need the "
            f"model's layer inputs); use gram_schmidt, svd or gradient"
        )
    energy = og.energy or None
    per_batch = og.method in ("svd", "gradient")

    @partial(jax.jit, out_shardings=None)
    def basis_jit(grads: list) -> Any:
        if og.method == "gradient":
            from ogpsa_jax.bases import matrix_basis_from_gradients

            basis = matrix_basis_from_gradients(
                grads, k=og.k, energy=energy, mask=param_mask(og.mask)
            )
        else:
            basis = capability_basis(grads, k=og.k, method=og.method, energy=energy)
        ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(basis)]))
        grad_leaves = [jax.tree.leaves(g) for g in grads]
        leaf_ok = jnp.stack(
            [
                jnp.all(jnp.stack([jnp.all(jnp.isfinite(gl[j])) for gl in grad_leaves]))
                for j in range(len(grad_leaves[0]))
            ]
        )
        return basis, ok & jnp.all(leaf_ok), leaf_ok

    def refresh(params: Any, opt_state: Any) -> tuple[Any, dict]:
        t0 = time.perf_counter()
        grads, nll, count = [], 0.0, 0.0
        for group in groups:
            acc, n = None, 0.0
            for b in group:
                g, s, c = grad_jit(params, b)
                nll, c = nll + float(s), float(c)
                count += c
                if per_batch:
                    grads.append(scale_jit(g, 1.0 / max(c, 1.0)))
                else:
                    acc = g if acc is None else add_jit(acc, g)
                    n += c
            if not per_batch:
                grads.append(scale_jit(acc, 1.0 / max(n, 1.0)))
        basis, ok, leaf_ok = basis_jit(grads)
        ok = bool(ok) and math.isfinite(nll)
        if ok:
            opt_state = set_basis(opt_state, basis)
        leaf_ok = np.asarray(leaf_ok)
        bad = "the reference loss" if leaf_ok.all() else repr(leaf_paths(params)[leaf_ok.argmin()])
        metrics = {
            "ref_loss": nll / max(count, 1.0),
            "refresh_s": time.perf_counter() - t0,
            "basis_finite": ok,
            "nonfinite_at": None if ok else bad,
        }
        return opt_state, metrics

    return refresh


# ----------------------------------------------------------------------------- reliability


def _stage_dirs(output_dir: str, command: str) -> list[str]:
    return [os.path.join(output_dir, "sft"), output_dir] if command == "sft-dpo" else [output_dir]


def _check_checkpoints(output_dir: str, command: str, config: dict) -> None:
    """A resumed folder's latest complete checkpoint must come from this config (read only)."""
    for stage_dir in _stage_dirs(output_dir, command):
        found = ckpt.read_meta(os.path.join(stage_dir, "checkpoints"))
        if found is None or "config" not in found[1] or found[1]["config"] == config:
            continue
        diff = _diff(found[1]["config"], config)
        raise ValueError(
            f"checkpoint {stage_dir}/checkpoints/{found[0]} was written by a different config "
            f"({', '.join(diff[:6])}); use another --output-dir or pass --overwrite"
        )


def _fault_drill(spec: str) -> Callable[[str, int], None]:
    """Fault-drill hook (tests/fault_drill.py): ``OGPSA_FAULT_DRILL="PHASE@STEP+SECONDS"`` makes
    the process SIGKILL itself SECONDS after PHASE (``step``: computing 1-based step STEP;
    ``save``: writing checkpoint STEP; ``refresh``: the basis refresh before step STEP) begins.
    Returns ``fault(phase, step)``, a no-op when ``spec`` is empty."""
    if not spec:
        return lambda phase, step: None
    try:
        phase, rest = spec.split("@")
        step_text, delay_text = rest.split("+")
        at, delay = int(step_text), float(delay_text)
    except ValueError:
        raise ValueError(f"OGPSA_FAULT_DRILL={spec!r}: expected PHASE@STEP+SECONDS") from None
    if phase not in ("step", "save", "refresh"):
        raise ValueError(f"OGPSA_FAULT_DRILL={spec!r}: phase must be step, save or refresh")

    def fault(now_phase: str, now_step: int) -> None:
        if (now_phase, now_step) == (phase, at):
            import threading

            logger.warning("fault drill: SIGKILL %.3fs into %s %d", delay, phase, at)
            kill = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGKILL))
            kill.daemon = True
            kill.start()

    return fault


# ----------------------------------------------------------------------------- entry point


def train(
    command: str,
    config: TrainConfig,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    step_callback: Callable[[int, dict], None] | None = None,
    inject_nonfinite_at: Sequence[int] = (),
) -> TrainResult:
    """Runs (or resumes) ``sft``, ``dpo`` or ``sft-dpo`` training into ``output_dir``.

    Args:
        command: "sft", "dpo" or "sft-dpo".
        config: the run config (validated here before anything is loaded or written).
        output_dir: run folder; an existing run with the same config is resumed, one with a
            different config is an error unless ``overwrite``.
        overwrite: replace an existing run with a different config.
        step_callback: called on the host after every step with ``(step, metrics)``.
        inject_nonfinite_at: fault drill: 1-based steps whose gradient is made NaN.

    Returns:
        A `TrainResult`; ``preempted=True`` after SIGTERM (checkpoint saved; rerun resumes).

    Raises:
        ValueError: bad config, data, model folder or output folder (before any compute);
            `NonFiniteError` when non-finite values stop the run.

    Example:
        >>> train("sft", preset("tiny"), "/tmp/run").final_dir  # doctest: +SKIP
        '/tmp/run/final'
    """
    from ogpsa_jax.models.sharding import make_mesh

    output_dir = os.fspath(output_dir)
    shape = validate_config(config, command, jax.device_count())
    inputs = _load_inputs(command, config)
    fault = _fault_drill(os.environ.get("OGPSA_FAULT_DRILL", ""))
    record = {"command": command, "config": to_dict(config)}
    _prepare_output_dir(output_dir, record, overwrite)
    _check_checkpoints(output_dir, command, record["config"])
    n = math.prod(shape)
    mesh = make_mesh(shape, axis_type=config.mesh_axis_type, devices=jax.devices()[:n])
    stop_flag = [False]
    restore_handler = _install_sigterm(stop_flag)
    try:
        stages = stages_of(command)
        result = None
        init_path = inputs.model_path
        for kind in stages:
            stage_dir = output_dir
            if command == "sft-dpo" and kind == "sft":
                stage_dir = os.path.join(output_dir, "sft")
                os.makedirs(stage_dir, exist_ok=True)
            with jax.set_mesh(mesh):
                result = _run_stage(
                    kind,
                    config,
                    inputs,
                    mesh,
                    stage_dir,
                    init_path,
                    stop_flag=stop_flag,
                    step_callback=step_callback,
                    inject_nonfinite_at=inject_nonfinite_at,
                    fault=fault,
                )
            if result.preempted or (stop_flag[0] and kind != stages[-1]):
                # SIGTERM during a stage's export: stop before the next stage starts.
                result = dataclasses.replace(result, preempted=True)
                return dataclasses.replace(result, output_dir=output_dir)
            init_path = result.final_dir
        assert result is not None
        return dataclasses.replace(result, output_dir=output_dir)
    finally:
        restore_handler()
