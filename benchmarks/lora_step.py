"""Speed: one SmolLM2-135M train step with LoRA adapters vs full fine-tuning, side by side.

Question: how long does an optimiser step take when only LoRA adapters train (rank 16 on q, k,
v, o, gate, up, down) against full fine-tuning, on the same batch? Both steps are the
library's: `make_train_step` of the SFT loss with the stage optimizer of `ogpsa train` (OGPSA's
flat Gram-Schmidt basis, k = 2, then clip and AdamW), bfloat16 compute, float32 weights, the
model function of `ogpsa_jax.train.stage.model_logps` (with LoRA the frozen base weights are
an argument of the step), params and optimizer state donated. Weights are random with
SmolLM2-135M's shapes (the time does not depend on their values). Two settings: every layer
trained, and the ``smollm2`` preset's bottom 20 of 30 layers frozen. The calls alternate full,
LoRA, full, ... after one compiling call each; medians are reported.

Command::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lora_step.py [--reps 5] [--rows 4] \
        [--length 128] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ogpsa_jax.experiment.timing import load_average  # noqa: E402
from ogpsa_jax.models import (  # noqa: E402
    LoRAConfig,
    LoRAParam,
    add_lora,
    init_random,
    smollm2_135m_config,
)
from ogpsa_jax.models.lora import TARGETS  # noqa: E402
from ogpsa_jax.train import StageConfig, make_optimizer, make_train_step  # noqa: E402
from ogpsa_jax.train.stage import model_logps  # noqa: E402
from ogpsa_jax.train.step import sft_micro_loss  # noqa: E402


def _variant(model: nnx.Module, trainable: type, frozen: int, optimizer: object) -> tuple:
    """(jitted step, params, opt_state, model function) of one variant."""
    graphdef, params, rest = nnx.split(model, trainable, ...)
    # own buffers: the variants share the base's arrays, and a step donates its params
    params, rest = jax.tree.map(jnp.copy, (params, rest))
    apply_fn = model_logps(graphdef, rest, frozen)
    step = jax.jit(
        lambda f, p, o, b: make_train_step(sft_micro_loss(f), optimizer)(p, o, b, None),
        donate_argnums=(1, 2),
    )
    return step, params, jax.jit(optimizer.init)(params), apply_fn


def measure(frozen: int, rank: int, reps: int, rows: int, length: int) -> dict:
    """Median step seconds of full fine-tuning and LoRA, measured alternately."""
    config = smollm2_135m_config()
    base = init_random(config, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    lora = LoRAConfig(rank=rank, alpha=2 * rank, targets=tuple(TARGETS))
    optimizer = make_optimizer(StageConfig(learning_rate=1e-5), total_steps=1000)
    variants = {
        "full": _variant(base, nnx.Param, frozen, optimizer),
        "lora": _variant(add_lora(base, lora), LoRAParam, frozen, optimizer),
    }
    rng = np.random.default_rng(0)
    ids = rng.integers(3, config.vocab_size, size=(1, rows, length)).astype(np.int32)
    loss_mask = np.ones_like(ids)
    loss_mask[..., : length // 2] = 0
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": loss_mask}
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    times: dict[str, list[float]] = {name: [] for name in variants}
    state = {name: (v[1], v[2]) for name, v in variants.items()}
    for rep in range(reps + 1):  # the first call of each compiles
        for name, (step, _, _, apply_fn) in variants.items():
            t0 = time.perf_counter()
            params, opt_state, metrics = step(apply_fn, *state[name], batch)
            jax.block_until_ready((params, opt_state, metrics))
            if rep:
                times[name].append(time.perf_counter() - t0)
            state[name] = (params, opt_state)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "frozen_layers": frozen,
        "full_s": med["full"],
        "lora_s": med["lora"],
        "full_over_lora": med["full"] / med["lora"],
        "times": times,
    }


def main() -> None:
    """Prints the table (and writes it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    load_before = load_average()
    t0 = time.perf_counter()
    rows = [measure(f, args.rank, args.reps, args.rows, args.length) for f in (0, 20)]
    print(
        f"SmolLM2-135M shapes, {args.rows} x {args.length} tokens, bf16 compute, OGPSA flat k=2 + "
        f"clip + AdamW; LoRA r={args.rank} on all seven projections; median of {args.reps}"
    )
    print(f"load average before / after: {load_before} / {load_average()}")
    print("| layers trained | full step s | LoRA step s | full / LoRA |")
    print("|---|---|---|---|")
    for r in rows:
        trained = f"top {30 - r['frozen_layers']} of 30" if r["frozen_layers"] else "all 30"
        print(f"| {trained} | {r['full_s']:.2f} | {r['lora_s']:.2f} | {r['full_over_lora']:.2f}x |")
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
