"""Which axis of each weight is its input axis, for the matrix transform and its estimators.

A leaf is a stack of matrices over its leading ``nb = min(axis, ndim - 2)`` axes (batch axes:
a stacked ``(L, d_in, d_out)`` leaf holds one ``V`` per layer, ``(L, d_in, k)``); every other
axis but the input axis is a column axis sharing that ``V``. The input axis per leaf is given by
a dims spec, like optax's Muon dimension numbers: ``None`` (`default_dims`), a callable
``(path, leaf) -> int | None``, or a pytree of ints / ``None`` with the parameters' structure;
``None`` means the leaf passes through with no basis.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax._tree import is_masked, path_str

DimsSpec = Any  # None, a pytree of int | None, or Callable[[KeyPath, jax.Array], int | None]

_SKIP_NAMES = ("embed", "norm", "bias", "scale")


def default_dims(path: tuple[Any, ...], leaf: Any) -> int | None:
    """Default input axis: ``-2`` for 2-D and 3-D (layer-stacked) weights, else ``None``.

    Args:
      path: the leaf's key path (``jax.tree_util`` keys).
      leaf: the parameter (only its ``ndim`` is read).

    Returns:
      ``-2`` for a 2-D ``(d_in, d_out)`` or 3-D ``(L, d_in, d_out)`` leaf whose path contains
      none of "embed", "norm", "bias", "scale" (case-insensitive; so stacked ``(L, D)`` norm
      scales and biases pass through); ``None`` (pass through) otherwise.

    Example:
      >>> default_dims((), jnp.zeros((3, 5)))
      -2
    """
    name = path_str(path).lower()
    if any(word in name for word in _SKIP_NAMES):
        return None
    return -2 if jnp.ndim(leaf) in (2, 3) else None


def resolve_dims(params: optax.Params, dims: DimsSpec = None, mask: Any = None) -> list:
    """Per-leaf input axes (non-negative int, or ``None`` = pass through), in leaf order.

    Args:
      params: the parameter tree (arrays or ``jax.ShapeDtypeStruct``s).
      dims: ``None`` (`default_dims`), a callable ``(path, leaf) -> int | None``, or a pytree
        with the structure of ``params`` holding ints or ``None``.
      mask: ``None``, a pytree of bools with the structure of ``params``, or a callable on the
        params returning one; ``False`` leaves pass through.

    Returns:
      A list with one entry per leaf of ``params`` (``jax.tree.leaves`` order).

    Raises:
      ValueError: if ``dims`` or ``mask`` do not have the parameters' structure, or an axis is
        out of range for its leaf.

    Example:
      >>> resolve_dims({"w": jnp.zeros((3, 5)), "b": jnp.zeros(5)})
      [None, 0]
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_masked)
    if dims is None:
        dims = default_dims
    if callable(dims):
        axes = [None if is_masked(x) else dims(p, x) for p, x in leaves_with_path]
    else:
        axes_leaves, axes_def = jax.tree.flatten(dims, is_leaf=lambda x: x is None)
        if axes_def.num_leaves != treedef.num_leaves or len(axes_leaves) != len(leaves_with_path):
            raise ValueError(
                f"dims must have the parameters' structure: got {axes_def}, expected {treedef}"
            )
        axes = axes_leaves
    if mask is not None:
        mask_tree = mask(params) if callable(mask) else mask
        mask_leaves, mask_def = jax.tree.flatten(mask_tree, is_leaf=is_masked)
        if len(mask_leaves) != len(leaves_with_path):
            raise ValueError(
                f"mask must have the parameters' structure: got {mask_def}, expected {treedef}"
            )
        axes = [a if m else None for a, m in zip(axes, mask_leaves, strict=True)]
    out = []
    for (path, leaf), axis in zip(leaves_with_path, axes, strict=True):
        if axis is None or is_masked(leaf):
            out.append(None)
            continue
        ndim = len(jnp.shape(leaf))
        if not isinstance(axis, int) or isinstance(axis, bool) or not -ndim <= axis < ndim:
            raise ValueError(
                f"input axis {axis!r} is invalid for leaf {path_str(path)!r} of shape "
                f"{jnp.shape(leaf)}"
            )
        out.append(axis % ndim)
    return out


def batch_ndim(ndim: int, axis: int) -> int:
    """Number of leading batch axes of a leaf with ``ndim`` axes and input axis ``axis``.

    Args:
      ndim: the leaf's number of axes.
      axis: its (non-negative) input axis.

    Returns:
      ``max(0, min(axis, ndim - 2))``: the leaf is a stack of matrices over these axes.

    Example:
      >>> batch_ndim(3, 1), batch_ndim(2, 1)
      (1, 0)
    """
    return max(0, min(axis, ndim - 2))


def basis_shape(shape: tuple[int, ...], axis: int, k: int) -> tuple[int, ...]:
    """Shape of ``V`` for a leaf of ``shape`` with input axis ``axis``: ``(*batch, d_in, k)``.

    Args:
      shape: the leaf's shape.
      axis: its (non-negative) input axis.
      k: columns of ``V``.

    Returns:
      The basis shape.

    Example:
      >>> basis_shape((3, 10, 12), 1, 4)
      (3, 10, 4)
    """
    nb = batch_ndim(len(shape), axis)
    return tuple(shape[:nb]) + (shape[axis], k)


__all__ = ["DimsSpec", "basis_shape", "batch_ndim", "default_dims", "resolve_dims"]
