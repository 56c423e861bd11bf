"""Benchmark: SFT / DPO optimiser steps with OGPSA vs plain, the basis refresh, memory, and peers.

Question: what does OGPSA add to a training step of the reference code's shape (micro-batches
accumulated, then one projection, clip and AdamW update per optimiser step), and is our step at
least as fast as TRL's and as a PyTorch re-implementation of the reference code's gradient hooks?
Expected (issue 8): k = 2 step overhead <= 3 % on CPU for SmolLM2-135M at 4 sequences x 256
tokens x 4 accumulation steps (``overhead_ratio_k2`` <= 1.03); tokens/s >= TRL's.

What is measured, side by side in one run (float32, random weights, 2 CPU threads):

1. Step time, OGPSA (k = 1, 2, 8) vs the same jitted step with OGPSA off, for the ``tiny`` and
   SmolLM2-135M configs, SFT (4 x 256 x 4 accumulation) and DPO (2 pairs x 256 x 4), refresh
   excluded. Variants are interleaved call by call (A B A B) over one shared parameter / AdamW
   carry, each with its own projection state; medians after warm-up, spread = min..max of the
   per-round ratios. The projection code does not depend on the basis method (gram_schmidt and
   svd bases run the same compiled step), so method only enters item 2. Every k is timed
   directly at the full shape; for SmolLM2 every k is also timed on a 1-row x 16-token
   micro-batch, where the step is almost all optimiser work: the difference to plain there is
   the per-step cost of OGPSA ("delta"), which gives each k's ratio at the full shape as
   (plain + delta) / plain ("composed"), a less noisy check of the direct ratios.
   An A/A control, ``plain_b``, is the plain step compiled and run a second time as its own
   variant: its ratio to ``plain`` is the resolution of the direct ratios (two identical
   SmolLM2 programs have differed by ~3 % in medians, from buffer placement and load).
   ``tiny`` runs with ``scan_unroll=0`` (its 3 layers unrolled, as the ``tiny`` preset does);
   SmolLM2 with the default layer loop.
   The compiled step is checked for copies of basis-shaped buffers (donation must alias the
   unchanged basis in place).
2. The basis refresh: reference gradient per micro-batch (measured) x the reference code's row
   count (200 rows per set; SFT 2 sets, DPO 200 pairs = 400 rows) + the basis computation
   (measured per k and method on k or 2 gradient trees), amortised per step at refresh
   intervals 30 (SFT) and 5 (DPO). For ``tiny`` the whole refresh at 400 rows is also timed.
3. Memory: bytes of the basis, the parameters and the whole optimiser state (from the
   abstract shapes), for each k, with mask "all" and "no_embed".
4. Peers: TRL SFTTrainer / DPOTrainer and a minimal PyTorch per-micro-batch gradient-hook
   projection (benchmarks/peers/torch_steps.py, run in .venv311), at the same config, batch,
   length, accumulation and threads; tokens/s and our ratio (ours from item 1's timings).

Command (from the repository root; ``make bench-train`` does the same)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/train_step.py \
        --json results/bench/train_step.json

Options: ``--configs tiny,smollm2``, ``--reps N``, ``--skip-peers``, ``--gpu`` (bf16 Qwen2
~0.5B / ~1.5B configs and the bf16-vs-float32 residual check; see benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ogpsa_jax import capability_basis, set_basis  # noqa: E402
from ogpsa_jax.models import DecoderConfig, init_random, smollm2_135m_config, tiny_config  # noqa: E402
from ogpsa_jax.train import OGPSAConfig, StageConfig, make_optimizer, make_train_step  # noqa: E402
from ogpsa_jax.train.step import (  # noqa: E402
    dpo_micro_loss,
    logits_logps,
    make_ref_grad_fn,
    sft_micro_loss,
)

logger = logging.getLogger("benchmarks.train_step")

# (rows per micro-batch (pairs for DPO), tokens per row, accumulation steps).
SHAPES = {"sft": (4, 256, 4), "dpo": (2, 256, 4)}
# Configs whose peers run (at item 1's shapes; SmolLM2's "ours" reuses item 1's timings).
PEER_CONFIGS = ("tiny", "smollm2")
KS = (1, 2, 8)
# GPU check (--gpu): the paper's per-device shapes, every variant timed directly.
GPU_SHAPES = {"sft": (4, 2048, 4), "dpo": (2, 2048, 16)}
GPU_KS = {"sft": (1, 2, 8), "dpo": (1, 2)}
REF_ROWS = {"sft": 400, "dpo": 400}  # reference code: 2 sets x 200 rows; 200 pairs x 2
REFRESH_EVERY = {"sft": 30, "dpo": 5}
PROMPT_FRAC = 0.25  # the first quarter of each row is prompt (no loss)


# ----------------------------------------------------------------------------- model and data


def model_config(name: str) -> DecoderConfig:
    """The decoder config of a benchmark name."""
    if name == "tiny":
        return tiny_config(vocab_size=97)
    if name == "smollm2":
        return smollm2_135m_config()
    if name == "qwen2_0.5b":
        return DecoderConfig(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_layers=24,
            num_heads=14,
            num_kv_heads=2,
            head_dim=64,
            rope_theta=1e6,
            tie_word_embeddings=True,
            attention_bias=True,
        )
    if name == "qwen2_1.5b":
        return DecoderConfig(
            architecture="qwen2",
            vocab_size=151936,
            hidden_size=1536,
            intermediate_size=8960,
            num_layers=28,
            num_heads=12,
            num_kv_heads=2,
            head_dim=128,
            rope_theta=1e6,
            tie_word_embeddings=True,
            attention_bias=True,
        )
    raise ValueError(f"unknown benchmark config {name!r}")


def scan_unroll_for(name: str) -> int:
    """The layer-scan unroll a config is benchmarked with (0 = unrolled: tiny, as its preset)."""
    return 0 if name == "tiny" else 1


def build_model(cfg: DecoderConfig, dtype: Any, scan_unroll: int = 1) -> tuple[Any, Any]:
    """(float32 params, apply_fn) of a random decoder computing in ``dtype``."""
    model = init_random(cfg, seed=0, dtype=dtype, param_dtype=jnp.float32, scan_unroll=scan_unroll)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def apply_fn(p: Any, ids: jax.Array, attn: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, p, rest)(ids, attn)

    return params, apply_fn


def make_batch(vocab: int, rows: int, length: int, accum: int, *, dpo: bool, seed: int = 0):
    """Random full-length rows [A, R, L]; loss on the last 3/4 of each row."""
    rng = np.random.default_rng(seed)
    r = 2 * rows if dpo else rows
    ids = rng.integers(3, vocab, (accum, r, length), dtype=np.int32)
    loss = np.zeros_like(ids)
    loss[..., int(length * PROMPT_FRAC) :] = 1
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss}
    if dpo:
        batch["ref_logps"] = np.full((accum, r), -float(length), np.float32)
    return jax.device_put(batch)


def stage_config(
    kind: str, k: int, *, mask: str = "all", method: str = "gram_schmidt", shape=None
) -> StageConfig:
    """A StageConfig with OGPSA off (k = 0) or on with k directions; paper optimiser."""
    rows, length, accum = shape or SHAPES[kind]
    og = OGPSAConfig(enabled=k > 0, k=max(k, 1), method=method, mask=mask)
    return StageConfig(
        batch_size=rows,
        accum_steps=accum,
        max_length=length,
        learning_rate=1e-6,
        max_grad_norm=1.0,
        ogpsa=og,
    )


def tree_bytes(tree: Any) -> int:
    return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- timing


def interleaved(runners: dict[str, Any], warmup: int, reps: int) -> dict[str, list[float]]:
    """Wall times of zero-argument runners (each blocks until done), called A B A B ...

    The start of each round rotates so that no variant always follows the same one.
    """
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name]()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return times


def ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    """Median of per-round ratios and their min / max (the spread)."""
    rs = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}


class StepBench:
    """Jitted train steps of several OGPSA variants over one shared (params, AdamW) carry."""

    def __init__(
        self, params: Any, apply_fn: Any, kind: str, variants: dict[str, int], bases, shape=None
    ):
        self.kind = kind
        stage0 = stage_config(kind, 0, shape=shape)
        rest_tx = make_optimizer(stage0, total_steps=1000).rest  # clip + AdamW
        logps = logits_logps(apply_fn)
        micro = sft_micro_loss(logps) if kind == "sft" else dpo_micro_loss(logps, stage0)
        self.params = params
        self.rest_state = jax.jit(rest_tx.init)(params)
        self.steps, self.proj_states, self.optimizers = {}, {}, {}
        for name, k in variants.items():
            # Same clip + AdamW as stage0; the projection (None with OGPSA off) per variant.
            opt = make_optimizer(stage_config(kind, k), total_steps=1000)
            state = None if opt.projection is None else opt.projection.init(params)
            if k > 0:
                state = set_basis(state, bases[k])
            self.optimizers[name], self.proj_states[name] = opt, state
            self.steps[name] = jax.jit(make_train_step(micro, opt), donate_argnums=(0, 1))
        self.cache: dict[tuple, Any] = {}
        self.compile_s: dict[str, float] = {}

    def _args(self, name: str, batch: dict) -> tuple:
        opt_state = self.optimizers[name].join(self.proj_states[name], self.rest_state)
        return (self.params, opt_state, batch, None)

    def compiled(self, name: str, batch: dict) -> Any:
        """The AOT-compiled step for this variant and batch shape (compiled once, reused)."""
        key = (name, batch["input_ids"].shape)
        if key not in self.cache:
            t0 = time.perf_counter()
            self.cache[key] = self.steps[name].lower(*self._args(name, batch)).compile()
            self.compile_s[f"{name}@{'x'.join(map(str, key[1]))}"] = time.perf_counter() - t0
        return self.cache[key]

    def run(self, name: str, batch: dict) -> dict:
        step = self.compiled(name, batch)
        self.params, opt, metrics = step(*self._args(name, batch))
        self.proj_states[name], self.rest_state = self.optimizers[name].split(opt)
        return jax.block_until_ready(metrics)


def state_copies(compiled: Any) -> dict[str, int]:
    """Copies of donated state buffers (entry parameters) in the compiled step.

    With (params, opt_state) donated and returned in the same order, every output aliases its
    own input, and the unchanged basis needs no copy; a mismatched alias would show up as
    copies of ``basis`` parameters. Other state copied per step (e.g. AdamW moments kept for a
    select) is counted separately, in bytes.
    """
    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    params = dict(re.findall(r"%(\S+) = \S+ parameter\((\d+)\)", entry))
    out = {"basis_copies": 0, "basis_copy_bytes": 0, "other_state_copies": 0}
    out["other_state_copy_bytes"] = 0
    for shape, operand in re.findall(r"= f32\[([0-9,]*)\]\S* copy\(%(\S+)\)", entry):
        if operand not in params or not shape:
            continue
        nbytes = 4 * int(np.prod([int(d) for d in shape.split(",")]))
        key = "basis" if "basis" in operand else "other_state"
        out[f"{key}_copies"] += 1
        out[f"{key}_copy_bytes"] += nbytes
    out["aliased_outputs"] = len(re.findall(r"may-alias|must-alias", text.split("\n", 1)[0]))
    return out


def random_grads(params: Any, n: int, seed: int) -> list[Any]:
    """n random float32 gradient trees shaped like params (basis timing is data-independent)."""
    make = jax.jit(lambda key: _normal_tree(params, key))
    return [make(jax.random.key(seed + i)) for i in range(n)]


def _normal_tree(params: Any, key: jax.Array) -> Any:
    leaves, tree_def = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree_def,
        [
            1e-3 * jax.random.normal(kk, p.shape, jnp.float32)
            for p, kk in zip(leaves, keys, strict=True)
        ],
    )


@partial(jax.jit, static_argnums=(0, 1, 2))
def _random_leaf_basis(shape: tuple[int, ...], dtype: Any, k: int, key: jax.Array):
    keys = jax.random.split(key, k)
    dirs = [jax.random.normal(kk, shape, jnp.float32).astype(dtype) for kk in keys]
    return capability_basis([[d] for d in dirs], k=k)


def random_basis(params: Any, k: int, seed: int) -> tuple[Any, ...]:
    """A gram_schmidt basis of k random directions per leaf (the step time does not depend on
    the directions' values), built one leaf at a time so that the peak memory is k copies of
    the largest leaf rather than several k-fold copies of the whole model."""
    leaves, tree_def = jax.tree.flatten(params)
    per_leaf = []
    for i, p in enumerate(leaves):
        per_leaf.append(
            jax.block_until_ready(
                _random_leaf_basis(tuple(p.shape), jnp.dtype(p.dtype), k, jax.random.key(seed + i))
            )
        )
    return tuple(jax.tree.unflatten(tree_def, [b[j][0] for b in per_leaf]) for j in range(k))


# ----------------------------------------------------------------------------- items 1-3


def bench_steps(name: str, params: Any, apply_fn: Any, cfg: DecoderConfig, args) -> tuple:
    """Item 1 (+ the bases used) for one config, SFT and DPO."""
    out: dict[str, Any] = {}
    big = name != "tiny" and not args.gpu  # compose from a small-shape run (slow CPU steps)
    for kind in ("sft",) if big and args.key_only else ("sft", "dpo"):
        ks = GPU_KS[kind] if args.gpu else KS
        small_run = big and not (kind == "dpo" and args.dpo_direct_only) and not args.key_only
        if big and not small_run:
            ks = (2,)
        # Fresh bases per stage: the step donates (and so consumes) its projection state.
        bases = {k: random_basis(params, k, seed=100 + k) for k in ks}
        rows, length, accum = SHAPES[kind]
        full = make_batch(cfg.vocab_size, rows, length, accum, dpo=kind == "dpo")
        # plain_b: the A/A control (the plain step again, compiled as its own variant); not in
        # the GPU check, whose 8-minute budget is mostly compiles.
        control = {} if args.gpu else {"plain_b": 0}
        variants = {"plain": 0, **control, **{f"k{k}": k for k in ks}}
        bench = StepBench(params, apply_fn, kind, variants, bases)
        del bases
        res: dict[str, Any] = {"shape": {"rows": rows, "length": length, "accum": accum}}
        res["donation_check_k2"] = state_copies(bench.compiled("k2", full))
        if small_run:
            small = make_batch(cfg.vocab_size, 1, 16, 1, dpo=kind == "dpo", seed=1)
            runners = {v: (lambda v=v, b=bench, x=small: b.run(v, x)) for v in variants}
            t = interleaved(runners, warmup=1, reps=args.small_reps)
            res["small_shape"] = {"rows": 1, "length": 16, "accum": 1}
            res["small_step_s"] = {v: statistics.median(ts) for v, ts in t.items()}
            res["delta_s"] = {
                v: statistics.median([a - b for a, b in zip(t[v], t["plain"], strict=True)])
                for v in variants
                if v != "plain"
            }
        direct = list(variants)
        runners = {v: (lambda v=v, b=bench, x=full: b.run(v, x)) for v in direct}
        # tiny steps take ~0.1 s: more rounds than the SmolLM2 default of 3 (25 s per step).
        t = interleaved(runners, warmup=1, reps=max(args.reps, 15) if name == "tiny" else args.reps)
        res["step_s"] = {v: statistics.median(ts) for v, ts in t.items()}
        res["step_s_all"] = t
        res["ratio"] = {v: ratio_stats(t[v], t["plain"]) for v in direct if v != "plain"}
        plain = res["step_s"]["plain"]
        tokens = rows * length * accum * (2 if kind == "dpo" else 1)
        res["tokens_per_step"] = tokens
        res["tokens_per_s"] = {v: tokens / s for v, s in res["step_s"].items()}
        if "delta_s" in res:
            res["ratio_composed"] = {v: (plain + d) / plain for v, d in res["delta_s"].items()}
            res["projection_share"] = {v: d / (plain + d) for v, d in res["delta_s"].items()}
        else:
            res["projection_share"] = {
                v: 1.0 - plain / s for v, s in res["step_s"].items() if v.startswith("k")
            }
        res["compile_s"] = bench.compile_s
        # The projection alone (jitted, on a gradient tree), as a share of the plain step; the
        # projection does not depend on the stage, so it is timed once per config.
        proj_t = out["sft"]["projection_alone_s"] if kind == "dpo" else {}
        g = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), bench.params)
        for k in ks if kind == "sft" else ():
            proj_tx = make_optimizer(stage_config(kind, k), total_steps=1000).projection
            fn = jax.jit(lambda g, s, tx=proj_tx: tx.update(g, s)[0])
            state = bench.proj_states[f"k{k}"]
            jax.block_until_ready(fn(g, state))
            ts = []
            for _ in range(5):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(g, state))
                ts.append(time.perf_counter() - t0)
            proj_t[f"k{k}"] = statistics.median(ts)
        del g
        res["projection_alone_s"] = proj_t
        res["projection_alone_share"] = {v: s / plain for v, s in proj_t.items()}
        out[kind] = res
        logger.info("%s %s: %s", name, kind, json.dumps(_short(res)))
        params = bench.params  # carry on from the trained params (buffers were donated)
        del bench
    return out, params


def _short(res: dict) -> dict:
    return {k: v for k, v in res.items() if k not in ("step_s_all",)}


def bench_refresh(name: str, params: Any, apply_fn: Any, cfg: DecoderConfig) -> dict:
    """Item 2: reference gradient per micro-batch, basis computation per k / method."""
    out: dict[str, Any] = {}
    grad_fn = jax.jit(make_ref_grad_fn(logits_logps(apply_fn)))
    ref_rows, length = 4, SHAPES["sft"][1]
    b = make_batch(cfg.vocab_size, ref_rows, length, 1, dpo=False, seed=2)
    b = {k: v[0] for k, v in b.items()}
    jax.block_until_ready(grad_fn(params, b))
    ts = []
    for _ in range(2 if name != "tiny" else 5):
        t0 = time.perf_counter()
        jax.block_until_ready(grad_fn(params, b))
        ts.append(time.perf_counter() - t0)
    t_batch = statistics.median(ts)
    out["ref_batch"] = {"rows": ref_rows, "length": length, "grad_s": t_batch}
    basis_s: dict[str, float] = {}
    grads = random_grads(params, max(KS), seed=200)
    for method in ("gram_schmidt", "svd"):
        for k in KS:
            n = max(k, 2)
            fn = jax.jit(lambda gs, k=k, m=method: capability_basis(gs, k=k, method=m))
            jax.block_until_ready(fn(grads[:n]))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(grads[:n]))
            basis_s[f"{method}_k{k}"] = time.perf_counter() - t0
    del grads
    out["basis_s"] = basis_s
    est = {}
    for kind in ("sft", "dpo"):
        n_batches = REF_ROWS[kind] // ref_rows
        for key, tb in basis_s.items():
            total = n_batches * t_batch + tb
            est[f"{kind}_{key}"] = {
                "refresh_s": total,
                "per_step_s": total / REFRESH_EVERY[kind],
            }
    out["estimate"] = est
    out["reference_rows"] = REF_ROWS
    out["refresh_every"] = REFRESH_EVERY
    if name == "tiny":
        # The whole refresh measured: 400 rows in micro-batches of 4, mean per set, basis.
        def full_refresh() -> Any:
            sets = []
            for _ in range(2):
                acc = None
                for _ in range(REF_ROWS["sft"] // ref_rows // 2):
                    g, _, c = grad_fn(params, b)
                    acc = g if acc is None else jax.tree.map(jnp.add, acc, g)
                sets.append(acc)
            return jax.block_until_ready(capability_basis(sets, k=2))

        full_refresh()
        t0 = time.perf_counter()
        full_refresh()
        out["measured_sft_gram_schmidt_k2_s"] = time.perf_counter() - t0
    return out


def bench_memory(params: Any) -> dict:
    """Item 3: bytes of basis, params and whole optimiser state (abstract shapes only)."""
    out: dict[str, Any] = {"params_bytes": tree_bytes(params)}
    rest_tx = make_optimizer(stage_config("sft", 0), total_steps=1000).rest
    adam = tree_bytes(jax.eval_shape(rest_tx.init, params))
    out["adamw_state_bytes"] = adam
    rows = {}
    for mask in ("all", "no_embed"):
        for k in KS:
            proj_tx = make_optimizer(stage_config("sft", k, mask=mask), total_steps=1000).projection
            basis = tree_bytes(jax.eval_shape(proj_tx.init, params))
            rows[f"{mask}_k{k}"] = {
                "basis_bytes": basis,
                "opt_state_bytes": basis + adam,
                "basis_over_params": basis / out["params_bytes"],
                "basis_over_opt_state": basis / (basis + adam),
            }
    out["rows"] = rows
    return out


# ----------------------------------------------------------------------------- item 4: peers


def peer_run(mode: str, cfg: DecoderConfig, shape: tuple[int, int, int], steps: int, warm: int):
    """Runs benchmarks/peers/torch_steps.py in .venv311; its JSON result or an error dict."""
    py = os.path.join(ROOT, ".venv311", "bin", "python")
    if not os.path.exists(py):
        return {"error": ".venv311 missing (make fixtures-env)"}
    rows, length, accum = shape
    cmd = [
        py,
        os.path.join(ROOT, "benchmarks", "peers", "torch_steps.py"),
        "--mode",
        mode,
        "--hf-config",
        json.dumps(cfg.to_hf_dict()),
        "--rows",
        str(rows),
        "--length",
        str(length),
        "--accum",
        str(accum),
        "--steps",
        str(steps),
        "--warmup",
        str(warm),
        "--threads",
        "2",
    ]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t0
    lines = [x for x in res.stdout.strip().splitlines() if x.startswith('{"mode"')]
    if res.returncode != 0 or not lines:
        logger.warning("peer %s failed:\n%s", mode, res.stderr[-3000:])
        return {"error": res.stderr.strip().splitlines()[-1:] or ["no output"], "wall_s": wall}
    out = json.loads(lines[-1])
    out["wall_s"] = wall
    return out


def bench_peers(
    name: str, params: Any, apply_fn: Any, cfg: DecoderConfig, steps: dict, args
) -> tuple:
    """Item 4: our plain / k2 steps at the peer shape vs TRL and the hook re-implementation.

    SmolLM2 (steps of ~25 s) reuses item 1's interleaved timings and runs each peer once. The
    ``tiny`` steps take ~0.1 s, where the shared machine's speed drifts by 10-30 % from minute
    to minute, so ``tiny`` runs ``--peer-rounds`` rounds of [our plain / k2 steps, then each
    peer] and reports the median and spread of the per-round ratios."""
    out: dict[str, Any] = {}
    big = name != "tiny"
    n_steps, warm = (args.peer_steps, 1) if big else (12, 3)
    rounds = 1 if big else args.peer_rounds
    for kind in ("sft", "dpo"):
        rows, length, accum = shape = SHAPES[kind]
        tokens = rows * length * accum * (2 if kind == "dpo" else 1)
        modes = [f"trl_{kind}", f"hooks_{kind}"] if kind == "sft" else [f"trl_{kind}"]
        if args.skip_peers:
            modes = []
        bench = None
        if not big:
            bases = {2: random_basis(params, 2, seed=300)}
            bench = StepBench(params, apply_fn, kind, {"plain": 0, "k2": 2}, bases)
            del bases
            batch = make_batch(cfg.vocab_size, rows, length, accum, dpo=kind == "dpo", seed=3)
            runners = {v: (lambda v=v, b=bench, x=batch: b.run(v, x)) for v in ("plain", "k2")}
        per_round: list[dict[str, Any]] = []
        for r in range(rounds):
            if bench is None:  # SmolLM2: reuse item 1's interleaved timings (same shape)
                t = {v: steps[kind]["step_s_all"][v] for v in ("plain", "k2")}
            else:
                t = interleaved(runners, warmup=2 if r == 0 else 1, reps=12)
            got: dict[str, Any] = {
                "ours_tokens_per_s": {v: tokens / statistics.median(ts) for v, ts in t.items()}
            }
            for mode in modes:
                got[mode] = peer_run(mode, cfg, shape, n_steps, warm)
            per_round.append(got)
        if bench is not None:
            params = bench.params
            del bench
        ours = {
            v: statistics.median([g["ours_tokens_per_s"][v] for g in per_round])
            for v in ("plain", "k2")
        }
        res: dict[str, Any] = {
            "shape": {"rows": rows, "length": length, "accum": accum},
            "tokens_per_step": tokens,
            "rounds": len(per_round),
            "ours_tokens_per_s": ours,
        }
        for mode in modes:
            runs = [g[mode] for g in per_round]
            res[mode] = runs[-1]
            ok = [(g, g[mode]) for g in per_round if "tokens_per_s" in g[mode]]
            if not ok:
                continue
            res[mode] = dict(
                runs[-1],
                tokens_per_s=statistics.median([p["tokens_per_s"] for _, p in ok]),
                tokens_per_s_rounds=[p["tokens_per_s"] for _, p in ok],
            )
            for v in ("k2", "plain"):
                ratios = [g["ours_tokens_per_s"][v] / p["tokens_per_s"] for g, p in ok]
                res[f"ours_{v}_over_{mode}"] = statistics.median(ratios)
                res[f"ours_{v}_over_{mode}_spread"] = [min(ratios), max(ratios)]
        out[kind] = res
        logger.info("%s peers %s: %s", name, kind, json.dumps(res))
    return out, params


# ----------------------------------------------------------------------------- GPU check


def gpu_residual_check(params: Any, apply_fn: Any, cfg: DecoderConfig) -> dict:
    """Projection residual max |<Pg, u_i>| with bf16 gradients, default matmul precision vs f32.

    The basis comes from two reference gradients; the training gradient from another batch;
    both computed by the model at its bf16 compute dtype. The projection is applied to the bf16
    and to the float32 copy of that gradient; residuals are reported relative to ||g||.
    """
    from ogpsa_jax import project

    grad_fn = jax.jit(make_ref_grad_fn(logits_logps(apply_fn)))
    batches = [
        {k: v[0] for k, v in make_batch(cfg.vocab_size, 4, 256, 1, dpo=False, seed=s).items()}
        for s in (10, 11, 12)
    ]
    g_ref = [grad_fn(params, b)[0] for b in batches[:2]]
    basis = capability_basis(g_ref, k=2)
    g32 = grad_fn(params, batches[2])[0]
    out = {}
    for label, g in (("bf16", jax.tree.map(lambda x: x.astype(jnp.bfloat16), g32)), ("f32", g32)):
        pg = jax.jit(project)(g, basis)
        res = max(
            float(jnp.abs(jnp.sum(u.astype(jnp.float32) * x.astype(jnp.float32))))
            / max(float(jnp.linalg.norm(x.astype(jnp.float32))), 1e-30)
            for tree in basis
            for u, x in zip(jax.tree.leaves(tree), jax.tree.leaves(pg), strict=True)
        )
        out[f"residual_rel_{label}"] = res
    out["default_matmul_precision"] = str(jax.config.jax_default_matmul_precision)
    return out


# ----------------------------------------------------------------------------- table


def table(results: dict) -> str:
    lines = ["| item | config | stage | measure | value | ratio / share |", "|---" * 6 + "|"]

    def row(*cells: Any) -> None:
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")

    for name, r in results["configs"].items():
        for kind in r["steps"]:
            s = r["steps"][kind]
            sh = s["shape"]
            shape = f"{sh['rows']}x{sh['length']}x{sh['accum']}"
            row("1 step", name, kind, f"plain step {shape} (s)", f"{s['step_s']['plain']:.3f}", "")
            for v, st in s["ratio"].items():
                what = "A/A control: plain again" if v == "plain_b" else f"OGPSA {v}"
                row(
                    "1 step",
                    name,
                    kind,
                    f"{what} step (s), ratio median [min..max]",
                    f"{s['step_s'][v]:.3f}",
                    f"{st['median']:.3f} [{st['min']:.3f}..{st['max']:.3f}]",
                )
            for v, c in s.get("ratio_composed", {}).items():
                what = "A/A control" if v == "plain_b" else f"OGPSA {v}"
                row(
                    "1 step",
                    name,
                    kind,
                    f"{what}: delta per step (s), composed ratio",
                    f"{s['delta_s'][v]:.3f}",
                    f"{c:.3f}",
                )
            for v, share in s["projection_alone_share"].items():
                row(
                    "1 proj",
                    name,
                    kind,
                    f"projection alone {v} (s), share of plain step",
                    f"{s['projection_alone_s'][v]:.3f}",
                    f"{share:.3%}",
                )
            d = s["donation_check_k2"]
            row(
                "1 donation",
                name,
                kind,
                "compiled k2 step: basis copies / other state copied (MB)",
                d["basis_copies"],
                f"{d['other_state_copy_bytes'] / 1e6:.1f}",
            )
        rf = r.get("refresh")
        if rf is None:
            rf = {"ref_batch": {"grad_s": float("nan")}, "estimate": {}}
        row(
            "2 refresh",
            name,
            "-",
            "reference grad, 4-row micro-batch (s)",
            f"{rf['ref_batch']['grad_s']:.3f}",
            "",
        )
        for kind in r["steps"] if rf["estimate"] else ():
            plain = r["steps"][kind]["step_s"]["plain"]
            for key in (
                ("gram_schmidt_k2", "svd_k2", "svd_k8")
                if kind == "sft"
                else (
                    "gram_schmidt_k1",
                    "svd_k2",
                )
            ):
                e = rf["estimate"][f"{kind}_{key}"]
                row(
                    "2 refresh",
                    name,
                    kind,
                    f"{key}: refresh (s), amortised /{REFRESH_EVERY[kind]} over plain step",
                    f"{e['refresh_s']:.2f}",
                    f"{e['per_step_s'] / plain:.3f}",
                )
        if "measured_sft_gram_schmidt_k2_s" in rf:
            row(
                "2 refresh",
                name,
                "sft",
                "measured full refresh gs k2 (s)",
                f"{rf['measured_sft_gram_schmidt_k2_s']:.2f}",
                "",
            )
        m = r["memory"]
        for key, mr in m["rows"].items():
            row(
                "3 memory",
                name,
                "-",
                f"basis {key} (MB), over params / over opt state",
                f"{mr['basis_bytes'] / 1e6:.1f}",
                f"{mr['basis_over_params']:.2f} / {mr['basis_over_opt_state']:.2f}",
            )
        row(
            "3 memory",
            name,
            "-",
            "params / AdamW state (MB)",
            f"{m['params_bytes'] / 1e6:.1f}",
            f"{m['adamw_state_bytes'] / 1e6:.1f}",
        )
        for kind, p in r.get("peers", {}).items():
            sh = p["shape"]
            shape = f"{sh['rows']}x{sh['length']}x{sh['accum']}"
            row(
                "4 peers",
                name,
                kind,
                f"ours plain / k2 tok/s at {shape}",
                f"{p['ours_tokens_per_s']['plain']:.0f}",
                f"{p['ours_tokens_per_s']['k2']:.0f}",
            )
            for mode in (f"trl_{kind}", f"hooks_{kind}"):
                if mode in p:
                    tps = p[mode].get("tokens_per_s")
                    ratio = p.get(f"ours_k2_over_{mode}")
                    spread = p.get(f"ours_k2_over_{mode}_spread")
                    text = f"{ratio:.2f}" if ratio else ""
                    if ratio and p.get("rounds", 1) > 1:
                        text += f" [{spread[0]:.2f}..{spread[1]:.2f}] ({p['rounds']} rounds)"
                    row(
                        "4 peers",
                        name,
                        kind,
                        f"{mode} tok/s, ours k2 over it",
                        f"{tps:.0f}" if tps else p[mode].get("error"),
                        text,
                    )
    for name, r in results["configs"].items():
        if "residual" in r:
            res = r["residual"]
            row(
                "residual",
                name,
                "-",
                "max |<Pg,u>|/||g||, bf16 grads",
                f"{res['residual_rel_bf16']:.2e}",
                f"f32: {res['residual_rel_f32']:.2e}",
            )
    if "overhead_ratio_k2" in results:
        row(
            "key",
            "smollm2",
            "sft",
            "overhead_ratio_k2 (direct median)",
            f"{results['overhead_ratio_k2']:.3f}",
            "goal <= 1.03",
        )
    if "aa_ratio_plain_b" in results:
        row(
            "key",
            "smollm2",
            "sft",
            "A/A ratio plain_b / plain (resolution of the direct ratios)",
            f"{results['aa_ratio_plain_b']:.3f}",
            "ideal 1.000",
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def _write_json(path: str, results: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,smollm2")
    parser.add_argument(
        "--reps", type=int, default=3, help="timed rounds at the full shape (tiny: at least 15)"
    )
    parser.add_argument("--small-reps", type=int, default=5, help="timed rounds, small shape")
    parser.add_argument("--skip-peers", action="store_true")
    parser.add_argument("--peer-steps", type=int, default=3, help="SmolLM2 peer steps (1 warm)")
    parser.add_argument(
        "--peer-rounds", type=int, default=3, help="tiny: rounds of [ours, each peer]"
    )
    parser.add_argument(
        "--key-only",
        action="store_true",
        help="SmolLM2: only the key figure (SFT plain vs k2 at the full shape), no refresh/peers",
    )
    parser.add_argument(
        "--dpo-direct-only",
        action="store_true",
        help="SmolLM2 DPO: time plain vs k2 at the full shape only (no small-shape deltas)",
    )
    parser.add_argument("--gpu", action="store_true", help="bf16 Qwen2 0.5B/1.5B + residual check")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    if not args.gpu and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    dtype = jnp.bfloat16 if args.gpu else jnp.float32
    if args.gpu:
        SHAPES.update(GPU_SHAPES)
    names = args.configs.split(",")
    if args.gpu and args.configs == "tiny,smollm2":
        names = ["qwen2_0.5b", "qwen2_1.5b"]
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "machine": {
            "device": jax.devices()[0].device_kind,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "jax": jax.__version__,
        },
        "dtype": jnp.dtype(dtype).name,
        "configs": {},
    }
    for name in names:
        cfg = model_config(name)
        unroll = scan_unroll_for(name)
        params, apply_fn = build_model(cfg, dtype, scan_unroll=unroll)
        r: dict[str, Any] = {"num_params": cfg.num_params, "scan_unroll": unroll}
        logger.info("%s: %.1fM parameters", name, cfg.num_params / 1e6)
        r["memory"] = bench_memory(params)
        logger.info("%s memory done", name)
        if not (args.key_only and name != "tiny"):
            r["refresh"] = bench_refresh(name, params, apply_fn, cfg)
            logger.info("%s refresh: %s", name, json.dumps(r["refresh"]))
        r["steps"], params = bench_steps(name, params, apply_fn, cfg, args)
        if args.gpu:
            r["residual"] = gpu_residual_check(params, apply_fn, cfg)
        elif name in PEER_CONFIGS and not (args.key_only and name != "tiny"):
            r["peers"], params = bench_peers(name, params, apply_fn, cfg, r["steps"], args)
        results["configs"][name] = r
        del params
        if args.json:  # after every config, so a run cut short still leaves its results
            _write_json(args.json, results)
    if "smollm2" in results["configs"]:
        s = results["configs"]["smollm2"]["steps"]["sft"]
        results["overhead_ratio_k2"] = s["ratio"]["k2"]["median"]
        results["overhead_ratio_k2_spread"] = [s["ratio"]["k2"]["min"], s["ratio"]["k2"]["max"]]
        results["aa_ratio_plain_b"] = s["ratio"]["plain_b"]["median"]
        if "ratio_composed" in s:
            results["overhead_ratio_k2_composed"] = s["ratio_composed"]["k2"]
    if args.gpu:
        results["overhead_ratio_k2_gpu"] = {
            n: r["steps"]["sft"]["ratio"]["k2"]["median"] for n, r in results["configs"].items()
        }
    results["machine"]["loadavg_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    if args.json:
        _write_json(args.json, results)
    sys.stdout.write(table(results) + "\n")
    sys.stdout.write(f"machine: {results['machine']}, wall {results['wall_s']:.0f}s\n")


if __name__ == "__main__":
    main()
