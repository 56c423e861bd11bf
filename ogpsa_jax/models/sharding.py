"""Meshes with (data, fsdp, tensor) axes and the NamedShardings of the decoder's parameters."""

from __future__ import annotations

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
        >>> mesh = make_mesh((2, 2, 2))  # doctest: +SKIP
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
        >>> shardings = param_shardings(model, make_mesh((2, 2, 2)))  # doctest: +SKIP
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
