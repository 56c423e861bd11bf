"""The OGPSA optax transforms: project gradients off a capability subspace.

Two kinds, one contract:

* flat (`flat`): per parameter tensor, k directions of the tensor's own shape;
  `ogpsa` (bare) and `ogpsa_adamw` (project -> clip -> AdamW), `project`.
* matrix (`matrix`): per weight matrix, a ``(d_in, k)`` basis of its input space (GPM);
  `ogpsa_matrix` and `ogpsa_matrix_adamw`, `project_matrix`; input axes in `dims`.

Their states (`state`) share `get_basis` / `set_basis` / `basis_nbytes`, `residual_max`
reads either, and both aliases are the chain of `alias` (projection -> clip -> AdamW). The
bases themselves are estimated in `ogpsa_jax.bases`.

Example:
  >>> import jax.numpy as jnp
  >>> from ogpsa_jax.projection import ogpsa_adamw, set_basis
  >>> params = {"w": jnp.ones((2, 3))}
  >>> tx = ogpsa_adamw(1e-3, k=2)
  >>> state = set_basis(tx.init(params), ({"w": jnp.ones((2, 3)) / 6**0.5},))
"""

from ogpsa_jax.projection.dims import (
    DimsSpec,
    basis_shape,
    batch_ndim,
    default_dims,
    resolve_dims,
)
from ogpsa_jax.projection.flat import ogpsa, ogpsa_adamw, project, residual_max_flat
from ogpsa_jax.projection.matrix import (
    ogpsa_matrix,
    ogpsa_matrix_adamw,
    project_matrix,
    residual_max_matrix,
)
from ogpsa_jax.projection.residual import residual_max, span_share
from ogpsa_jax.projection.state import (
    Basis,
    MatrixOGPSAState,
    OGPSAState,
    basis_nbytes,
    find_state,
    get_basis,
    set_basis,
)

__all__ = [
    "Basis",
    "DimsSpec",
    "MatrixOGPSAState",
    "OGPSAState",
    "basis_nbytes",
    "basis_shape",
    "batch_ndim",
    "default_dims",
    "find_state",
    "get_basis",
    "ogpsa",
    "ogpsa_adamw",
    "ogpsa_matrix",
    "ogpsa_matrix_adamw",
    "project",
    "project_matrix",
    "residual_max",
    "residual_max_flat",
    "residual_max_matrix",
    "span_share",
    "resolve_dims",
    "set_basis",
]
