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
from ogpsa_jax.projection.flat import residual_max_flat, span_energy_flat
from ogpsa_jax.projection.matrix import residual_max_matrix, span_energy_matrix
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


def span_share(updates: optax.Updates, opt_state: Any, *, dims: DimsSpec = None) -> jax.Array:
    """The share of ``updates``' squared norm that lies in the protected span of an optimiser
    state's basis (0 when the state holds no OGPSA state).

    For the update AdamW applied, this says how much of the step went back into the capability
    span that the projection removed from the gradient (Adam's per-coordinate scaling does not
    keep a projected gradient orthogonal).

    Args:
      updates: a tree with the parameters' structure (e.g. the applied update).
      opt_state: any optax state holding at most one OGPSA state.
      dims: as for `residual_max`.

    Returns:
      A float32 scalar in [0, 1] (up to rounding).

    Example:
      >>> import ogpsa_jax as og
      >>> u = ({"w": jnp.array([1.0, 0.0])},)
      >>> state = og.set_basis(og.ogpsa(1).init({"w": jnp.zeros(2)}), u)
      >>> round(float(span_share({"w": jnp.array([3.0, 4.0])}, state)), 4)
      0.36
    """
    state = find_state(opt_state)
    if state is None:
        return jnp.zeros((), jnp.float32)
    if isinstance(state, OGPSAState):
        energy = span_energy_flat(updates, state.basis)
    else:
        energy = span_energy_matrix(updates, state.basis, dims=dims)
    total = sum(
        (jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(updates)),
        jnp.zeros((), jnp.float32),
    )
    return energy / jnp.maximum(total, 1e-30)


__all__ = ["residual_max", "span_share"]
