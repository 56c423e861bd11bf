"""Continual-learning check: which capability subspace protects an old task best?

Question: after learning task A (sklearn's bundled 8x8 digits) an MLP learns task B (the same
digits under a fixed random pixel permutation, same 10-way head). How much task-A accuracy does
each gradient projection keep, and what does it cost on task B?

Methods (all plain SGD with momentum on task B; the basis is estimated once, at the end of
task A, on a 200-example task-A reference set):
  naive              no projection.
  flat_k1            flat OGPSA, k = 1: the mean reference gradient (the reference code, DPO).
  flat_k2            flat OGPSA, k = 2: the means of two reference halves, Gram-Schmidt (SFT).
  flat_svd           flat OGPSA: top directions (SVD, energy 0.97, k <= 8) of 16 per-batch
                     reference gradients.
  matrix_gradient    matrix OGPSA: per weight matrix, top input-space directions of the 16
                     stacked per-batch reference gradients (energy 0.97, rank <= 48).
  matrix_activation  matrix OGPSA (GPM): top directions of each layer's reference inputs
                     (energy 0.97, rank <= 48).
  replay             no projection; each task-B batch also holds 16 examples of a 200-example
                     task-A buffer.

Metrics, as in GPM's tables: old_acc (task A after B), new_acc (task B after B),
acc = (old_acc + new_acc) / 2, bwt = old_acc - (task A accuracy after A). Held-out 30% split.

Expected: projections that keep more of the old task's input space forget less; the rank-1 mean
gradient (near a minimum, almost no information) protects little.

Command (about 1-2 minutes on 2 CPU cores):
    OPENBLAS_NUM_THREADS=1 .venv/bin/python experiments/permuted_digits.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

from ogpsa_jax.bases import (  # noqa: E402
    capability_basis,
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)
from ogpsa_jax.projection import ogpsa, ogpsa_matrix, set_basis  # noqa: E402

logger = logging.getLogger(__name__)

METHODS = (
    "naive",
    "flat_k1",
    "flat_k2",
    "flat_svd",
    "matrix_gradient",
    "matrix_activation",
    "replay",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)  # one run per seed (init, split, permutation, batches)
    methods: tuple[str, ...] = METHODS  # which task-B methods to run
    hidden: int = 256  # width of both hidden layers: 64-hidden-hidden-10
    steps_a: int = 600  # SGD steps on task A
    steps_b: int = 600  # SGD steps on task B
    batch_size: int = 64  # examples per step
    learning_rate: float = 0.05  # SGD learning rate (both tasks)
    momentum: float = 0.9  # SGD momentum (a fixed basis keeps momentum in the complement)
    ref_size: int = 200  # task-A reference examples for every basis (and the replay buffer)
    ref_batches: int = 16  # per-batch reference gradients for flat_svd / matrix_gradient
    energy: float = 0.97  # GPM's energy threshold for the svd / matrix bases
    flat_svd_k: int = 8  # cap on flat_svd directions per tensor
    matrix_rank: int = 48  # cap on matrix-basis directions per layer
    replay_per_batch: int = 16  # task-A buffer examples added to each task-B batch
    test_fraction: float = 0.3  # held-out share of the digits


def _init_mlp(key: jax.Array, hidden: int) -> dict[str, jax.Array]:
    sizes = [(64, hidden), (hidden, hidden), (hidden, 10)]
    keys = jax.random.split(key, len(sizes))
    params = {}
    for i, ((d_in, d_out), k) in enumerate(zip(sizes, keys, strict=True), start=1):
        params[f"w{i}"] = jax.random.normal(k, (d_in, d_out)) * jnp.sqrt(2.0 / d_in)
        params[f"b{i}"] = jnp.zeros(d_out)
    return params


def _layer_inputs(params: dict[str, jax.Array], x_BxD: jax.Array) -> dict[str, Any]:
    """Inputs of each linear layer (the activations GPM protects); None for the biases."""
    h1 = jax.nn.relu(x_BxD @ params["w1"] + params["b1"])
    h2 = jax.nn.relu(h1 @ params["w2"] + params["b2"])
    return {"w1": x_BxD, "w2": h1, "w3": h2, "b1": None, "b2": None, "b3": None}


def _logits(params: dict[str, jax.Array], x_BxD: jax.Array) -> jax.Array:
    h2 = _layer_inputs(params, x_BxD)["w3"]
    return h2 @ params["w3"] + params["b3"]


def _loss(params: dict[str, jax.Array], x_BxD: jax.Array, y_B: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(_logits(params, x_BxD), y_B).mean()


@jax.jit
def _accuracy(params: dict[str, jax.Array], x_BxD: jax.Array, y_B: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(_logits(params, x_BxD), -1) == y_B)


def _train(
    params: dict[str, jax.Array],
    opt: optax.GradientTransformation,
    opt_state: Any,
    x_SxBxD: jax.Array,
    y_SxB: jax.Array,
) -> dict[str, jax.Array]:
    """SGD over pre-drawn batches (steps on the leading axis) under one lax.scan."""

    def step(carry, batch):
        p, s = carry
        grads = jax.grad(_loss)(p, *batch)
        updates, s = opt.update(grads, s, p)
        return (optax.apply_updates(p, updates), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt_state), (x_SxBxD, y_SxB))
    return params


def _batches(rng: np.random.Generator, n: int, steps: int, size: int) -> np.ndarray:
    return np.stack([rng.choice(n, size, replace=False) for _ in range(steps)])


def _bases(
    cfg: Config, params: dict[str, jax.Array], x_ref: jax.Array, y_ref: jax.Array
) -> dict[str, Any]:
    """The basis of every projection method in ``cfg.methods``, estimated at the task-A
    solution on the reference set."""
    grad = jax.jit(jax.grad(_loss))
    half = len(y_ref) // 2
    chunks = np.array_split(np.arange(len(y_ref)), cfg.ref_batches)
    per_batch = lambda: [grad(params, x_ref[c], y_ref[c]) for c in chunks]
    makers = {
        "flat_k1": lambda: capability_basis([grad(params, x_ref, y_ref)], k=1),
        "flat_k2": lambda: capability_basis(
            [grad(params, x_ref[:half], y_ref[:half]), grad(params, x_ref[half:], y_ref[half:])],
            k=2,
        ),
        "flat_svd": lambda: capability_basis(
            per_batch(), k=cfg.flat_svd_k, method="svd", energy=cfg.energy
        ),
        "matrix_gradient": lambda: matrix_basis_from_gradients(
            per_batch(), k=cfg.matrix_rank, energy=cfg.energy
        ),
        "matrix_activation": lambda: matrix_basis_from_activations(
            collect_inputs(lambda x: _layer_inputs(params, x), [x_ref]),
            k=cfg.matrix_rank,
            energy=cfg.energy,
        ),
    }
    return {m: makers[m]() for m in cfg.methods if m in makers}


def _optimizer(cfg: Config, method: str) -> optax.GradientTransformation:
    sgd = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    if method == "flat_k1":
        return optax.chain(ogpsa(1), sgd)
    if method == "flat_k2":
        return optax.chain(ogpsa(2), sgd)
    if method == "flat_svd":
        return optax.chain(ogpsa(cfg.flat_svd_k), sgd)
    if method.startswith("matrix_"):
        return optax.chain(ogpsa_matrix(cfg.matrix_rank), sgd)
    return sgd


def run_seed(cfg: Config, seed: int) -> list[dict[str, Any]]:
    """Trains task A once, then task B with every method; returns one record per method."""
    rng = np.random.default_rng(seed)
    digits = load_digits()
    x_all = (digits.data / 16.0).astype(np.float32)
    y_all = digits.target.astype(np.int32)
    order = rng.permutation(len(y_all))
    n_test = int(cfg.test_fraction * len(y_all))
    test, train = order[:n_test], order[n_test:]
    perm = rng.permutation(64)
    xa_tr, xa_te = jnp.asarray(x_all[train]), jnp.asarray(x_all[test])
    xb_tr, xb_te = xa_tr[:, perm], xa_te[:, perm]
    y_tr, y_te = jnp.asarray(y_all[train]), jnp.asarray(y_all[test])

    params0 = _init_mlp(jax.random.key(seed), cfg.hidden)
    sgd = optax.sgd(cfg.learning_rate, momentum=cfg.momentum)
    idx_a = _batches(rng, len(train), cfg.steps_a, cfg.batch_size)
    params_a = jax.jit(lambda p, x, y: _train(p, sgd, sgd.init(p), x, y))(
        params0, xa_tr[idx_a], y_tr[idx_a]
    )
    acc_a = float(_accuracy(params_a, xa_te, y_te))

    ref = rng.choice(len(train), cfg.ref_size, replace=False)
    bases = _bases(cfg, params_a, xa_tr[ref], y_tr[ref])
    idx_b = _batches(rng, len(train), cfg.steps_b, cfg.batch_size)
    xb_batches, yb_batches = xb_tr[idx_b], y_tr[idx_b]
    records = []
    for method in cfg.methods:
        opt = _optimizer(cfg, method)
        state = opt.init(params_a)
        if method in bases:
            state = set_basis(state, bases[method])
        x_steps, y_steps = xb_batches, yb_batches
        if method == "replay":
            pick = ref[_batches(rng, cfg.ref_size, cfg.steps_b, cfg.replay_per_batch)]
            x_steps = jnp.concatenate([xb_batches, xa_tr[pick]], axis=1)
            y_steps = jnp.concatenate([yb_batches, y_tr[pick]], axis=1)
        params_b = jax.jit(lambda p, s, x, y, opt=opt: _train(p, opt, s, x, y))(
            params_a, state, x_steps, y_steps
        )
        old, new = float(_accuracy(params_b, xa_te, y_te)), float(_accuracy(params_b, xb_te, y_te))
        records.append(
            {
                "method": method,
                "seed": seed,
                "old_acc": old,
                "new_acc": new,
                "acc": (old + new) / 2,
                "bwt": old - acc_a,
            }
        )
        logger.info(
            "seed %d %-17s old %.3f new %.3f (A after A %.3f)", seed, method, old, new, acc_a
        )
    return records


def run(cfg: Config) -> list[dict[str, Any]]:
    """Runs every seed; returns the records (see module docstring).

    Args:
      cfg: the experiment configuration.

    Returns:
      A list of ``{"method", "seed", "old_acc", "new_acc", "acc", "bwt"}`` dicts.

    Example:
      >>> records = run(Config(seeds=(0,), steps_a=50, steps_b=50))  # doctest: +SKIP
    """
    unknown = set(cfg.methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return [r for seed in cfg.seeds for r in run_seed(cfg, seed)]


def table(records: Sequence[dict[str, Any]]) -> str:
    """Markdown table of mean +- std over seeds, one row per method (in METHODS order).

    Args:
      records: as returned by :func:`run`.

    Returns:
      The table as a string.
    """
    fmt: Callable[[list[float]], str] = lambda v: f"{100 * np.mean(v):.1f} ± {100 * np.std(v):.1f}"
    lines = [
        "| method | old-task acc (%) | new-task acc (%) | ACC (%) | BWT (%) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        rows = [r for r in records if r["method"] == method]
        if rows:
            cols = [fmt([r[k] for r in rows]) for k in ("old_acc", "new_acc", "acc", "bwt")]
            lines.append(f"| {method} | " + " | ".join(cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="results/permuted_digits.json")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Config().seeds))
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = Config(seeds=tuple(args.seeds), methods=tuple(args.methods))
    start = time.perf_counter()
    records = run(cfg)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    print(table(records))
    print(f"\n{len(cfg.seeds)} seeds, {time.perf_counter() - start:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
