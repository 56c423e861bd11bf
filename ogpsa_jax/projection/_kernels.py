"""CPU tuning of the flat projection, kept apart from its math (`ogpsa_jax.projection.flat`).

The math is: the k coefficients ``c_i = <g, u_i>`` of a leaf, in float32, then
``g - strength * sum_i c_i u_i``. This module decides how XLA computes it:

* one variadic reduction computes all k coefficients, so g is read once (a bf16 g converted
  inside the loop) where k separate sums would read it k times;
* on CPU the leaf is viewed as rows of `ROW` elements along its last axis (a free reshape that
  keeps the sharding of the leading axes) and the row sums are added afterwards: XLA:CPU's row
  reductions vectorise there; one reduction carries at most `GROUP` coefficients;
* an optimization barrier between the coefficients and the subtract, so that the subtract is
  one loop that writes a donated gradient in place and never materialises a float32 copy.

Every choice is measured side by side in ``benchmarks/projection.py``. Names here are public
for that benchmark; the module itself is private to the projection package.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_F32 = jnp.float32

# On CPU the coefficient reduction views each leaf as rows of this many elements along its last
# axis, and one reduction carries at most GROUP coefficients (see `coefficients`).
ROW = 64
GROUP = 4


def _add_tuples(a: tuple, b: tuple) -> tuple:
    return tuple(x + y for x, y in zip(a, b, strict=True))


def reduce_products(
    g: jax.Array, us: Sequence[jax.Array], shape: tuple[int, ...], axes: Sequence[int]
) -> tuple[jax.Array, ...]:
    """The sums over ``axes`` of ``g * u_i`` for every ``u_i`` (all viewed with ``shape``), in
    float32, as one variadic reduction: g is read once for all of them.

    Args:
      g: a gradient leaf.
      us: the leaf's directions (each of g's shape).
      shape: the view (a reshape of g's shape) in which the sums are taken.
      axes: the axes of ``shape`` summed over.

    Returns:
      One float32 array per direction (the shape of the view without ``axes``).

    Example:
      >>> reduce_products(jnp.ones(4), [jnp.arange(4.0)], (2, 2), (1,))
      (Array([1., 5.], dtype=float32),)
    """
    g32 = g.astype(_F32).reshape(shape)
    products = tuple(g32 * u.astype(_F32).reshape(shape) for u in us)
    zeros = tuple(jnp.zeros((), _F32) for _ in us)
    return tuple(jax.lax.reduce(products, zeros, _add_tuples, tuple(axes)))


def row_view_ok(x: jax.Array) -> bool:
    """Whether ``x`` can be viewed as rows of `ROW` elements along its last axis.

    That axis must be a multiple of `ROW` and every shard of it must hold whole rows: an
    Explicit-mode reshape refuses anything else, and under Auto axes GSPMD would move data
    (SmolLM2's 576-wide leaves in shards of 72 on 8 devices: the k = 2 step's temporaries were
    2.2x AdamW's; tests/test_scale.py). Explicit axes name the split; an Auto axis may split
    any dimension, so each one counts as splitting the last axis too.

    Args:
      x: an array or tracer.

    Returns:
      True when the row view is free.

    Example:
      >>> row_view_ok(jnp.zeros((3, 128))), row_view_ok(jnp.zeros((3, 100)))
      (True, False)
    """
    if x.ndim == 0 or x.shape[-1] % ROW:
        return False
    sharding = jax.typeof(x).sharding
    mesh, spec = getattr(sharding, "mesh", None), getattr(sharding, "spec", None)
    if mesh is None or mesh.empty or spec is None:
        return True
    last = spec[x.ndim - 1] if len(spec) >= x.ndim else None
    names = () if last is None else (last if isinstance(last, tuple) else (last,))
    auto = [
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Auto and name not in names
    ]
    shards = int(np.prod([mesh.shape[name] for name in (*names, *auto)]))
    return (x.shape[-1] // ROW) % shards == 0


def coefficients(g: jax.Array, us: Sequence[jax.Array]) -> list[jax.Array]:
    """All k coefficients ``<g, u_i>`` in float32, reading g once (on CPU once per `GROUP`).

    At k = 2 the coefficients move 3 leaf-sized arrays instead of 4, at k = 8 9 (CPU: 10)
    instead of 16. On CPU the leaf is viewed as rows of `ROW` elements (`row_view_ok`) and the
    row sums are added afterwards: one reduction over the whole leaf runs ~1.5x slower there at
    k = 2, and k = 8 as 4 + 4 re-reads g once but runs ~1.2x faster than one 8-way loop.
    Elsewhere the whole leaf is one reduction (a minor-axis split would relayout a TPU array).
    The sums stay float32 throughout.

    Args:
      g: a gradient leaf.
      us: its k directions (each of g's shape, any float dtype).

    Returns:
      A list of k float32 scalars.

    Example:
      >>> [float(c) for c in coefficients(jnp.ones(128), [jnp.ones(128), -jnp.ones(128)])]
      [128.0, -128.0]
    """

    def whole() -> tuple[jax.Array, ...]:
        return reduce_products(g, us, g.shape, tuple(range(g.ndim)))

    if not all(row_view_ok(x) for x in (g, *us)):
        return list(whole())

    def rows() -> tuple[jax.Array, ...]:
        shape = (*g.shape[:-1], g.shape[-1] // ROW, ROW)
        groups = np.array_split(np.arange(len(us)), -(-len(us) // GROUP))
        out = []
        for group in groups:
            g_i, us_i = g, [us[j] for j in group]
            if len(groups) > 1:  # one reduction per group, each converting g in its own loop
                g_i, us_i = jax.lax.optimization_barrier((g_i, us_i))
            out.extend(jnp.sum(p) for p in reduce_products(g_i, us_i, shape, (g.ndim,)))
        return tuple(out)

    return list(jax.lax.platform_dependent(cpu=rows, default=whole))


def fence(coeffs_K: Sequence[jax.Array], g: jax.Array) -> tuple[list[jax.Array], jax.Array]:
    """Returns ``(coeffs_K, g)`` unchanged, behind one optimization barrier.

    The coefficients are global reductions over the leaf: the subtract waits for all of them.
    g goes through the same barrier so that its float32 view is recomputed inside the
    subtract's loop, never materialised. Left to itself XLA:CPU fuses reduce -> broadcast ->
    subtract into one library fusion that cannot write in place (a donated gradient then costs
    an extra copy) and runs 1.5-4x slower. Barriers move no data; on GPU/TPU the reductions are
    separate kernels anyway.

    Args:
      coeffs_K: the k coefficients of the leaf.
      g: the gradient leaf.

    Returns:
      The same values.

    Example:
      >>> fence([jnp.float32(1.0)], jnp.ones(2))[1]
      Array([1., 1.], dtype=float32)
    """
    coeffs_K, g = jax.lax.optimization_barrier((list(coeffs_K), g))
    return coeffs_K, g


__all__ = ["GROUP", "ROW", "coefficients", "fence", "reduce_products", "row_view_ok"]
