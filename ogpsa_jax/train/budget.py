"""How many steps a stage runs and why, and what extending it does to the learning rate.

A stage runs ``epochs x steps per epoch`` optimiser steps, where an epoch makes
``rows // batch_size`` micro-batches and a step accumulates ``accum_steps`` of them, unless
``max_steps`` caps it sooner. `stage_budget` computes this and says it in words for the log.

Extending a run (a larger ``epochs`` or ``max_steps`` on a finished or stopped run) continues
from its last checkpoint: the data order, the basis refreshes and the optimiser state go on as
if the larger budget had been asked for from the start, and the learning-rate schedule is that
of the new total, from the current step on. With ``schedule=constant`` the extended run is
therefore identical to one run with the larger budget; with ``cosine`` the steps already taken
followed the old total's curve and the remaining ones follow the new total's curve (the
learning rate jumps up to where the longer cosine is at that step, then decays to 0 at the new
last step). `schedule_change` states this for the log and ``config.json``.

Example:
    >>> from ogpsa_jax.train.schema import SFTConfig
    >>> b = stage_budget("sft", SFTConfig(epochs=3, batch_size=8, accum_steps=2), n_rows=64)
    >>> b.total, b.reason
    (12, '3 epochs x 4 steps per epoch: 64 rows // 8 per micro-batch // 2 accumulated')
    >>> stage_budget("sft", SFTConfig(epochs=3, batch_size=8, max_steps=5), n_rows=64).reason
    'max_steps=5, fewer than the 24 steps of 3 epochs'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ogpsa_jax.train.optimizer import make_schedule
from ogpsa_jax.train.schema import StageConfig


@dataclass(frozen=True)
class StageBudget:
    """A stage's number of optimiser steps and why."""

    total: int  # optimiser steps of the stage
    per_epoch: int  # optimiser steps per pass over the data
    reason: str  # how `total` comes about, in words


def stage_budget(kind: str, st: StageConfig, n_rows: int) -> StageBudget:
    """The stage's steps: ``epochs x per_epoch``, or ``max_steps`` when that is fewer.

    Args:
        kind: "sft" or "dpo" (DPO counts pairs).
        st: the stage config.
        n_rows: encoded examples (SFT) or pairs (DPO).

    Returns:
        The `StageBudget`.

    Raises:
        ValueError: the data make no full optimiser step.
    """
    what = "pairs" if kind == "dpo" else "rows"
    per_epoch = n_rows // st.batch_size // st.accum_steps
    if per_epoch < 1:
        raise ValueError(
            f"{kind}: {n_rows} {'pairs' if kind == 'dpo' else 'examples'} are fewer than one "
            f"optimiser step (batch_size {st.batch_size} x accum_steps {st.accum_steps})"
        )
    by_epochs = st.epochs * per_epoch
    epochs = f"{st.epochs} epoch{'s' if st.epochs != 1 else ''}"
    if st.max_steps and st.max_steps < by_epochs:
        reason = f"max_steps={st.max_steps}, fewer than the {by_epochs} steps of {epochs}"
        return StageBudget(total=st.max_steps, per_epoch=per_epoch, reason=reason)
    reason = (
        f"{epochs} x {per_epoch} steps per epoch: {n_rows} {what} // {st.batch_size} per "
        f"micro-batch // {st.accum_steps} accumulated"
    )
    if st.max_steps:
        reason += f"; max_steps={st.max_steps} does not bind"
    return StageBudget(total=by_epochs, per_epoch=per_epoch, reason=reason)


def schedule_change(
    st: StageConfig, old_total: int, new_total: int, at_step: int
) -> dict[str, Any]:
    """What a new step budget does to the learning rate from ``at_step`` on (see the module
    docstring), as a JSON-ready record with a sentence for the log.

    Args:
        st: the stage config (schedule, learning rate, warm-up).
        old_total: the budget the run was started (or last extended) with.
        new_total: the new budget.
        at_step: the step the run continues from (its optimiser count, skipped steps aside).

    Returns:
        ``{"from_step", "old_total", "new_total", "schedule"}``.

    Example:
        >>> from ogpsa_jax.train.schema import SFTConfig
        >>> text = schedule_change(SFTConfig(learning_rate=1.0), 4, 8, 4)["schedule"]
        >>> text[:64]
        'step budget 4 -> 8 at step 4: cosine re-spread over 8 steps; ste'
        >>> text[64:]
        'ps 5-8 follow it (learning rate at step 5: 0.5, the 4-step schedule was at 0)'
    """
    head = f"step budget {old_total} -> {new_total} at step {at_step}"
    if st.schedule == "constant":
        text = f"{head}: constant learning rate {st.learning_rate:g}, unchanged"
    else:
        new_lr = float(make_schedule(st, new_total)(at_step))
        old_lr = float(make_schedule(st, old_total)(min(at_step, old_total)))
        text = (
            f"{head}: {st.schedule} re-spread over {new_total} steps; steps "
            f"{at_step + 1}-{new_total} follow it (learning rate at step {at_step + 1}: "
            f"{new_lr:.3g}, the {old_total}-step schedule was at {old_lr:.3g})"
        )
    return {"from_step": at_step, "old_total": old_total, "new_total": new_total, "schedule": text}


__all__ = ["StageBudget", "schedule_change", "stage_budget"]
