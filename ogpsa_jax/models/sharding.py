"""Meshes with (data, fsdp, tensor) axes, the NamedShardings of the decoder's parameters, and
the GSPMD wrapper its entry points run under on meshes with Explicit axes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(
    shape: Sequence[int] = (1, 1, 1),
    *,
    axis_type: str = "auto",
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """Builds a mesh with axes (data, fsdp, tensor).

    Args:
        shape: sizes of the (data, fsdp, tensor) axes; their product must equal the device count.
        axis_type: "auto" (GSPMD propagation) or "explicit" (sharding in types).
        devices: devices to use (default: the first prod(shape) of `jax.devices()`).

    Returns:
        A `jax.sharding.Mesh`.

    Example:
        >>> make_mesh((1, 1, 1)).shape  # on 8 devices, e.g. make_mesh((2, 2, 2))
        OrderedDict({'data': 1, 'fsdp': 1, 'tensor': 1})
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"mesh shape must be 3 positive sizes (data, fsdp, tensor), got {shape}")
    kinds = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}
    if axis_type not in kinds:
        raise ValueError(f"axis_type must be 'auto' or 'explicit', got {axis_type!r}")
    n = int(np.prod(shape))
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < n:
        raise ValueError(f"mesh shape {shape} needs {n} devices, only {len(devices)} available")
    grid = np.array(devices[:n], dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(kinds[axis_type],) * 3)


def fit_spec(
    axes: Sequence[str | None] | None, shape: Sequence[int], mesh_shape: dict[str, int]
) -> PartitionSpec:
    """Drops mesh axes that are absent from the mesh or do not divide the dimension.

    Args:
        axes: one mesh-axis name (or None) per dimension; None for all replicated.
        shape: the array shape.
        mesh_shape: mapping axis name -> size (e.g. `mesh.shape`).

    Returns:
        A PartitionSpec that never raises an IndivisibleError on that mesh.
    """
    if not axes:
        return PartitionSpec()
    out = []
    for name, dim in zip(axes, shape, strict=True):
        size = mesh_shape.get(name, 0) if name is not None else 0
        out.append(name if size and dim % size == 0 else None)
    return PartitionSpec(*out)


def _is_var(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def param_shardings(model_or_state: Any, mesh: Mesh) -> Any:
    """NamedShardings for every parameter, from their `out_sharding` annotations.

    Args:
        model_or_state: a `Decoder` (or any nnx.Module) or a state from `nnx.state(model,
            nnx.Param)` (concrete or abstract).
        mesh: the mesh to place on.

    Returns:
        A pytree with the structure of `nnx.state(model, nnx.Param)` holding NamedShardings.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config())
        >>> param_shardings(model, make_mesh((1, 1, 1)))["layers"]["q_proj"].get_value().spec
        P(None, 'fsdp', 'tensor')
    """
    state = (
        nnx.state(model_or_state, nnx.Param)
        if isinstance(model_or_state, nnx.Module)
        else model_or_state
    )
    mesh_shape = dict(mesh.shape)

    def one(v: Any) -> Any:
        if _is_var(v):
            axes = v.get_metadata().get("out_sharding")
            return v.replace(NamedSharding(mesh, fit_spec(axes, v.shape, mesh_shape)))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_var)


def batch_axes(rows: int, mesh_shape: dict[str, int]) -> tuple[str, ...] | None:
    """The mesh axes a batch of ``rows`` rows is split over: ``data`` x ``fsdp``, else
    ``fsdp``, else ``data`` (the first of them that divides ``rows``), else None (replicated).

    Example:
        >>> mesh_shape = {"data": 2, "fsdp": 4, "tensor": 1}
        >>> batch_axes(8, mesh_shape), batch_axes(4, mesh_shape), batch_axes(3, mesh_shape)
        (('data', 'fsdp'), ('fsdp',), None)
    """
    for axes in (("data", "fsdp"), ("fsdp",), ("data",)):
        sizes = [mesh_shape.get(a, 1) for a in axes]
        if math.prod(sizes) > 1 and rows % math.prod(sizes) == 0:
            return tuple(a for a, s in zip(axes, sizes, strict=True) if s > 1)
    return None


def constrain_batch(x: jax.Array, axis: int = 0) -> jax.Array:
    """``x`` with its batch axis split like a batch (`batch_axes`) and its other axes
    replicated, under the ambient mesh (Auto axes: a sharding constraint; Explicit: a
    reshard); ``x`` unchanged without a mesh.

    The decoder's entry points apply it to the embedded tokens, whose sharding would otherwise
    follow the embedding table's (hidden axis over ``fsdp``), so that every activation after
    it carries the whole global batch on every device.

    Args:
        x: an activation.
        axis: its batch axis.

    Returns:
        ``x``, constrained.

    Example:
        >>> constrain_batch(jax.numpy.zeros((4, 3))).shape  # no mesh: x unchanged
        (4, 3)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec: list[Any] = [None] * x.ndim
    spec[axis] = batch_axes(x.shape[axis], dict(mesh.shape))
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, PartitionSpec(*spec))
    return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def with_auto_axes(fn: Any, out_shape: Any, batch_like: Any = None) -> Any:
    """Runs `fn` with GSPMD propagation when the ambient mesh has Explicit axes.

    The decoder's matmuls contract sharded dimensions, which Explicit-axis typing refuses
    without per-op output shardings; inside `auto_axes` XLA chooses them. The results' leading
    (batch) axis is sharded like `batch_like`'s leading axis when that one is sharded (a
    training batch split over `data` and `fsdp` gives logits split the same way, so the loss's
    gather by token id needs no collective), else like a batch (`batch_axes`; replicated where
    the mesh does not divide the batch).

    Args:
        fn: the function to wrap.
        out_shape: the shape of `fn`'s one result, or a tuple of shapes when it returns a tuple.
        batch_like: an input whose leading-axis sharding the results should share.

    Returns:
        `fn` itself without an Explicit ambient mesh, else `fn` under `jax.sharding.auto_axes`.

    Example:
        >>> with_auto_axes(jax.numpy.sin, (3,))(jax.numpy.zeros(3))  # no mesh: fn unchanged
        Array([0., 0., 0.], dtype=float32)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return fn
    several = bool(out_shape) and not isinstance(out_shape[0], int | np.integer)
    shapes = list(out_shape) if several else [out_shape]
    lead = None
    if batch_like is not None:
        batch_spec = getattr(jax.typeof(batch_like).sharding, "spec", None)
        if batch_spec and batch_spec[0] is not None:
            lead = batch_spec[0]
    specs = []
    for shape in shapes:
        axes = lead if lead is not None else batch_axes(shape[0], dict(mesh.shape))
        specs.append(PartitionSpec(axes, *([None] * (len(shape) - 1))))
    return jax.sharding.auto_axes(fn, out_sharding=tuple(specs) if several else specs[0])
