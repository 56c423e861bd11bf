"""Estimators of the capability subspace that `ogpsa_jax.projection` protects.

* `reference`: `reference_gradients`, the gradients on reference data most bases start from.
* `flat`: `capability_basis`, k per-tensor directions for `ogpsa` (Gram-Schmidt as the
  reference code, or the top directions of the span).
* `matrix`: `matrix_basis_from_gradients` and `matrix_basis_from_activations` (GPM), input-space
  bases for `ogpsa_matrix`; `collect_inputs` gathers layer inputs.

Example:
  >>> import jax.numpy as jnp
  >>> from ogpsa_jax.bases import capability_basis
  >>> (u,) = capability_basis([{"w": jnp.array([0.0, 2.0])}])
  >>> u["w"]
  Array([0., 1.], dtype=float32)
"""

from ogpsa_jax.bases.flat import capability_basis
from ogpsa_jax.bases.matrix import (
    collect_inputs,
    matrix_basis_from_activations,
    matrix_basis_from_gradients,
)
from ogpsa_jax.bases.reference import reference_gradients

__all__ = [
    "capability_basis",
    "collect_inputs",
    "matrix_basis_from_activations",
    "matrix_basis_from_gradients",
    "reference_gradients",
]
