"""Small pytree and sharding helpers that every layer of the library shares.

One home for: telling masked leaves apart, naming a leaf by its key path, and making arrays
that keep a reference array's sharding (concrete arrays, and tracers on Auto or Explicit
meshes). Nothing here knows about models, data or training.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax


def is_masked(x: Any) -> bool:
    """True for ``optax.MaskedNode``: a leaf a transform skips (it holds no memory).

    Example:
      >>> is_masked(optax.MaskedNode()), is_masked(jnp.zeros(2))
      (True, False)
    """
    return isinstance(x, optax.MaskedNode)


def path_str(path: tuple[Any, ...]) -> str:
    """A key path as ``"a/b/c"`` (dict keys, attributes, indices; an nnx trailing ``value``
    dropped), so an ``nnx.State`` leaf and a plain-dict leaf get the same name.

    Example:
      >>> path_str(jax.tree_util.tree_flatten_with_path({"layers": {"q_proj": 1}})[0][0][0])
      'layers/q_proj'
    """
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def leaf_paths(tree: Any) -> list[str]:
    """``path_str`` of every leaf of ``tree`` (masked leaves included), in leaf order.

    Example:
      >>> leaf_paths({"b": 1, "a": {"w": 2}})
      ['a/w', 'b']
    """
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_masked)[0]
    return [path_str(p) for p, _ in flat]


def explicit_spec(x: Any) -> Any:
    """The ``PartitionSpec`` of ``x`` where its sharding is known, else ``None``.

    Known means: a concrete array with a ``NamedSharding``, or a tracer on an Explicit mesh
    (where the sharding is part of the type). Under Auto (GSPMD) axes a tracer has none.
    """
    if isinstance(x, jax.core.Tracer):
        sharding = jax.typeof(x).sharding
        mesh = getattr(sharding, "mesh", None)
        if mesh is not None and not mesh.empty and mesh.are_all_axes_explicit:
            return sharding.spec
        return None
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        return sharding.spec
    return None


def zeros_like(x: jax.Array, dtype: Any = None) -> jax.Array:
    """Zeros shaped and sharded like ``x``, also inside a trace on an Auto (GSPMD) mesh.

    ``jnp.zeros_like`` of a tracer is a constant with no sharding of its own there, so jit would
    replicate it; a select that depends on ``x`` lets sharding propagation give it x's sharding
    (and stays zero where x is NaN).

    Example:
      >>> zeros_like(jnp.ones(3), jnp.int32)
      Array([0, 0, 0], dtype=int32)
    """
    dtype = x.dtype if dtype is None else dtype
    if isinstance(x, jax.core.Tracer):
        return jnp.where(x == x, 0, 0).astype(dtype)
    return jnp.zeros_like(x, dtype=dtype)


def keep_sharding(new: jax.Array, old: jax.Array) -> jax.Array:
    """``new`` with the sharding of ``old`` where that sharding is known (see `explicit_spec`).

    Example:
      >>> keep_sharding(jnp.zeros(2), jnp.ones(2)).shape
      (2,)
    """
    if isinstance(old, jax.core.Tracer):
        spec = explicit_spec(old)
        if spec is not None and jax.typeof(new).sharding.spec != spec:
            new = jax.sharding.reshard(new, spec)
        return new
    if isinstance(new, jax.core.Tracer):
        return new
    sharding = getattr(old, "sharding", None)
    if sharding is None or getattr(new, "sharding", None) == sharding:
        return new
    return jax.device_put(new, sharding)
