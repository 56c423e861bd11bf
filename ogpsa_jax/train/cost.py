"""Flops, bytes and a roofline time of a train step and a basis refresh, from compiled programs.

XLA's `cost_analysis()` counts a loop's body once, whatever its trip count, so the step is
priced from programs without loops, built with the training loop's builders on the same mesh
and shardings as `ogpsa_jax.train.plan`:

* one micro-batch (`add_micro_batch`: the micro loss's gradient added to the float32 sums) of
  the same model with 1 and with 2 layers, every loop unrolled (``scan_unroll=0``: the layers
  and the loss chunks); the difference is one layer (frozen layers priced the same way), so a
  micro-batch of the whole model costs ``one_layer_program + (N - 1) * layer``;
* the update (`apply_accumulated`: divide, guard, project, clip, AdamW, metrics), which has no
  loop, at full size;
* a step: ``accum_steps * micro-batch + update``; a refresh: ``batches * reference gradient``
  (priced like a micro-batch) ``+ basis`` (gradient methods), or ``batches * capture``
  (activation).

A program's time on a device is its roofline, ``max(flops / peak flops, bytes / bandwidth)``:
a lower bound at full utilisation, which makes OGPSA's share of the step an upper bound.
Collectives are not priced. Bytes are XLA:CPU's count for its own fusions, an estimate of a
GPU's or TPU's.

Example:
    >>> report = cost_report("sft", config, mesh)  # doctest: +SKIP
    >>> report["overhead"]["h200"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax.train.abstract import abstract_stage, decoder_config, step_arguments
from ogpsa_jax.train.activation_refresh import make_capture_fn, rows_per_batch
from ogpsa_jax.train.refresh import gradient_programs
from ogpsa_jax.train.schema import TrainConfig
from ogpsa_jax.train.sharding import jit_bound, rows_sharding
from ogpsa_jax.train.stage import make_micro_loss
from ogpsa_jax.train.step import add_micro_batch, apply_accumulated, zero_sums


@dataclass(frozen=True)
class Cost:
    """Flops and bytes accessed of a program, per device."""

    flops: float
    bytes: float

    @classmethod
    def of(cls, compiled: Any) -> Cost:
        c = compiled.cost_analysis()
        c = c[0] if isinstance(c, list | tuple) else c
        return cls(flops=float(c.get("flops", 0.0)), bytes=float(c.get("bytes accessed", 0.0)))

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def __sub__(self, other: Cost) -> Cost:
        return Cost(self.flops - other.flops, self.bytes - other.bytes)

    def __mul__(self, n: float) -> Cost:
        return Cost(self.flops * n, self.bytes * n)


@dataclass(frozen=True)
class Roofline:
    """A device's peak memory bandwidth (bytes/s) and dense bf16 compute (flop/s)."""

    bandwidth: float
    flops: float

    def seconds(self, cost: Cost) -> float:
        """The roofline time of ``cost``: ``max(flops / peak, bytes / bandwidth)``."""
        return max(cost.flops / self.flops, cost.bytes / self.bandwidth)


# Peak HBM bandwidth and dense bf16 flop/s (vendor figures): H200, H100 SXM, TPU v5p.
HARDWARE = {
    "h200": Roofline(4.8e12, 989e12),
    "h100": Roofline(3.35e12, 989e12),
    "tpu-v5p": Roofline(2.76e12, 459e12),
}


def _sds(x: Any, dtype: Any = None, sharding: Any = None) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype if dtype is None else dtype, sharding=sharding or x.sharding
    )


def _drop_leading(x: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    spec = x.sharding.spec
    return jax.ShapeDtypeStruct(
        x.shape[1:], x.dtype, sharding=NamedSharding(x.sharding.mesh, P(*spec[1:]))
    )


def _layer_scaled(
    build: Callable[[TrainConfig, Any], Cost], kind: str, config: TrainConfig, mesh: Any
) -> Cost:
    """The cost of a program of the whole model from its 1- and 2-layer unrolled versions."""
    cfg = decoder_config(config)
    frozen = config.model.frozen_layers
    unrolled = dataclasses.replace(config.model, scan_unroll=0)

    def cost(layers: int, frozen_layers: int) -> Cost:
        model = dataclasses.replace(unrolled, frozen_layers=frozen_layers)
        small = dataclasses.replace(cfg, num_layers=layers)
        with jax.set_mesh(mesh):
            a = abstract_stage(kind, dataclasses.replace(config, model=model), mesh, small)
            return build(dataclasses.replace(config, model=model), a)

    one = cost(1, 0)
    total = one + (cost(2, 0) - one) * (cfg.num_layers - frozen - 1)
    if frozen:
        total = total + (cost(2, 1) - one) * frozen
    return total


def micro_batch_cost(kind: str, config: TrainConfig, mesh: Any) -> Cost:
    """One micro-batch of the step (forward, backward, adding to the float32 sums)."""

    def build(cfg: TrainConfig, a: Any) -> Cost:
        _, (params, _, batch, ref) = step_arguments(kind, cfg, a, mesh)
        micro = jax.tree.map(_drop_leading, batch)
        st = getattr(cfg, kind)
        # the model function is an argument (with LoRA it binds the frozen base weights)
        abstract = jax.eval_shape(
            lambda f, p, m, r: zero_sums(make_micro_loss(kind, st, f), p, m, r),
            a.logps_fn,
            params,
            micro,
            ref,
        )
        g32 = jax.tree.map(lambda p: _sds(p, jnp.float32), params)
        carry = (g32, *abstract[1:])
        fn = jit_bound(
            lambda f, p, m, r, c: add_micro_batch(make_micro_loss(kind, st, f), p, m, r, c),
            a.logps_fn,
            donate_argnums=(3,),
        )
        return Cost.of(fn.lower(params, micro, ref, carry).compile())

    return _layer_scaled(build, kind, config, mesh)


def update_cost(kind: str, config: TrainConfig, mesh: Any) -> Cost:
    """The step's update: divide, guard, project (OGPSA on), clip, AdamW, metrics."""
    with jax.set_mesh(mesh):
        a = abstract_stage(kind, config, mesh)
        _, (params, opt_state, batch, ref) = step_arguments(kind, config, a, mesh)
        micro = jax.tree.map(_drop_leading, batch)
        st = getattr(config, kind)
        _, loss, count, aux = jax.eval_shape(
            lambda f, p, m, r: zero_sums(make_micro_loss(kind, st, f), p, m, r),
            a.logps_fn,
            params,
            micro,
            ref,
        )
        g32 = jax.tree.map(lambda p: _sds(p, jnp.float32), params)
        fn = jax.jit(functools.partial(apply_accumulated, a.optimizer), donate_argnums=(0, 1))
        return Cost.of(fn.lower(params, opt_state, g32, loss, count, aux).compile())


def refresh_cost(kind: str, config: TrainConfig, mesh: Any) -> tuple[Cost, Cost, int]:
    """(one reference batch's cost, the basis program's, reference batches) of the stage's
    refresh; zeros with OGPSA off. The activation method has no basis program here (its
    decomposition of a few hundred captured rows per layer is small)."""
    og = getattr(config, kind).ogpsa
    zero = Cost(0.0, 0.0)
    if not og.enabled:
        return zero, zero, 0
    rows, length = og.reference_batch_size, getattr(config, kind).max_length
    per_set = -(-og.reference_rows * (2 if kind == "dpo" else 1) // rows)
    n_batches = per_set * len(og.reference)
    names = ("input_ids", "attention_mask", "loss_mask")
    placed = {
        k: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=rows_sharding(mesh, rows, 2, 0))
        for k in names
    }

    def build(cfg: TrainConfig, a: Any) -> Cost:
        if og.method == "activation":
            fn = make_capture_fn(a.graphdef, a.rest, og, rows_per_batch(og.capture_rows, 1), {})
            key = jax.eval_shape(lambda: jax.random.key(0))
            return Cost.of(fn.lower(a.params, placed, key).compile())
        param_sh = jax.tree.map(lambda x: x.sharding, a.params)
        programs = gradient_programs(a.logps_fn, og, rows, param_sh, mesh)
        return Cost.of(programs.grad.lower(a.params, placed).compile())

    per_batch = _layer_scaled(build, kind, config, mesh)
    basis = zero
    if og.method != "activation":
        with jax.set_mesh(mesh):
            a = abstract_stage(kind, config, mesh)
            param_sh = jax.tree.map(lambda x: x.sharding, a.params)
            programs = gradient_programs(a.logps_fn, og, rows, param_sh, mesh)
            g32 = jax.tree.map(lambda p: _sds(p, jnp.float32), a.params)
            n_grads = n_batches if og.method in ("svd", "gradient") else len(og.reference)
            basis = Cost.of(programs.basis.lower([g32] * n_grads).compile())
    return per_batch, basis, n_batches


def cost_report(
    kind: str, config: TrainConfig, mesh: Any, *, micro: Cost | None = None
) -> dict[str, Any]:
    """The step's and the refresh's cost and roofline times, and OGPSA's share of the step.

    Args:
        kind: "sft" or "dpo".
        config: the run config (validated for ``mesh``).
        mesh: the mesh of virtual devices (`ogpsa_jax.train.plan.use_virtual_devices`).
        micro: `micro_batch_cost` when already known (it does not depend on OGPSA).

    Returns:
        A dict: ``micro_batch``, ``update``, ``update_off`` (the update with OGPSA off),
        ``step``, ``reference_batch``, ``basis`` and ``refresh`` (each ``{"flops", "bytes"}``;
        ``refresh`` also ``batches``), and
        per device in `HARDWARE`: ``step_s``, ``overhead`` (OGPSA's update time minus the plain
        update's, over the plain step's time; refresh excluded), ``refresh_s`` and
        ``refresh_amortised`` (one refresh over ``refresh_every`` plain steps).
    """
    st = getattr(config, kind)
    off = dataclasses.replace(st, ogpsa=dataclasses.replace(st.ogpsa, enabled=False))
    micro = micro_batch_cost(kind, config, mesh) if micro is None else micro
    update = update_cost(kind, config, mesh)
    update_off = update_cost(kind, dataclasses.replace(config, **{kind: off}), mesh)
    ref_batch, basis, n_batches = refresh_cost(kind, config, mesh)
    step = micro * st.accum_steps + update
    parts = dict(micro_batch=micro, update=update, update_off=update_off, step=step)
    parts.update(reference_batch=ref_batch, basis=basis, refresh=ref_batch * n_batches + basis)
    out: dict[str, Any] = {name: dataclasses.asdict(c) for name, c in parts.items()}
    out["refresh"]["batches"] = n_batches
    for hw, roof in HARDWARE.items():  # a sum of programs: the sum of their roofline times
        plain = roof.seconds(micro) * st.accum_steps + roof.seconds(update_off)
        extra = roof.seconds(update) - roof.seconds(update_off)
        refresh_s = roof.seconds(ref_batch) * n_batches + roof.seconds(basis)
        out[hw] = {
            "step_s": plain + extra,
            "overhead": extra / plain,
            "refresh_s": refresh_s,
            "refresh_amortised": refresh_s / (st.ogpsa.refresh_every * plain),
        }
    return out


__all__ = [
    "HARDWARE",
    "Cost",
    "Roofline",
    "cost_report",
    "micro_batch_cost",
    "refresh_cost",
    "update_cost",
]
