"""Where training puts its arrays on the ``(data, fsdp, tensor)`` mesh.

Batch rows are split over ``data`` x ``fsdp`` (replicated when they do not divide); each
parameter-shaped optimiser-state leaf takes its parameter's sharding; host batches become
global arrays with `place`, which is multi-host safe.

Example:
    >>> import numpy as np
    >>> from ogpsa_jax.models import make_mesh
    >>> mesh = make_mesh((1, 1, 1))
    >>> shardings = batch_shardings(mesh, rows=8, ranks={"input_ids": 3, "poison": 1})
    >>> batch = place({"input_ids": np.zeros((2, 8, 5), np.int32)}, shardings)
    >>> batch["input_ids"].sharding.spec
    P(None, ('data', 'fsdp'), None)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ogpsa_jax._tree import leaf_paths, path_str

ROWS = ("data", "fsdp")


def rows_sharding(mesh: jax.sharding.Mesh, rows: int, ndim: int, axis: int) -> NamedSharding:
    """Axis ``axis`` of an ``ndim`` array with ``rows`` rows split over data x fsdp.

    Args:
        mesh: the training mesh.
        rows: the size of that axis.
        ndim: the array's rank.
        axis: the rows axis.

    Returns:
        The sharding; replicated when ``rows`` does not divide by data x fsdp.

    Example:
        >>> from ogpsa_jax.models import make_mesh
        >>> rows_sharding(make_mesh((1, 1, 1)), 4, 2, 0).spec
        P(('data', 'fsdp'), None)
    """
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    spec: list[Any] = [None] * ndim
    if rows % n == 0:
        spec[axis] = ROWS
    return NamedSharding(mesh, P(*spec))


def batch_shardings(
    mesh: jax.sharding.Mesh, rows: int, ranks: Mapping[str, int]
) -> dict[str, NamedSharding]:
    """Shardings of a step's batch (arrays ``[A, rows, ...]``): rows over data x fsdp.

    Args:
        mesh: the training mesh.
        rows: rows per micro-batch (axis 1).
        ranks: name -> rank of each batch array; arrays of rank 1 (one value per micro-batch)
            are replicated.

    Returns:
        name -> sharding.
    """
    replicated = NamedSharding(mesh, P())
    return {
        name: rows_sharding(mesh, rows, ndim, 1) if ndim >= 2 else replicated
        for name, ndim in ranks.items()
    }


def place(batch: Mapping[str, np.ndarray], shardings: Any) -> dict[str, jax.Array]:
    """Host batch -> global arrays.

    Every process holds the same global batch (the iterator is deterministic) and each keeps
    only its addressable shards, so this is multi-host safe.

    Args:
        batch: name -> host array.
        shardings: one sharding for every array, or name -> sharding.

    Returns:
        name -> global array.
    """

    def one(x: np.ndarray, sh: NamedSharding) -> jax.Array:
        return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])

    if isinstance(shardings, NamedSharding):
        return {k: one(v, shardings) for k, v in batch.items()}
    return {k: one(v, shardings[k]) for k, v in batch.items()}


def shardings_of(tree: Any) -> Any:
    """The sharding of every array of ``tree``, in its structure (for ``in_shardings``).

    Example:
        >>> import jax.numpy as jnp
        >>> type(shardings_of({"w": jnp.zeros(2)})["w"]).__name__
        'SingleDeviceSharding'
    """
    return jax.tree.map(lambda x: x.sharding, tree)


def as_argument(fn: Callable) -> jax.tree_util.Partial:
    """``fn`` as a pytree to pass to a jitted function as an argument.

    A jitted function embeds the arrays it closes over in its program as constants (for the
    frozen base weights of LoRA training: the whole model). Passed as an argument instead, a
    ``jax.tree_util.Partial``'s bound arrays are inputs of the program; a plain function binds
    none and passes through unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> f = as_argument(jax.tree_util.Partial(jnp.add, jnp.ones(2)))
        >>> jax.jit(lambda f, x: f(x))(f, jnp.ones(2))
        Array([2., 2.], dtype=float32)
    """
    return fn if isinstance(fn, jax.tree_util.Partial) else jax.tree_util.Partial(fn)


class BoundProgram:
    """A jitted program whose first argument is a model function, bound: calling it, lowering
    it and calling its compiled program pass only the remaining arguments (the function's
    arrays stay program inputs).

    Example:
        >>> import jax.numpy as jnp
        >>> f = jax.tree_util.Partial(jnp.add, jnp.ones(2))
        >>> prog = jit_bound(lambda f, x: f(x), f)
        >>> prog(jnp.ones(2))
        Array([2., 2.], dtype=float32)
        >>> prog.lower(jnp.ones(2)).compile()(jnp.ones(2))
        Array([2., 2.], dtype=float32)
    """

    def __init__(self, jitted: Any, fn: Any) -> None:
        self.jitted, self.fn = jitted, fn

    def __call__(self, *args: Any) -> Any:
        return self.jitted(self.fn, *args)

    def lower(self, *args: Any) -> BoundProgram:
        """``jitted.lower`` with the bound function first (for ahead-of-time compiles); its
        ``compile()`` is bound the same way, so the compiled program is called like this one."""
        return BoundProgram(self.jitted.lower(self.fn, *args), self.fn)

    def compile(self) -> BoundProgram:
        """Compiles a lowered program (the result of `lower`)."""
        return BoundProgram(self.jitted.compile(), self.fn)

    def __getattr__(self, name: str) -> Any:  # memory_analysis, cost_analysis, as_text, ...
        return getattr(self.__dict__["jitted"], name)


def jit_bound(
    program: Callable,
    fn: Callable,
    *,
    in_shardings: Any = None,
    out_shardings: Any = None,
    donate_argnums: tuple[int, ...] = (),
) -> BoundProgram:
    """``program(fn, *args)`` jitted with ``fn`` passed as an argument (`as_argument`) and bound.

    Args:
        program: ``(fn, *args) -> outputs``.
        fn: the model function (a ``jax.tree_util.Partial`` binding frozen weights, or plain).
        in_shardings: shardings of ``args`` (None: inferred); ``fn``'s come from its arrays.
        out_shardings: as for ``jax.jit``.
        donate_argnums: indices into ``args`` to donate.

    Returns:
        The `BoundProgram`.
    """
    fn = as_argument(fn)
    kwargs: dict[str, Any] = {"donate_argnums": tuple(i + 1 for i in donate_argnums)}
    if in_shardings is not None:
        kwargs["in_shardings"] = (shardings_of(fn), *in_shardings)
    if out_shardings is not None:
        kwargs["out_shardings"] = out_shardings
    return BoundProgram(jax.jit(program, **kwargs), fn)


def opt_shardings(abstract_opt: Any, params: Any, mesh: jax.sharding.Mesh) -> Any:
    """Each parameter-shaped optimiser-state leaf takes its parameter's sharding; the rest
    (counts, scalars) are replicated.

    Args:
        abstract_opt: the optimiser state's shapes (``jax.eval_shape`` of its init).
        params: the sharded parameters.
        mesh: the training mesh.

    Returns:
        A tree of shardings with the structure of ``abstract_opt``.
    """
    by_path = {
        p: (x.shape, x.sharding)
        for p, x in zip(leaf_paths(params), jax.tree.leaves(params), strict=True)
    }
    replicated = NamedSharding(mesh, P())

    def one(path: Any, leaf: Any) -> Any:
        s = path_str(path)
        best = None
        for p, (shape, sharding) in by_path.items():
            if (s == p or s.endswith("/" + p)) and tuple(shape) == tuple(leaf.shape):
                if best is None or len(p) > len(best[0]):
                    best = (p, sharding)
        return best[1] if best else replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt)
