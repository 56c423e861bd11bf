"""Decoder throughput on CPU: our JAX decoder vs the transformers PyTorch model, side by side.

Question: is our jitted Flax NNX decoder at least as fast as transformers' PyTorch model on CPU
for the sizes the demo uses? Expected: similar or faster (scanned layers, 2-D matmuls).

Forward and forward+backward (next-token cross-entropy) tokens/s, float32 and bf16 compute,
batch 4 x 128, random weights, for a ~20M config and the SmolLM2-135M config. Both sides use
2 threads: XLA on the 2 cores it is pinned to, PyTorch with torch.set_num_threads(2). The
PyTorch side runs as a subprocess in the Python 3.11 fixture env (`make fixtures-env`).

Command (from the repository root):

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/model_throughput.py

Options: --iters N (timed iterations, default 3), --configs 20m,135m, --skip-torch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH, LENGTH = 4, 128


def hf_config_dict(name: str) -> dict:
    """The HF config.json dict of a benchmark config (built with our DecoderConfig)."""
    sys.path.insert(0, ROOT)
    from ogpsa_jax.models.config import DecoderConfig, smollm2_135m_config

    if name == "135m":
        return smollm2_135m_config().to_hf_dict()
    cfg = DecoderConfig(
        architecture="llama",
        vocab_size=16384,
        hidden_size=384,
        intermediate_size=1024,
        num_layers=8,
        num_heads=6,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
    )
    return cfg.to_hf_dict()


def _time(fn, iters: int) -> float:
    fn()  # compile / warm up
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _jax_rates(cfg, dtype, ids, mask, iters: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from ogpsa_jax.models import init_random, sequence_logprobs

    graphdef, state = nnx.split(init_random(cfg, seed=0, dtype=dtype))

    @jax.jit
    def fwd(state, ids):
        return nnx.merge(graphdef, state)(ids, mask)

    @jax.jit
    def fwd_bwd(state, ids):
        def loss(state):
            logits = nnx.merge(graphdef, state)(ids, mask)
            total, count = sequence_logprobs(logits, ids, mask)
            return -jnp.sum(total) / jnp.sum(count)

        return jax.value_and_grad(loss)(state)

    t_fwd = _time(lambda: jax.block_until_ready(fwd(state, ids)), iters)
    t_bwd = _time(lambda: jax.block_until_ready(fwd_bwd(state, ids)), iters)
    return BATCH * LENGTH / t_fwd, BATCH * LENGTH / t_bwd


def run_jax(hf_config: dict, iters: int) -> dict[str, float]:
    """Tokens/s of our decoder for fwd / fwd+bwd in float32 and bf16 compute."""
    import jax
    import jax.numpy as jnp

    from ogpsa_jax.models import DecoderConfig

    cfg = DecoderConfig.from_hf(hf_config)
    ids = jax.random.randint(jax.random.key(0), (BATCH, LENGTH), 0, cfg.vocab_size)
    mask = jnp.ones_like(ids)
    out = {}
    for dtype_name, dtype in (("f32", jnp.float32), ("bf16", jnp.bfloat16)):
        fwd, fwd_bwd = _jax_rates(cfg, dtype, ids, mask, iters)
        out[f"fwd_{dtype_name}"], out[f"fwdbwd_{dtype_name}"] = fwd, fwd_bwd
    return out


def torch_worker(hf_config: dict, iters: int) -> None:
    """(Runs in .venv311.) Prints the same measurements for transformers' PyTorch model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = AutoConfig.for_model(**hf_config)
    ids = torch.randint(0, config.vocab_size, (BATCH, LENGTH))
    out = {}
    for dtype_name, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_config(config).to(dtype)

        def fwd(model=model):
            with torch.no_grad():
                return model(input_ids=ids).logits.float()

        def fwd_bwd(model=model):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            return loss

        out[f"fwd_{dtype_name}"] = BATCH * LENGTH / _time(fwd, iters)
        out[f"fwdbwd_{dtype_name}"] = BATCH * LENGTH / _time(fwd_bwd, iters)
    sys.stdout.write(json.dumps(out) + "\n")


def run_torch(hf_config: dict, iters: int) -> dict[str, float] | None:
    """Runs `torch_worker` in the 3.11 env; None when that env is missing."""
    py = os.path.join(ROOT, ".venv311", "bin", "python")
    if not os.path.exists(py):
        return None
    cmd = [py, os.path.abspath(__file__), "--torch-worker", json.dumps(hf_config)]
    cmd += ["--iters", str(iters)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    """Prints the side-by-side table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--configs", default="20m,135m")
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_worker:
        torch_worker(json.loads(args.torch_worker), args.iters)
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:2]))
    rows = []
    for name in args.configs.split(","):
        hf_config = hf_config_dict(name)
        ours = run_jax(hf_config, args.iters)
        theirs = None if args.skip_torch else run_torch(hf_config, args.iters)
        for key, value in ours.items():
            ref = theirs[key] if theirs else float("nan")
            rows.append((name, key, value, ref, value / ref))
    header = (
        f"| config | measure (batch {BATCH}x{LENGTH}) | ours tok/s | torch tok/s | ours/torch |"
    )
    lines = [header, "| --- | --- | ---: | ---: | ---: |"]
    for name, key, value, ref, ratio in rows:
        lines.append(f"| {name} | {key} | {value:,.0f} | {ref:,.0f} | {ratio:.2f} |")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
