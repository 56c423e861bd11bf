"""Memory: LoRA adapters vs full fine-tuning, for SmolLM2-135M and Qwen2.5-7B, without allocating.

Question: how many bytes do the trainable parameters, their AdamW state and the OGPSA basis take
with LoRA (rank 16 on all seven projections: q, k, v, o, gate, up, down) against full
fine-tuning? The basis is the optimizer state the projection adds: the flat basis with k = 2
(the reference code's SFT basis: two copies of every trainable tensor) and the matrix basis of
rank 64 (one ``V`` (d_in, 64) per projected matrix: with LoRA one per adapter A, (L, d_in, 64),
and one per B, (L, r, 64)), float32, as `ogpsa_jax.basis_nbytes` counts them.
Everything is abstract (`nnx.eval_shape` of the decoder with adapters, `jax.eval_shape` of
`optax.adamw(...).init` on the trainable state), so the 7B model is never materialised.
Parameters are float32 (the library's default `param_dtype`); the frozen base weights stay in
memory with LoRA but get no gradients and no optimizer state (the last column adds them up:
full = weights + gradients + AdamW; LoRA = base and adapter weights + adapter gradients and
AdamW; activations not counted).

Command::

    OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/lora_memory.py [--rank 16] [--json out.json]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ogpsa_jax import basis_nbytes, ogpsa, ogpsa_matrix  # noqa: E402
from ogpsa_jax.models import (  # noqa: E402
    Decoder,
    LoRAConfig,
    LoRAParam,
    add_lora,
    qwen2_5_7b_config,
    smollm2_135m_config,
)
from ogpsa_jax.models.lora import TARGETS  # noqa: E402

MODELS = {"SmolLM2-135M": smollm2_135m_config, "Qwen2.5-7B": qwen2_5_7b_config}


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(name: str, rank: int) -> dict[str, float]:
    """Abstract bytes of one model: parameters, adapters, and AdamW states of each."""
    config = MODELS[name]()
    lora = LoRAConfig(rank=rank, alpha=2 * rank, targets=tuple(TARGETS))
    model = nnx.eval_shape(lambda: add_lora(Decoder(config, rngs=nnx.Rngs(0)), lora))
    full = nnx.state(model, nnx.Param, ...)[0]  # base weights and adapters
    base = nnx.split(model, LoRAParam, nnx.Param, ...)[2]
    adapters = nnx.state(model, LoRAParam)
    adamw = optax.adamw(1e-4)

    def basis(tx: optax.GradientTransformation, tree: object) -> int:
        return basis_nbytes(jax.eval_shape(tx.init, tree))

    return {
        "full_flat2_bytes": basis(ogpsa(2), base),
        "lora_flat2_bytes": basis(ogpsa(2), adapters),
        "full_matrix64_bytes": basis(ogpsa_matrix(64), base),
        "lora_matrix64_bytes": basis(ogpsa_matrix(64), adapters),
        "base_params": sum(x.size for x in jax.tree.leaves(base)),
        "lora_params": sum(x.size for x in jax.tree.leaves(adapters)),
        "full_param_bytes": _bytes(base),
        "full_adamw_bytes": _bytes(jax.eval_shape(adamw.init, base)),
        "lora_param_bytes": _bytes(adapters),
        "lora_adamw_bytes": _bytes(jax.eval_shape(adamw.init, adapters)),
        "with_adapters_param_bytes": _bytes(full),
    }


def main() -> None:
    """Prints the table (and writes it as JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gib, mib = 1024**3, 1024**2
    rows = {name: measure(name, args.rank) for name in MODELS}
    print(f"LoRA r={args.rank} on q, k, v, o, gate, up, down; float32 parameters; AdamW (mu, nu)")
    print(
        "| model | trainable params, full / LoRA | trainable bytes, full / LoRA "
        "| AdamW state, full / LoRA | AdamW ratio | weights + grads + AdamW, full / LoRA |"
    )
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        full_total = 2 * r["full_param_bytes"] + r["full_adamw_bytes"]
        lora_total = r["with_adapters_param_bytes"] + r["lora_param_bytes"] + r["lora_adamw_bytes"]
        r["full_total_bytes"], r["lora_total_bytes"] = full_total, lora_total
        print(
            f"| {name} | {r['base_params'] / 1e6:,.1f}M / {r['lora_params'] / 1e6:,.2f}M "
            f"| {r['full_param_bytes'] / gib:.2f} GiB / {r['lora_param_bytes'] / mib:.1f} MiB "
            f"| {r['full_adamw_bytes'] / gib:.2f} GiB / {r['lora_adamw_bytes'] / mib:.1f} MiB "
            f"| {r['full_adamw_bytes'] / r['lora_adamw_bytes']:.0f}x "
            f"| {full_total / gib:.2f} / {lora_total / gib:.2f} GiB |"
        )
    print()
    print("OGPSA basis (float32), full / LoRA, and the whole optimizer state (AdamW + basis)")
    print(
        "| model | flat k=2 basis, full / LoRA | matrix rank-64 basis, full / LoRA "
        "| AdamW + flat k=2, full / LoRA | ratio | AdamW + matrix 64, full / LoRA | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        full_f, lora_f = (r[f"{m}_adamw_bytes"] + r[f"{m}_flat2_bytes"] for m in ("full", "lora"))
        full_m, lora_m = (
            r[f"{m}_adamw_bytes"] + r[f"{m}_matrix64_bytes"] for m in ("full", "lora")
        )
        print(
            f"| {name} | {r['full_flat2_bytes'] / gib:.2f} GiB / "
            f"{r['lora_flat2_bytes'] / mib:.1f} MiB "
            f"| {r['full_matrix64_bytes'] / mib:.1f} / {r['lora_matrix64_bytes'] / mib:.1f} MiB "
            f"| {full_f / gib:.2f} GiB / {lora_f / mib:.1f} MiB | {full_f / lora_f:.0f}x "
            f"| {full_m / gib:.2f} GiB / {lora_m / mib:.1f} MiB | {full_m / lora_m:.0f}x |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rank": args.rank, "models": rows}, f, indent=2)


if __name__ == "__main__":
    main()
