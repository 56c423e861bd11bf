"""Per-device memory of a training run, planned from ahead-of-time compiles on virtual devices.

`plan(config, command, devices)` builds every program a stage runs -- the train step, the DPO
reference pass, the basis refresh -- with the training loop's own builders (`model_logps`,
`make_micro_loss`, `step_batch_shardings`, `jit_step`, `gradient_programs`,
`reference_logps_program`, `make_capture_fn`), lowers them with `jax.ShapeDtypeStruct`
arguments that carry the training shardings, and compiles them on ``devices`` virtual CPU
devices. No weight is ever allocated; XLA's `memory_analysis()` gives each program's argument,
output, aliased (donated) and temporary bytes per device.

A stage's peak is the largest of its programs' peaks, each counting what is live around it:

* step: arguments (params, optimizer state with the basis, batch, a frozen DPO reference) +
  outputs not aliased to a donated input + temporaries;
* DPO reference pass (``dpo_reference=precompute``, before the first step): params + optimizer
  state + the program's batch, outputs and temporaries;
* refresh: params + optimizer state + the reference gradients held (Gram-Schmidt: one per set,
  the last one being accumulated; svd / gradient: one per batch) + the gradient program's batch,
  outputs and temporaries, or the basis program's outputs and temporaries, whichever is larger;
  activation bases: the capture program's.

The numbers are XLA:CPU's buffer assignment for the same sharded program; a GPU or TPU compile
fuses differently, so treat them as an estimate (compared once with a measured peak in
``docs/benchmarks.md``).

Example:
    >>> from ogpsa_jax.train import preset
    >>> plans = plan(preset("qwen2_5_7b_paper"), "sft", devices=8)  # doctest: +SKIP
    >>> plans[0].peak / 1e9, plans[0].fits["h100-80gb"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from ogpsa_jax import models
from ogpsa_jax.projection.state import find_state
from ogpsa_jax.train.abstract import (
    AbstractStage,
    PlanError,
    abstract_stage,
    step_arguments,
    tokens,
    tree_bytes,
    use_virtual_devices,
)
from ogpsa_jax.train.activation_refresh import make_capture_fn, rows_per_batch
from ogpsa_jax.train.dpo_reference import reference_logps_program
from ogpsa_jax.train.refresh import gradient_programs
from ogpsa_jax.train.schema import MATRIX_METHODS, TrainConfig, stages_of
from ogpsa_jax.train.sharding import rows_sharding
from ogpsa_jax.train.validation import resolve_mesh_shape, validate

# Device memory (decimal bytes, as sold) of the kinds a plan is checked against.
DEVICE_MEMORY = {
    "h100-80gb": 80e9,
    "h200-141gb": 141e9,
    "tpu-v5p-95gb": 95e9,
    "tpu-v5e-16gb": 16e9,
}
PROGRAMS = ("step", "refresh", "reference")  # what a stage compiles (see the module docstring)
HEADROOM = 0.10  # a plan fits a device when its peak leaves this fraction of the memory free


@dataclass(frozen=True)
class ProgramMemory:
    """One compiled program's bytes per device (XLA's `memory_analysis`)."""

    arguments: int
    outputs: int
    aliased: int  # outputs written into donated arguments
    temporaries: int

    @classmethod
    def of(cls, compiled: Any) -> ProgramMemory:
        m = compiled.memory_analysis()
        return cls(
            arguments=int(m.argument_size_in_bytes),
            outputs=int(m.output_size_in_bytes),
            aliased=int(m.alias_size_in_bytes),
            temporaries=int(m.temp_size_in_bytes),
        )

    @property
    def new_outputs(self) -> int:
        """Outputs that need memory of their own."""
        return self.outputs - self.aliased


@dataclass
class StagePlan:
    """Per-device bytes of one stage's programs (see the module docstring for the peaks)."""

    stage: str
    devices: int
    mesh: tuple[int, int, int]
    params: int  # the trainable weights (with LoRA: the adapters)
    opt_state: int  # without the basis
    basis: int
    batch: int  # the step's batch (and ref log-probs)
    step: ProgramMemory | None  # None when left out (`plan_stage`'s ``programs``)
    step_peak: int
    other_peaks: dict[str, int] = field(default_factory=dict)  # refresh, reference
    programs: dict[str, ProgramMemory] = field(default_factory=dict)
    frozen: int = 0  # with LoRA: the frozen base weights (an argument of every program)

    @property
    def peak(self) -> int:
        return max([self.step_peak, *self.other_peaks.values()])

    @property
    def fits(self) -> dict[str, bool]:
        return {k: self.peak <= (1 - HEADROOM) * v for k, v in DEVICE_MEMORY.items()}

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.update(peak=self.peak, fits=self.fits)
        return out


def _refresh_peaks(kind: str, config: TrainConfig, a: AbstractStage, mesh: Any) -> tuple:
    """({program: memory}, peak) of the stage's basis refresh; ({}, 0) with OGPSA off."""
    st = getattr(config, kind)
    og = st.ogpsa
    if not og.enabled:
        return {}, 0
    rows = og.reference_batch_size
    live = tree_bytes(a.params) + tree_bytes(a.opt_state) + tree_bytes(a.rest)
    per_set = -(-og.reference_rows * (2 if kind == "dpo" else 1) // rows)
    n_batches = per_set * len(og.reference)
    batch = tokens((rows, st.max_length), rows_sharding(mesh, rows, 2, 0))
    if og.method in MATRIX_METHODS and config.model.lora.rank:
        raise PlanError(
            f"{kind}: planning the matrix refresh of LoRA adapters (ogpsa.method={og.method}) is "
            "not supported; plan the step alone (programs=('step',)) or a flat method"
        )
    if og.method == "activation":
        capture = make_capture_fn(
            a.graphdef, a.rest, og, rows_per_batch(og.capture_rows, n_batches), {}
        )
        key = jax.eval_shape(lambda: jax.random.key(0))
        mem = ProgramMemory.of(capture.lower(a.params, batch, key).compile())
        return {"capture": mem}, live + tree_bytes(batch) + mem.new_outputs + mem.temporaries
    programs = gradient_programs(
        a.logps_fn, og, rows, jax.tree.map(lambda x: x.sharding, a.params), mesh
    )
    grad = ProgramMemory.of(programs.grad.lower(a.params, batch).compile())
    g32 = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=x.sharding), a.params
    )
    n_grads = n_batches if og.method in ("svd", "gradient") else len(og.reference)
    basis = ProgramMemory.of(programs.basis.lower([g32] * n_grads).compile())
    held = n_grads - 1 if og.method in ("svd", "gradient") else n_grads  # + the accumulator
    grad_peak = (
        live + held * tree_bytes(g32) + tree_bytes(batch) + grad.new_outputs + grad.temporaries
    )
    basis_peak = live + basis.arguments + basis.new_outputs + basis.temporaries
    return {"reference_grad": grad, "basis": basis}, max(grad_peak, basis_peak)


def plan_stage(
    kind: str,
    config: TrainConfig,
    mesh: jax.sharding.Mesh,
    programs: Sequence[str] = PROGRAMS,
) -> StagePlan:
    """Compiles one stage's programs on ``mesh`` and accounts their memory per device.

    Args:
        kind: "sft" or "dpo".
        config: the run config (validated for ``mesh``).
        mesh: a mesh of (virtual) devices.
        programs: which of `PROGRAMS` to compile ("step", "refresh", "reference"); the
            others are left out of the plan (and of its peak).

    Returns:
        The `StagePlan` (``step`` is None when the step is left out).
    """
    st = getattr(config, kind)
    compiled: dict[str, ProgramMemory] = {}
    others: dict[str, int] = {}
    with jax.set_mesh(mesh):
        a = abstract_stage(kind, config, mesh)
        step, args = step_arguments(kind, config, a, mesh)
        if "step" in programs:
            compiled["step"] = ProgramMemory.of(step.lower(*args).compile())
        if "refresh" in programs and st.ogpsa.enabled:
            refresh, others["refresh"] = _refresh_peaks(kind, config, a, mesh)
            compiled.update(refresh)
        if "reference" in programs and kind == "dpo" and st.dpo_reference == "precompute":
            rows = 2 * st.batch_size
            batch = tokens((rows, st.max_length), rows_sharding(mesh, rows, 2, 0))
            param_sh = jax.tree.map(lambda x: x.sharding, a.params)
            ref = reference_logps_program(a.logps_fn, st, mesh, param_sh)
            mem = ProgramMemory.of(ref.lower(a.params, batch).compile())
            compiled["reference"] = mem
            live = tree_bytes(a.params) + tree_bytes(a.opt_state) + tree_bytes(a.rest)
            others["reference"] = live + tree_bytes(batch) + mem.new_outputs + mem.temporaries
    state = find_state(a.opt_state)
    basis = tree_bytes(state.basis) if state is not None else 0
    step_mem = compiled.get("step")
    return StagePlan(
        stage=kind,
        devices=mesh.size,
        mesh=tuple(mesh.devices.shape),
        params=tree_bytes(a.params),
        opt_state=tree_bytes(a.opt_state) - basis,
        basis=basis,
        batch=tree_bytes(args[2]),
        step=step_mem,
        step_peak=0
        if step_mem is None
        else step_mem.arguments + step_mem.new_outputs + step_mem.temporaries,
        other_peaks=others,
        programs=compiled,
        frozen=tree_bytes(a.rest),
    )


def plan(config: TrainConfig, command: str, devices: int) -> list[StagePlan]:
    """Per-device memory of every stage of ``command`` on ``devices`` devices.

    The config is validated against ``devices`` first (mesh shape, batch divisibility: a
    `ValueError` naming the field, before any compile); ``num_devices`` is set to ``devices``.

    Args:
        config: the run config (a preset with overrides).
        command: "sft", "dpo" or "sft-dpo".
        devices: the device count to plan for.

    Returns:
        One `StagePlan` per stage.

    Raises:
        PlanError: JAX runs with fewer devices (see `use_virtual_devices`), or the mesh does
            not fit ``devices``; ValueError: any other bad config field.
    """
    cpus = use_virtual_devices(devices)
    config = dataclasses.replace(config, num_devices=devices)
    try:
        shape = resolve_mesh_shape(config, devices)
        for kind in stages_of(command):
            rows, split = getattr(config, kind).batch_size, shape[0] * shape[1]
            if rows % split:
                raise ValueError(
                    f"{kind}.batch_size={rows} is not divisible by the mesh's data*fsdp={split}"
                )
    except ValueError as e:
        raise PlanError(f"{devices} devices cannot hold this config: {e}") from None
    validate(config, command, devices)  # every other field, before any compile
    mesh = models.make_mesh(shape, axis_type=config.mesh_axis_type, devices=cpus)
    return [plan_stage(kind, config, mesh) for kind in stages_of(command)]


def format_plans(plans: list[StagePlan], costs: list[dict] | None = None) -> str:
    """A text table of `plan`'s result in GB per device (and `cost_report`'s, when given)."""
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = []
    for i, p in enumerate(plans):
        parts = dict(params=p.params, opt_state=p.opt_state, basis=p.basis, batch=p.batch)
        if p.frozen:
            parts = {"frozen_base": p.frozen, "adapters": parts.pop("params"), **parts}
        if p.step is not None:
            parts.update(temporaries=p.step.temporaries, step_peak=p.step_peak)
        parts.update({f"{k}_peak": v for k, v in p.other_peaks.items()}, peak=p.peak)
        lines.append(f"{p.stage}: {p.devices} devices, mesh {p.mesh}; GB per device:")
        lines.append("  " + "  ".join(f"{k} {gb(v)}" for k, v in parts.items()))
        fit = [f"{k} {'yes' if ok else 'NO'}" for k, ok in p.fits.items()]
        lines.append(f"  fits with {HEADROOM:.0%} headroom: " + ", ".join(fit))
        if costs is not None:
            c = costs[i]
            lines.append(
                f"  step: {c['step']['flops'] / 1e12:.1f} TFLOP, {c['step']['bytes'] / 1e9:.1f} GB "
                "accessed per device"
            )
            for hw in ("h200", "tpu-v5p"):
                h = c[hw]
                lines.append(
                    f"  {hw} roofline: step {h['step_s']:.3f} s, OGPSA overhead "
                    f"{h['overhead']:.2%}, refresh {h['refresh_s']:.1f} s = "
                    f"{h['refresh_amortised']:.1%} of a step amortised"
                )
    return "\n".join(lines)


__all__ = [
    "DEVICE_MEMORY",
    "HEADROOM",
    "PROGRAMS",
    "PlanError",
    "ProgramMemory",
    "StagePlan",
    "format_plans",
    "plan",
    "plan_stage",
    "use_virtual_devices",
]
