"""Benchmark: evaluation with float32 parameter storage vs parameters stored at the compute dtype.

Question: how much faster do the evaluation's two workloads -- greedy generation with a KV cache
and log-likelihood scoring -- run when the parameters are stored in bfloat16
(`ogpsa_jax.models.at_compute_dtype`, what `ogpsa_jax.eval.evaluate_alignment` does) instead of
the float32 master weights that every forward casts to bfloat16? The outputs are bit-identical
(checked here). Expected: decoding reads every weight once per token, so about half the bytes
per step; scoring amortises the casts over many tokens and gains less.

Measured side by side in one run, interleaved call by call (medians of ``--reps``), compile
excluded (one warm-up call each): SmolLM2-135M's architecture with random weights, bfloat16
compute, on the shapes of the frontier study's evaluation -- ``refusal``: 72 prompts of ~96
tokens in batches of 32, 32 new tokens; ``ifeval``: 8 prompts, 64 new tokens; ``bbq``: 24
three-choice items scored in batches of 16 (`benchmarks/scoring.py`'s workload). No EOS is
given, so every call decodes its full length.

Command (from the repository root):

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/eval_speed.py [--reps 3]
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.scoring import workload  # noqa: E402
from ogpsa_jax.eval.scoring import score_continuations  # noqa: E402
from ogpsa_jax.models import (  # noqa: E402
    at_compute_dtype,
    generate,
    init_random,
    smollm2_135m_config,
)


def generation_call(model, prompts: np.ndarray, batch: int, new_tokens: int):
    """Greedy generation over ``prompts`` in batches; returns the new tokens."""

    def run():
        outs = []
        for i in range(0, len(prompts), batch):
            ids = jnp.asarray(prompts[i : i + batch])
            outs.append(
                generate(model, ids, jnp.ones_like(ids), max_new_tokens=new_tokens, eos_token_id=-1)
            )
        return np.concatenate([np.asarray(jax.block_until_ready(o)) for o in outs])

    return run


def scoring_call(model, requests, batch: int):
    """The log-likelihoods of (context, continuation) requests."""
    return lambda: score_continuations(model, requests, batch_size=batch)["logprob"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    config = smollm2_135m_config()
    stored32 = init_random(config, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    stored16 = at_compute_dtype(stored32)
    rng = np.random.default_rng(0)
    refusal = rng_prompts(rng, 72, 96, config.vocab_size)
    ifeval = rng_prompts(rng, 8, 96, config.vocab_size)
    bbq = workload("bbq", config.vocab_size)
    work = {
        "refusal": lambda m: generation_call(m, refusal, 32, 32),
        "ifeval": lambda m: generation_call(m, ifeval, 8, 64),
        "bbq": lambda m: scoring_call(m, bbq, 16),
    }
    print(f"load average {os.getloadavg()[0]:.2f}; {jax.devices()[0].platform}; bfloat16 compute")
    print(f"{'workload':<10}{'float32 storage s':>19}{'bfloat16 storage s':>20}{'speed-up':>10}")
    for name, make in work.items():
        calls = {"f32": make(stored32), "bf16": make(stored16)}
        outs = {k: c() for k, c in calls.items()}  # warm-up (compile)
        if not np.array_equal(outs["f32"], outs["bf16"]):
            raise SystemExit(f"{name}: outputs differ between the storages")
        times = {k: [] for k in calls}
        for _ in range(args.reps):
            for k, c in calls.items():
                t = time.perf_counter()
                c()
                times[k].append(time.perf_counter() - t)
        a, b = statistics.median(times["f32"]), statistics.median(times["bf16"])
        print(f"{name:<10}{a:>19.2f}{b:>20.2f}{a / b:>9.2f}x")
    print("outputs: identical for every workload")


def rng_prompts(rng: np.random.Generator, n: int, length: int, vocab: int) -> np.ndarray:
    """``n`` random-token prompts of ``length`` tokens."""
    return rng.integers(3, vocab, size=(n, length)).astype(np.int32)


if __name__ == "__main__":
    main()
