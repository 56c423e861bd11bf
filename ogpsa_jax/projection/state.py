"""The OGPSA optimiser states and the one contract for reading and replacing their basis.

Two kinds of state, one per transform:

* `OGPSAState` (`ogpsa`, flat): ``k`` parameter-shaped trees of directions.
* `MatrixOGPSAState` (`ogpsa_matrix`): one ``V`` of shape ``(*batch, d_in, k)`` per weight.

Whatever the kind, `get_basis` / `set_basis` find *the* OGPSA state inside any optax state
(``chain`` tuples, ``inject_hyperparams``, ``masked``, nested) and raise a ValueError when there
is none or more than one; `basis_nbytes` counts the memory of every basis. The argument checks
both transforms share live here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ogpsa_jax._tree import is_masked, keep_sharding, zeros_like

Basis = tuple[optax.Params, ...]
# The default basis dtype as a dtype *instance*: `jnp.float32` is callable, and
# optax.inject_hyperparams would take a callable default for a schedule.
F32_DTYPE = np.dtype(np.float32)


def _is_masked_or_none(x: Any) -> bool:
    return x is None or is_masked(x)


# ---------------------------------------------------------------- argument checks


def check_k(k: Any) -> None:
    """Eagerly rejects a subspace size that is not a Python integer >= 1.

    Example:
      >>> check_k(0)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
        ...
      ValueError: k must be a Python integer >= 1, got 0 ...
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(
            f"k must be a Python integer >= 1, got {k!r} (under optax.inject_hyperparams pass "
            "static_args=('k',))"
        )


def check_strength(strength: Any) -> None:
    """Eagerly rejects a Python/NumPy strength outside [0, 1] (traced values pass).

    Example:
      >>> check_strength(1.5)
      Traceback (most recent call last):
        ...
      ValueError: strength must lie in [0, 1], got 1.5
    """
    if isinstance(strength, jax.core.Tracer):
        return
    try:
        value = float(strength)
    except (TypeError, ValueError):
        return
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"strength must lie in [0, 1], got {strength!r}")


def check_basis_dtype(basis_dtype: Any) -> np.dtype:
    """The basis dtype as a NumPy dtype; a ValueError for an array or a non-float dtype.

    Example:
      >>> check_basis_dtype(jnp.bfloat16)
      dtype(bfloat16)
    """
    if isinstance(basis_dtype, jax.Array):
        raise ValueError(
            "basis_dtype must be a dtype, got an array (under optax.inject_hyperparams pass "
            "static_args=('k', 'basis_dtype'))"
        )
    dtype = jnp.dtype(basis_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"basis_dtype must be a floating dtype, got {dtype}")
    return dtype


# ---------------------------------------------------------------- the two states


class OGPSAState(NamedTuple):
    """State of `ogpsa`: k parameter-shaped trees of directions.

    Tree i holds, per parameter leaf, the i-th direction of that parameter (same shape, dtype
    ``basis_dtype``); per leaf the k directions are orthonormal or zero. Leaves the transform
    skips are ``optax.MaskedNode()`` (no memory). Each basis leaf inherits its parameter's
    sharding.
    """

    basis: Basis  # k trees, each with the params' structure and leaf shapes

    def with_basis(self, basis: Sequence[optax.Params]) -> OGPSAState:
        """This state with a new basis (validated, zero-padded to k, cast, same shardings).

        Args:
          basis: a tuple or list of at most k trees, each matching the parameter tree (full
            trees are fine for a masked transform: masked leaves are dropped).

        Returns:
          A state of identical structure, shapes, dtypes and shardings.

        Example:
          >>> state = OGPSAState(basis=({"w": jnp.zeros(2)}, {"w": jnp.zeros(2)}))
          >>> state.with_basis(({"w": jnp.array([1.0, 0.0])},)).basis[1]["w"]
          Array([0., 0.], dtype=float32)
        """
        old, k = self.basis, len(self.basis)
        if not isinstance(basis, (tuple, list)):
            raise ValueError(
                "basis must be a tuple or list of parameter-shaped trees, got "
                f"{type(basis).__name__}"
            )
        if len(basis) > k:
            raise ValueError(f"basis has {len(basis)} directions, more than k={k}")
        ref_def = jax.tree.structure(old[0], is_leaf=is_masked)
        old_leaves = ref_def.flatten_up_to(old[0])
        for i, tree in enumerate(basis):  # validate everything before touching any array
            tree_def = jax.tree.structure(tree, is_leaf=is_masked)
            if tree_def != ref_def:
                raise ValueError(
                    f"basis tree {i} does not match the parameter structure: got {tree_def}, "
                    f"expected {ref_def}"
                )
            for o, n in zip(old_leaves, ref_def.flatten_up_to(tree), strict=True):
                if is_masked(o):
                    continue
                if is_masked(n):
                    raise ValueError(f"basis tree {i} masks a leaf that this transform projects")
                if jnp.shape(n) != o.shape:
                    raise ValueError(
                        f"basis tree {i} has a leaf of shape {jnp.shape(n)}, expected {o.shape}"
                    )
        convert = lambda o, n: o if is_masked(o) else keep_sharding(jnp.asarray(n, o.dtype), o)
        zero = lambda o: o if is_masked(o) else zeros_like(o)
        trees = [jax.tree.map(convert, old[i], t, is_leaf=is_masked) for i, t in enumerate(basis)]
        trees += [jax.tree.map(zero, old[i], is_leaf=is_masked) for i in range(len(basis), k)]
        return OGPSAState(basis=tuple(trees))


class MatrixOGPSAState(NamedTuple):
    """State of `ogpsa_matrix`: one input-space basis ``V`` per projected weight.

    A projected leaf of shape ``(*batch, d_in, *cols)`` holds ``V`` of shape
    ``(*batch, d_in, k)`` (dtype ``basis_dtype``, orthonormal or zero columns, sharded like the
    parameter's batch and input axes); pass-through leaves are ``optax.MaskedNode()``.
    """

    basis: optax.Params  # the params' structure; V of shape (*batch, d_in, k) or MaskedNode

    def with_basis(self, basis: optax.Params) -> MatrixOGPSAState:
        """This state with a new basis (validated, zero-padded to k columns, cast, same
        shardings).

        Args:
          basis: tree with the parameters' structure; projected leaves hold ``V`` of shape
            ``(*batch, d_in, r)`` with ``r <= k``; pass-through leaves hold ``None`` or
            ``optax.MaskedNode()``.

        Returns:
          A state of identical structure, shapes, dtypes and shardings.

        Example:
          >>> state = MatrixOGPSAState(basis={"w": jnp.zeros((3, 2))})
          >>> state.with_basis({"w": jnp.ones((3, 1))}).basis["w"][0]
          Array([1., 0.], dtype=float32)
        """
        old_leaves, old_def = jax.tree.flatten(self.basis, is_leaf=is_masked)
        new_leaves, new_def = jax.tree.flatten(basis, is_leaf=_is_masked_or_none)
        if len(new_leaves) != len(old_leaves) or new_def.num_nodes != old_def.num_nodes:
            raise ValueError(
                f"basis does not match the parameter structure: got {new_def}, expected {old_def}"
            )
        out = []
        for j, (o, n) in enumerate(zip(old_leaves, new_leaves, strict=True)):
            if is_masked(o):
                if not _is_masked_or_none(n):
                    raise ValueError(f"basis leaf {j} is given for a leaf this transform skips")
                out.append(o)
                continue
            if _is_masked_or_none(n):
                raise ValueError(f"basis leaf {j} is missing (shape {o.shape} expected)")
            shape, k = jnp.shape(n), o.shape[-1]
            if len(shape) != o.ndim or shape[:-1] != o.shape[:-1]:
                raise ValueError(
                    f"basis leaf {j} has shape {shape}, expected {o.shape[:-1] + ('r',)} "
                    f"with r <= {k}"
                )
            if shape[-1] > k:
                raise ValueError(f"basis leaf {j} has {shape[-1]} columns, more than k={k}")
            v = jnp.asarray(n, dtype=o.dtype)
            if shape[-1] < k:
                v = jnp.pad(v, [(0, 0)] * (o.ndim - 1) + [(0, k - shape[-1])])
            out.append(keep_sharding(v, o))
        return MatrixOGPSAState(basis=jax.tree.unflatten(old_def, out))


# ---------------------------------------------------------------- finding the state

AnyState = OGPSAState | MatrixOGPSAState


def _is_state(x: Any) -> bool:
    return isinstance(x, (OGPSAState, MatrixOGPSAState))


def find_state(opt_state: Any) -> AnyState | None:
    """The one OGPSA state (flat or matrix) inside ``opt_state``, or None if it holds none.

    Args:
      opt_state: any optax state.

    Returns:
      The `OGPSAState` or `MatrixOGPSAState`, or None.

    Raises:
      ValueError: if ``opt_state`` holds more than one OGPSA state (their paths are named).

    Example:
      >>> find_state((optax.EmptyState(),)) is None
      True
    """
    flat = jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_state)[0]
    found = [(path, x) for path, x in flat if _is_state(x)]
    if len(found) > 1:
        where = ", ".join(jax.tree_util.keystr(path) for path, _ in found)
        raise ValueError(
            f"opt_state holds {len(found)} OGPSA states (at {where}); get_basis, set_basis and "
            "residual_max need exactly one"
        )
    return found[0][1] if found else None


def _the_state(opt_state: Any) -> AnyState:
    state = find_state(opt_state)
    if state is None:
        raise ValueError(
            "opt_state holds no OGPSA state (no OGPSAState or MatrixOGPSAState inside it)"
        )
    return state


def get_basis(opt_state: Any) -> Any:
    """The basis of the one OGPSA state (flat or matrix) inside ``opt_state``.

    Works on any optax state (``chain`` tuples, ``inject_hyperparams``, ``masked``, nested) and
    under ``jax.jit``.

    Args:
      opt_state: an optax state holding exactly one `OGPSAState` or `MatrixOGPSAState`.

    Returns:
      Its ``basis``: a tuple of k trees (flat) or a tree of ``V`` (matrix); masked leaves are
      ``optax.MaskedNode``.

    Raises:
      ValueError: if ``opt_state`` holds no OGPSA state, or more than one.

    Example:
      >>> import ogpsa_jax as og
      >>> state = optax.chain(og.ogpsa(1), optax.sgd(0.1)).init({"w": jnp.zeros(2)})
      >>> og.get_basis(state)[0]["w"]
      Array([0., 0.], dtype=float32)
    """
    return _the_state(opt_state).basis


def set_basis(opt_state: Any, basis: Any) -> Any:
    """``opt_state`` with the basis of its one OGPSA state (flat or matrix) replaced.

    The new basis is validated against the stored one before anything changes, zero-padded to
    k, cast to the stored dtype and given the stored shardings, so the structure, shapes,
    dtypes and shardings of ``opt_state`` are unchanged (no recompilation). Works under
    ``jax.jit``.

    Args:
      opt_state: an optax state holding exactly one `OGPSAState` or `MatrixOGPSAState`.
      basis: flat: a tuple of <= k parameter-shaped trees (full trees; masked leaves are
        dropped); matrix: a tree of ``V`` (``(*batch, d_in, r)``, r <= k) with ``None`` or
        ``optax.MaskedNode`` on pass-through leaves.

    Returns:
      The optimiser state with the new basis.

    Raises:
      ValueError: if ``opt_state`` holds no OGPSA state, or more than one, or ``basis`` does
        not fit the stored one.

    Example:
      >>> import ogpsa_jax as og
      >>> state = optax.chain(og.ogpsa(2), optax.sgd(0.1)).init({"w": jnp.zeros(2)})
      >>> state = og.set_basis(state, ({"w": jnp.array([0.0, 1.0])},))
      >>> og.get_basis(state)[0]["w"]
      Array([0., 1.], dtype=float32)
    """
    new_state = _the_state(opt_state).with_basis(basis)
    return jax.tree.map(lambda x: new_state if _is_state(x) else x, opt_state, is_leaf=_is_state)


def basis_nbytes(opt_state: Any) -> int:
    """Bytes held by the bases of every OGPSA state (flat and matrix) inside ``opt_state``.

    Args:
      opt_state: any optax state (0 when it holds no OGPSA state).

    Returns:
      The sum of the basis arrays' ``nbytes``: k parameter copies for the flat basis over the
      projected leaves, ``d_in * k * itemsize`` per weight matrix for the matrix basis.

    Example:
      >>> import ogpsa_jax as og
      >>> basis_nbytes(og.ogpsa(2).init({"w": jnp.zeros((8, 3))}))
      192
      >>> basis_nbytes(og.ogpsa_matrix(4).init({"w": jnp.zeros((8, 3))}))
      128
    """
    flat = jax.tree_util.tree_flatten(opt_state, is_leaf=_is_state)[0]
    total = 0
    for state in (x for x in flat if _is_state(x)):
        for v in jax.tree.leaves(state.basis, is_leaf=is_masked):
            if not is_masked(v):
                total += int(v.size) * jnp.dtype(v.dtype).itemsize
    return total


__all__ = [
    "Basis",
    "MatrixOGPSAState",
    "OGPSAState",
    "basis_nbytes",
    "check_basis_dtype",
    "check_k",
    "check_strength",
    "find_state",
    "get_basis",
    "set_basis",
]
