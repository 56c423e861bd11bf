"""The training loop's seams for tests: how `ogpsa_jax.testing` injects faults.

No test hook is a parameter of `train` or an input of the production step. Instead the loop
reads the active `Hooks` once per stage; the defaults change nothing. `installed` makes other
hooks active inside a ``with`` block and restores the previous ones on exit (a context
variable, not a mutable global). Users have no reason to touch this module: `ogpsa_jax.testing`
builds the hooks the tests need (non-finite gradients at chosen steps, a SIGKILL at a chosen
moment).

Example:
    >>> seen = []
    >>> with installed(Hooks(fault=lambda phase, step: seen.append((phase, step)))):
    ...     active().fault("save", 3)
    >>> seen, active() == Hooks()
    ([('save', 3)], True)
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass


def _same_loss(loss: Callable) -> Callable:
    return loss


def _no_inputs(step: int) -> dict[str, float]:
    del step
    return {}


def _no_fault(phase: str, step: int) -> None:
    del phase, step


@dataclass(frozen=True, kw_only=True)
class Hooks:
    """Seams of the stage loop. Each default is the production behaviour."""

    # Wraps the micro-batch loss ``(params, micro, ref_params) -> (sum, (count, aux))`` the
    # step is built from (e.g. to read an extra input).
    wrap_loss: Callable[[Callable], Callable] = _same_loss
    # Extra step inputs at a 1-based step: name -> float, put into the step's batch as a
    # replicated float32 array with one value per micro-batch. The same names at every step;
    # the loop asks for step 0 once to lay out the batch.
    extra_inputs: Callable[[int], dict[str, float]] = _no_inputs
    # Called as a phase begins: ("refresh", s) before the basis refresh that precedes step s,
    # ("step", s) before step s, ("save", s) before writing checkpoint s.
    fault: Callable[[str, int], None] = _no_fault


_ACTIVE: contextvars.ContextVar[Hooks] = contextvars.ContextVar("ogpsa_train_hooks")


def active() -> Hooks:
    """The hooks in effect (the defaults outside any `installed` block)."""
    return _ACTIVE.get(Hooks())


@contextlib.contextmanager
def installed(hooks: Hooks) -> Iterator[Hooks]:
    """Makes ``hooks`` active inside the ``with`` block; the previous ones return after it.

    Args:
        hooks: the hooks to install.

    Yields:
        ``hooks``.
    """
    token = _ACTIVE.set(hooks)
    try:
        yield hooks
    finally:
        _ACTIVE.reset(token)


__all__ = ["Hooks", "active", "installed"]
