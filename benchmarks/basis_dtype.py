"""Benchmark: what a bfloat16 basis costs in exactness, and what it saves in memory (SmolLM2-135M).

Question: with ``ogpsa.basis_dtype=bfloat16`` the basis is stored in half the bytes while the
coefficients ``<g, u_i>`` and the subtraction stay float32; how much of the protected
directions does the projected gradient keep?

On SmolLM2-135M-Instruct (the offline weights, every layer trained, bf16 compute), the SFT
stage's refresh of the ``smollm2`` preset (Gram-Schmidt, k = 2, the training loop's
`make_gradient_refresh` on its reference rows) fills a float32 and a bfloat16 optimizer state;
the gradient ``g`` of one safety-SFT batch is projected by each (the optimizer's projection,
as in the step). Printed: ``max_i |<Pg, u_i>| / ||g||`` over every leaf and direction, against
the stored basis and against the float32 basis (the directions the method means to protect),
the same per leaf (``/ ||g_leaf||``), and the basis bytes.

Command (from the repository root)::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/basis_dtype.py [--reference-rows 16]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ogpsa_jax.models import make_mesh  # noqa: E402
from ogpsa_jax.projection import basis_nbytes, get_basis  # noqa: E402
from ogpsa_jax.train import apply_overrides, preset  # noqa: E402
from ogpsa_jax.train.inputs import load_inputs  # noqa: E402
from ogpsa_jax.train.optimizer import make_optimizer  # noqa: E402
from ogpsa_jax.train.sharding import place, rows_sharding  # noqa: E402
from ogpsa_jax.train.stage import build_stage, model_logps  # noqa: E402
from ogpsa_jax.train.step import make_ref_grad_fn  # noqa: E402

F32 = jnp.float32


def residuals(pg, g, basis) -> tuple[float, float]:
    """(max |<pg, u>| / ||g||, max over leaves of |<pg_leaf, u_leaf>| / ||g_leaf||)."""
    norm = float(jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(F32))) for x in jax.tree.leaves(g))))
    glob, per_leaf = 0.0, 0.0
    for j, (p, x) in enumerate(zip(jax.tree.leaves(pg), jax.tree.leaves(g), strict=True)):
        leaf_norm = float(jnp.sqrt(jnp.sum(jnp.square(x.astype(F32)))))
        for tree in basis:
            u = jax.tree.leaves(tree)[j]
            c = abs(float(jnp.sum(p.astype(F32) * u.astype(F32))))
            glob = max(glob, c / norm)
            if leaf_norm > 0:
                per_leaf = max(per_leaf, c / leaf_norm)
    return glob, per_leaf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference-rows", type=int, default=16)
    args = ap.parse_args()
    mesh = make_mesh((1, 1, 1))
    out = {}
    g = None
    for dtype in ("float32", "bfloat16"):
        config = apply_overrides(
            preset("smollm2"),
            [
                "num_devices=1",
                "mesh=1,1,1",
                "model.frozen_layers=0",
                f"sft.ogpsa.basis_dtype={dtype}",
                f"sft.ogpsa.reference_rows={args.reference_rows}",
            ],
        )
        inputs = load_inputs("sft", config)
        with tempfile.TemporaryDirectory() as tmp, jax.set_mesh(mesh):
            stage, carry = build_stage("sft", config, inputs, mesh, tmp, inputs.model_path)
            opt_state, _ = stage.refresh(carry.params, carry.opt_state)
            if g is None:
                host = stage.batches.next_step(1)
                micro = {k: v[0] for k, v in host.items()}
                rows = rows_sharding(mesh, micro["input_ids"].shape[0], 2, 0)
                grad_fn = jax.jit(make_ref_grad_fn(model_logps(stage.graphdef, stage.rest, 0)))
                g = grad_fn(carry.params, place(micro, rows))[0]
            projection = make_optimizer(config.sft, 10).projection
            pg, _ = projection.update(g, opt_state[0], carry.params)
            out[dtype] = dict(pg=pg, basis=get_basis(opt_state), nbytes=basis_nbytes(opt_state))
    b32 = out["float32"]["basis"]
    print("| basis dtype | basis MB | max abs <Pg,u>/abs g (stored basis) | same, float32 basis "
          "| per leaf (stored) | per leaf (float32 basis) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, r in out.items():
        stored = residuals(r["pg"], g, r["basis"])
        exact = residuals(r["pg"], g, b32)
        print(
            f"| {dtype} | {r['nbytes'] / 1e6:.0f} | {stored[0]:.2e} | {exact[0]:.2e} "
            f"| {stored[1]:.2e} | {exact[1]:.2e} |"
        )
    print(f"bf16 / float32 basis bytes: {out['bfloat16']['nbytes'] / out['float32']['nbytes']:.3f}")
    print(f"load average: {os.getloadavg()}")


if __name__ == "__main__":
    main()
