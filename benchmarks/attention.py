"""Benchmark: the decoder's causal attention in query blocks vs one L x L block.

Question: how much does running the causal attention in blocks of query rows, each against the
keys up to its last row (`Decoder.attention_chunk`, auto by default), save over one L x L block
that computes and then masks the upper triangle? Expected: up to ~2x on the attention's
FLOPs at long sequences, plus a smaller working set.

Measured side by side in one run, interleaved call by call (medians): forward + backward of the
decoder stack without the lm_head (`hidden_states`, loss = mean of h^2) for SmolLM2-135M's
layer shapes (9 heads, 3 KV heads, head_dim 64, hidden 576, MLP 1536) with ``--layers`` layers,
float32, at 256 / 1024 / 2048 tokens with the batch holding ~2048 tokens, for block rows 0 (one
block), 64, 128 and auto. Also prints the compile time of each variant (the blocks are
unrolled, so their count sets it).

Command::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/attention.py [--layers 2] [--reps 5]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ogpsa_jax.models import init_random, smollm2_135m_config  # noqa: E402
from ogpsa_jax.models.functional import hidden_states  # noqa: E402
from ogpsa_jax.models.layers import attention_chunk_rows  # noqa: E402

LENGTHS = {256: 8, 1024: 2, 2048: 1}  # tokens per row -> rows (~2048 tokens per call)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    cfg = smollm2_135m_config().replace(num_layers=args.layers)
    params = init_random(cfg, seed=0, dtype=jnp.float32).params()
    print(f"SmolLM2-135M layer shapes, {args.layers} layers, float32, fwd+bwd of hidden_states")
    print("| tokens x rows | block rows | compile (s) | fwd+bwd (ms) | vs one block |")
    print("|---|---|---|---|---|")
    for length, rows in LENGTHS.items():
        ids = jax.random.randint(jax.random.key(length), (rows, length), 0, cfg.vocab_size)
        mask = jnp.ones((rows, length), jnp.int32)
        auto = attention_chunk_rows(length)
        settings = {"0 (one block)": 0, "64": 64, "128": 128, f"auto ({auto})": -1}
        compiled, compile_s = {}, {}
        for label, chunk in settings.items():

            def loss(p, chunk=chunk, ids=ids, mask=mask):
                h = hidden_states(p, cfg, jnp.float32, ids, mask, attention_chunk=chunk)
                return jnp.mean(jnp.square(h))

            t0 = time.perf_counter()
            compiled[label] = jax.jit(jax.grad(loss)).lower(params).compile()
            compile_s[label] = time.perf_counter() - t0
            jax.block_until_ready(compiled[label](params))
        times: dict[str, list[float]] = {label: [] for label in compiled}
        for _ in range(args.reps):
            for label, fn in compiled.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(params))
                times[label].append(time.perf_counter() - t0)
        base = statistics.median(times["0 (one block)"])
        for label, ts in times.items():
            med = statistics.median(ts)
            print(
                f"| {length} x {rows} | {label} | {compile_s[label]:.1f} | {1e3 * med:.0f} | "
                f"{base / med:.2f}x |"
            )
    print(f"jax {jax.__version__}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
