"""What an update still has along the protected directions of an optimiser state's basis.

Right after the projection this is 0 up to rounding: the train step logs it every step as a
check that the projection ran. One function for both kinds of state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from ogpsa_jax.projection.dims import DimsSpec
from ogpsa_jax.projection.flat import residual_max_flat
from ogpsa_jax.projection.matrix import residual_max_matrix
from ogpsa_jax.projection.state import OGPSAState, find_state


def residual_max(updates: optax.Updates, opt_state: Any, *, dims: DimsSpec = None) -> jax.Array:
    """``max |<g, u_i>|`` (flat basis) or ``max |V^T g|`` (matrix basis) over every leaf.

    Args:
      updates: a tree with the parameters' structure (usually the projected gradient).
      opt_state: any optax state holding at most one OGPSA state (flat or matrix).
      dims: the input axes given to ``ogpsa_matrix`` when they are not its default (read for a
        matrix state only).

    Returns:
      A float32 scalar; 0 when ``opt_state`` holds no OGPSA state (nothing is protected).

    Raises:
      ValueError: if ``opt_state`` holds more than one OGPSA state.

    Example:
      >>> import ogpsa_jax as og
      >>> state = og.set_basis(og.ogpsa(1).init({"w": jnp.zeros(2)}), ({"w": jnp.ones(2)},))
      >>> float(residual_max({"w": jnp.array([3.0, 4.0])}, state))
      7.0
      >>> float(residual_max({"w": jnp.ones(2)}, optax.EmptyState()))
      0.0
    """
    state = find_state(opt_state)
    if state is None:
        return jnp.zeros((), jnp.float32)
    if isinstance(state, OGPSAState):
        return residual_max_flat(updates, state.basis)
    return residual_max_matrix(updates, state.basis, dims=dims)


__all__ = ["residual_max"]
