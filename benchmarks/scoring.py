"""Log-likelihood scoring throughput: full logits vs lm_head on gathered rows vs shared prefix.

Question: how much faster does ``score_continuations`` score a multiple-choice workload when
each question runs once (prefill into a KV cache, then only the choice tokens) and the lm_head
runs only on the positions that predict continuation tokens? Expected: about k x fewer
question tokens for k choices, so 2-3x on a BBQ-like 3-choice workload on CPU; the gathered
lm_head alone saves the [B, L, V] logits (V = 49152), ~20% of the FLOPs at L ~ 128.

Three columns, same requests, same batch size, compile excluded (one warm-up call each); each
reports wall seconds and process CPU seconds per call (on a shared machine CPU time is the
steadier measure; the load average is printed):
- ``full logits``: the original path (every sequence whole, [B, L, V] logits, then the gather);
  run by wrapping the Decoder so ``score_continuations`` treats it as a generic model.
- ``gathered head``: ``shared_prefix=False`` (whole sequences, lm_head on C gathered rows).
- ``shared prefix``: the default (each distinct context once, then the continuations).

Workloads (SmolLM2-135M config, random weights, float32 parameters, bf16 compute as in the
demo): ``bbq`` = 24 items x 3 choices, contexts 80-120 tokens, choices 4-12 tokens;
``drift`` = 24 distinct contexts of 40-60 tokens, each with one 32-token answer.

Command (from the repository root):

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/scoring.py

Options: --workload bbq|drift|both (default bbq), --iters N (timed calls, default 1),
--batch-size (default 16), --dtype bfloat16|float32.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from ogpsa_jax.eval.scoring import score_continuations  # noqa: E402
from ogpsa_jax.models import init_random, smollm2_135m_config  # noqa: E402


class FullLogits(nnx.Module):
    """Hides the Decoder type: ``score_continuations`` then runs its generic full-logits path."""

    def __init__(self, inner: nnx.Module):
        self.inner = inner

    def __call__(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask)


def workload(name: str, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """Random-token (context, continuation) requests shaped like the demo's evaluations."""
    rng = np.random.default_rng(seed)
    tokens = lambda lo, hi: rng.integers(3, vocab, size=int(rng.integers(lo, hi + 1))).tolist()
    if name == "bbq":
        return [(ctx, tokens(4, 12)) for ctx in (tokens(80, 120) for _ in range(24)) for _ in "abc"]
    if name == "drift":
        return [(tokens(40, 60), tokens(32, 32)) for _ in range(24)]
    raise ValueError(f"unknown workload {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="bbq", choices=["bbq", "drift", "both"])
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()

    config = smollm2_135m_config()
    model = init_random(config, seed=0, dtype=jnp.dtype(args.dtype))
    paths = {
        "full logits": (FullLogits(model), {}),
        "gathered head": (model, {"shared_prefix": False}),
        "shared prefix": (model, {}),
    }
    print(f"load average at start: {os.getloadavg()}")
    print(f"SmolLM2-135M config, random weights, {args.dtype} compute, batch {args.batch_size}")
    for name in ["bbq", "drift"] if args.workload == "both" else [args.workload]:
        reqs = workload(name, config.vocab_size)
        n_tok = sum(len(c) + len(x) for c, x in reqs)
        print(f"\nworkload {name}: {len(reqs)} requests, {n_tok} tokens")
        rates, cpu_rates, results = {}, {}, {}
        for label, (m, kw) in paths.items():
            run = lambda m=m, kw=kw, reqs=reqs: score_continuations(
                m, reqs, batch_size=args.batch_size, length_bucket=32, **kw
            )
            start = time.perf_counter()
            results[label] = run()  # compile + first run
            first = time.perf_counter() - start
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.iters):
                run()
            secs = (time.perf_counter() - start) / args.iters
            cpu = (time.process_time() - cpu) / args.iters
            rates[label] = len(reqs) / secs
            cpu_rates[label] = len(reqs) / cpu
            print(
                f"  {label:14s} {rates[label]:7.2f} seq/s"
                f"  ({secs:6.2f} s/call, {cpu:6.2f} CPU s/call, first call {first:.1f} s)"
            )
        for kind, r in (("wall", rates), ("CPU", cpu_rates)):
            ratios = "  ".join(f"{k}: {v / r['full logits']:.2f}x" for k, v in r.items())
            print(f"  {kind} time vs full logits: {ratios}")
        ref = results["full logits"]["logprob"]
        for label in ("gathered head", "shared prefix"):
            diff = np.abs(results[label]["logprob"] - ref)
            print(
                f"  max |logprob - full logits| {label}: {diff.max():.3g}"
                f" (mean |logprob| {np.abs(ref).mean():.1f})"
            )
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
