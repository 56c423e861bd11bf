"""Benchmark: step time of rematerialisation and the chunked loss, side by side, on SmolLM2-135M.

Question: what do ``model.remat`` ("block", "dots") and ``model.loss_chunk`` cost in step time,
against the plain step, on a real model? Remat recomputes each layer's forward in the backward
pass (expected: at most one more forward, ~1.3x of a forward + backward); the chunked loss
recomputes the lm_head once per chunk (SmolLM2's 49,152-word head is ~1/4 of its flops).

The SFT step of `ogpsa_jax.train` (built with the loop's builders: `model_logps`,
`make_micro_loss`, `jit_step`; (params, opt_state) donated) on SmolLM2-135M with random
weights, every layer trained, OGPSA off, one micro-batch of ``--rows`` x ``--length`` tokens,
on one CPU device; the variants are interleaved call by call over one shared parameter / AdamW
carry, for ``--reps`` rounds after a warm-up; medians, and the spread (min..max) of the
per-round ratios to ``none``. Also printed: each variant's planned temporaries per device
(XLA's memory analysis of the same compiled step).

Command (from the repository root)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/remat.py [--rows 4] [--length 256] \\
        [--reps 3] [--dtype float32]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ogpsa_jax.models import init_random, make_mesh, smollm2_135m_config  # noqa: E402
from ogpsa_jax.train import OGPSAConfig, StageConfig, make_optimizer  # noqa: E402
from ogpsa_jax.train.sharding import batch_shardings, opt_shardings, place  # noqa: E402
from ogpsa_jax.train.stage import jit_step, make_micro_loss, model_logps  # noqa: E402

VARIANTS = {  # name -> (remat, loss_chunk)
    "none": ("none", 0),
    "block": ("block", 0),
    "dots": ("dots", 0),
    "chunk64": ("none", 64),
    "block+chunk64": ("block", 64),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args()
    print(f"load average at start: {os.getloadavg()}", flush=True)
    mesh = make_mesh((1, 1, 1))
    stage = StageConfig(
        batch_size=args.rows,
        accum_steps=1,
        max_length=args.length,
        ogpsa=OGPSAConfig(enabled=False),
    )
    with jax.set_mesh(mesh):
        model = init_random(smollm2_135m_config(), dtype=jnp.dtype(args.dtype), mesh=mesh)
        graphdef0, params, rest = nnx.split(model, nnx.Param, ...)
        optimizer = make_optimizer(stage, 100)
        param_sh = jax.tree.map(lambda x: x.sharding, params)
        opt_sh = opt_shardings(jax.eval_shape(optimizer.init, params), params, mesh)
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
        ranks = {"input_ids": 3, "attention_mask": 3, "loss_mask": 3}
        batch_sh = batch_shardings(mesh, args.rows, ranks)
        rng = np.random.default_rng(0)
        shape = (1, args.rows, args.length)
        ids = rng.integers(3, 49152, size=shape).astype(np.int32)
        host = {"input_ids": ids, "attention_mask": np.ones(shape, np.int32)}
        host["loss_mask"] = np.concatenate(
            [np.zeros((*shape[:2], args.length // 4), np.int32),
             np.ones((*shape[:2], args.length - args.length // 4), np.int32)], axis=-1
        )  # fmt: skip
        batch = place(host, batch_sh)
        steps, temps = {}, {}
        for name, (remat, chunk) in VARIANTS.items():
            model.remat, model.loss_chunk = remat, chunk
            graphdef = nnx.split(model, nnx.Param, ...)[0]
            micro_of = lambda fn: make_micro_loss("sft", stage, fn)  # noqa: E731
            logps = model_logps(graphdef, rest, 0)
            step = jit_step(micro_of, logps, optimizer, mesh, batch_sh, param_sh, opt_sh, False)
            compiled = step.lower(params, opt_state, batch, None).compile()
            temps[name] = compiled.memory_analysis().temp_size_in_bytes
            steps[name] = compiled
        del graphdef0

        def call(name, params, opt_state):
            params, opt_state, metrics = steps[name](params, opt_state, batch, None)
            jax.block_until_ready(metrics)
            return params, opt_state

        for name in VARIANTS:  # warm-up
            params, opt_state = call(name, params, opt_state)
        times = {name: [] for name in VARIANTS}
        for _ in range(args.reps):
            for name in VARIANTS:
                t0 = time.perf_counter()
                params, opt_state = call(name, params, opt_state)
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["none"])
    print(f"SmolLM2-135M SFT step, {args.rows} x {args.length} tokens, {args.dtype}, "
          f"{args.reps} rounds; load average at end: {os.getloadavg()}")  # fmt: skip
    print("| variant | remat | loss_chunk | step s (median) | / none | spread | temporaries MB |")
    print("|---|---|---:|---:|---:|---|---:|")
    for name, (remat, chunk) in VARIANTS.items():
        med = statistics.median(times[name])
        ratios = [t / b for t, b in zip(times[name], times["none"], strict=True)]
        print(
            f"| {name} | {remat} | {chunk} | {med:.2f} | {med / base:.3f} "
            f"| {min(ratios):.3f}..{max(ratios):.3f} | {temps[name] / 1e6:.0f} |"
        )


if __name__ == "__main__":
    main()
