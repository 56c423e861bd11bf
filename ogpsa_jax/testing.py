"""Test-only hooks: non-finite gradients at chosen steps and the fault drill.

None of this is part of a public training signature or of the production step's program. The
training loop reads its seams from `ogpsa_jax.train.hooks`; the context managers here install
hooks for the length of a ``with`` block and restore the previous ones after it.

* `poisoning_loss` wraps a micro-batch loss so that its sum (and so its gradient) is multiplied
  by ``1 + micro["poison"]``; `with_poison` adds that input to a step's batch. A poison of NaN
  or inf makes the step non-finite without touching the data or the weights.
* `inject_nonfinite(steps)`: inside the block, `ogpsa_jax.train.train` trains with that loss and
  poisons the gradients of the given 1-based steps of every stage.
* `fault_drill(spec)`: inside the block, the training process SIGKILLs itself (or sends itself a
  Ctrl-C or SIGTERM) a given time into a phase (``PHASE@STEP+SECONDS[:SIGNAL]``; see
  `parse_fault_drill`). ``python -m ogpsa_jax.testing
  --fault-drill SPEC train ...`` runs the ``ogpsa`` command line with it (tests/fault_drill.py);
  ``--poison-steps 2,5 [--poison VALUE]`` runs it under `inject_nonfinite` (a multi-process
  test gives one process a NaN and the others 0).

Example:
    >>> import jax.numpy as jnp
    >>> loss = poisoning_loss(lambda p, micro, ref: (jnp.sum(p * micro["x"]), (1.0, {})))
    >>> batch = with_poison({"x": jnp.ones((2, 3))}, float("nan"))  # 2 micro-batches
    >>> float(loss(jnp.ones(3), {k: v[0] for k, v in batch.items()}, None)[0])
    nan
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ogpsa_jax import cli
from ogpsa_jax.train.hooks import Hooks, installed
from ogpsa_jax.train.hooks import active as hooks_active

logger = logging.getLogger(__name__)

POISON = "poison"  # the extra step input read by `poisoning_loss`
FAULT_PHASES = ("step", "save", "refresh")
DRILL_SIGNALS = {
    "": signal.SIGKILL,
    "KILL": signal.SIGKILL,
    "INT": signal.SIGINT,
    "TERM": signal.SIGTERM,
}


def poisoning_loss(micro_loss: Callable) -> Callable:
    """``micro_loss`` with its sum multiplied by ``1 + micro["poison"]``.

    Args:
        micro_loss: ``(params, micro, ref_params) -> (sum, (count, aux))``.

    Returns:
        The same loss (bitwise, for a poison of 0) that a NaN or inf poison makes non-finite,
        gradient included.
    """

    def loss(params: Any, micro: dict, ref_params: Any) -> Any:
        poison = micro[POISON]
        micro = {k: v for k, v in micro.items() if k != POISON}
        total, aux = micro_loss(params, micro, ref_params)
        return total * (1.0 + poison), aux

    return loss


def with_poison(batch: dict, value: float) -> dict:
    """``batch`` (arrays ``[A, ...]``) with the poison input ``value`` for every micro-batch.

    Args:
        batch: a step's batch, accumulation axis first.
        value: 0 (a normal step), NaN or inf.

    Returns:
        A new dict with ``batch["poison"]``, a float32 ``[A]`` array.
    """
    a = jax.tree.leaves(batch)[0].shape[0]
    return dict(batch, **{POISON: jnp.full((a,), value, jnp.float32)})


@contextlib.contextmanager
def inject_nonfinite(steps: Collection[int], value: float = np.nan) -> Iterator[None]:
    """Inside the block, `train` poisons the gradients of the given steps of every stage.

    Args:
        steps: 1-based optimiser steps whose loss and gradient become non-finite.
        value: the poison (NaN or inf).

    Example:
        >>> with inject_nonfinite((2,)):  # doctest: +SKIP
        ...     train("sft", config, out)  # step 2 is skipped (on_nonfinite="skip")
    """
    steps = frozenset(steps)

    def extra_inputs(step: int) -> dict[str, float]:
        return {POISON: float(value) if step in steps else 0.0}

    with installed(Hooks(wrap_loss=poisoning_loss, extra_inputs=extra_inputs)):
        yield


def parse_fault_drill(spec: str) -> Callable[[str, int], None]:
    """The faults of a drill spec ``PHASE@STEP+SECONDS[:SIGNAL]``, several joined by commas:
    send SIGNAL (``KILL``, the default; ``INT``, a Ctrl-C; or ``TERM``) to this process SECONDS
    after PHASE begins (``step``: computing 1-based step STEP; ``save``: writing checkpoint
    STEP; ``refresh``: the basis refresh before step STEP).

    Args:
        spec: the drill; "" for none.

    Returns:
        ``fault(phase, step)`` for `ogpsa_jax.train.hooks.Hooks` (a no-op for "").

    Raises:
        ValueError: a malformed spec.

    Example:
        >>> parse_fault_drill("")("save", 3) is None
        True
        >>> parse_fault_drill("boom@3+0.1")
        Traceback (most recent call last):
        ...
        ValueError: fault drill 'boom@3+0.1': phase must be step, save or refresh
    """
    if not spec:
        return lambda phase, step: None
    faults = {}
    for item in spec.split(","):
        item, _, sig_name = item.partition(":")
        try:
            phase, rest = item.split("@")
            step_text, delay_text = rest.split("+")
            at, delay = int(step_text), float(delay_text)
        except ValueError:
            raise ValueError(
                f"fault drill {spec!r}: expected PHASE@STEP+SECONDS[:SIGNAL]"
            ) from None
        if phase not in FAULT_PHASES:
            raise ValueError(f"fault drill {spec!r}: phase must be step, save or refresh")
        if sig_name not in DRILL_SIGNALS:
            raise ValueError(f"fault drill {spec!r}: signal must be one of {list(DRILL_SIGNALS)}")
        faults[(phase, at)] = (delay, DRILL_SIGNALS[sig_name])

    def fault(now_phase: str, now_step: int) -> None:
        if (now_phase, now_step) in faults:
            delay, signum = faults[(now_phase, now_step)]
            name = signal.Signals(signum).name
            logger.warning("fault drill: %s %.3fs into %s %d", name, delay, now_phase, now_step)
            kill = threading.Timer(delay, os.kill, (os.getpid(), signum))
            kill.daemon = True
            kill.start()

    return fault


@contextlib.contextmanager
def fault_drill(spec: str) -> Iterator[None]:
    """Inside the block, training SIGKILLs its own process as ``spec`` says (`parse_fault_drill`).

    Raises:
        ValueError: a malformed spec (before anything runs).
    """
    with installed(Hooks(fault=parse_fault_drill(spec))):
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ogpsa_jax.testing [--fault-drill SPEC] ARGS...``: the ``ogpsa`` command line
    (``ARGS``, e.g. ``train sft --preset tiny ...``) run under the fault drill, with the
    console script's logging.

    Args:
        argv: the arguments (default ``sys.argv[1:]``).

    Returns:
        The command line's exit status (2 for a malformed spec).
    """
    parser = argparse.ArgumentParser(prog="python -m ogpsa_jax.testing")
    parser.add_argument("--fault-drill", default="", metavar="PHASE@STEP+SECONDS")
    parser.add_argument(
        "--poison-steps",
        default=None,
        metavar="S,S",
        help="train with `poisoning_loss`, poisoning these 1-based steps (`inject_nonfinite`)",
    )
    parser.add_argument("--poison", type=float, default=float("nan"), help="the poison value")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the ogpsa command line")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        fault = parse_fault_drill(args.fault_drill)
        steps = [int(s) for s in args.poison_steps.split(",") if s] if args.poison_steps else None
    except ValueError as e:
        sys.stderr.write(f"{parser.prog}: error: {e}\n")
        return cli.EXIT_BAD_INPUT
    sys.argv = ["ogpsa", *args.args]  # as the console script sees its arguments
    poisoned = contextlib.nullcontext() if steps is None else inject_nonfinite(steps, args.poison)
    with poisoned, installed(dataclasses.replace(hooks_active(), fault=fault)):
        return cli.main()


if __name__ == "__main__":
    sys.exit(main())
