"""Fault drill: `ogpsa train sft --preset tiny` killed and preempted, then resumed.

One run folder goes through a chain of faults, each a separate `ogpsa train` process started
with the same command line:

1. SIGTERM from outside as soon as step 1 is logged: the run checkpoints at the next step
   boundary and exits with 75 (`EXIT_PREEMPTED`), without an exported model.
2. SIGKILL a random 0-20 ms into writing an even-step checkpoint: that checkpoint is left
   incomplete (an orbax temporary folder) and is never used.
3. SIGKILL a random 0-20 ms into the basis refresh before step 7.
4. SIGKILL a random 0-30 ms into computing step 7 or 8.
5. The same command once more: it finishes.

The kills come from the fault drill of `ogpsa_jax.testing`: the faulted runs are started as
``python -m ogpsa_jax.testing --fault-drill PHASE@STEP+SECONDS train sft ...``, which installs
the hook (a timer thread in the training process, armed when the phase begins) and runs the
``ogpsa`` command line; the others as ``python -m ogpsa_jax.cli train sft ...``. The random
choices are seeded by ``OGPSA_DRILL_SEED`` (default: fresh, printed in every failure message).
The result must equal an uninterrupted run of the same command bitwise: final weights, the last
checkpoint (params and optimizer state, basis included) and metrics.jsonl (every step once, in
order; timing fields excepted).

Run alone: ``.venv/bin/python -m pytest -q tests/fault_drill.py`` (or ``python
tests/fault_drill.py``); ``make test`` runs it through ``tests/test_reliability.py``.
"""

import os
import random
import signal
import subprocess
import sys
import time

import chex
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from ogpsa_jax.train import EXIT_PREEMPTED
from ogpsa_jax.train.checkpoint import complete_steps
from ogpsa_jax.train.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 8
# Checkpoints after every 2nd step, basis refreshes before steps 1, 4 and 7.
ARGS = [
    "--preset", "tiny", "--max-steps", str(STEPS),
    "--set", "checkpoint_every=2", "--set", "sft.ogpsa.refresh_every=3",
]  # fmt: skip
TIMING_KEYS = {"tokens_per_s", "refresh_s"}


def _env():
    env = dict(os.environ)
    env.update(
        JAX_NUM_CPU_DEVICES="2",  # a 1x2x1 mesh: restores really reshard
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def launch(out, log_name, drill=None):
    """Starts `ogpsa train sft ...` (the console script's module) writing to out; with a drill
    (``PHASE@STEP+SECONDS``), under `ogpsa_jax.testing`'s fault drill."""
    log = open(out.parent / f"{out.name}.{log_name}.log", "w")  # noqa: SIM115
    runner = ["ogpsa_jax.testing", "--fault-drill", drill] if drill else ["ogpsa_jax.cli"]
    cmd = [sys.executable, "-m", *runner, "train", "sft", "--output-dir", str(out), *ARGS]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log.name
    return proc


def finish(proc, timeout=300):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def tail(proc, n=25):
    with open(proc.log_path) as f:
        return "".join(f.readlines()[-n:])


def steps_logged(out):
    return [r["step"] for r in read_metrics(out / "metrics.jsonl")]


def records(out):
    return [
        {k: v for k, v in r.items() if k not in TIMING_KEYS}
        for r in read_metrics(out / "metrics.jsonl")
    ]


def state(out, step):
    path = os.path.join(os.path.abspath(out), "checkpoints", str(step), "state")
    return ocp.StandardCheckpointer().restore(path)


@pytest.mark.slow
def test_kill_and_preempt_then_resume_equals_uninterrupted(tmp_path):
    seed = int(os.environ.get("OGPSA_DRILL_SEED", random.SystemRandom().randrange(10**6)))
    rng = random.Random(seed)
    why = f"(OGPSA_DRILL_SEED={seed})"
    base, run = tmp_path / "uninterrupted", tmp_path / "faulted"
    baseline = launch(base, "run")  # in parallel with the chain (compiles are single-threaded)

    # 1. Preemption: SIGTERM once step 1 is logged -> checkpoint at the next boundary, exit 75.
    proc = launch(run, "1-sigterm")
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not steps_logged(run):
        assert proc.poll() is None and time.time() < deadline, tail(proc)
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert finish(proc) == EXIT_PREEMPTED, tail(proc)
    preempted_at = steps_logged(run)[-1]
    assert complete_steps(run / "checkpoints")[-1] == preempted_at < STEPS, why
    assert not (run / "final").exists()

    # 2. SIGKILL while a checkpoint is being written: it stays incomplete and is never used.
    save_at = rng.choice([s for s in (2, 4, 6) if s > preempted_at])
    proc = launch(run, "2-kill-save", f"save@{save_at}+{rng.uniform(0, 0.02):.4f}")
    assert finish(proc) == -signal.SIGKILL, tail(proc)
    assert f"resumed from checkpoint step {preempted_at}" in tail(proc, 200), why
    assert save_at not in complete_steps(run / "checkpoints"), f"kill landed after the save {why}"
    assert steps_logged(run)[-1] == save_at, why

    # 3. SIGKILL during the basis refresh before step 7 (after checkpoint 6).
    proc = launch(run, "3-kill-refresh", f"refresh@7+{rng.uniform(0, 0.02):.4f}")
    assert finish(proc) == -signal.SIGKILL, tail(proc)
    assert steps_logged(run)[-1] == 6 and complete_steps(run / "checkpoints")[-1] == 6, why

    # 4. SIGKILL in the middle of a step.
    step_at = rng.choice([7, 8])
    proc = launch(run, "4-kill-step", f"step@{step_at}+{rng.uniform(0, 0.03):.4f}")
    assert finish(proc) == -signal.SIGKILL, tail(proc)
    assert steps_logged(run)[-1] in (step_at - 1, step_at), why
    assert not (run / "final").exists()

    # 5. The same command again finishes the run.
    proc = launch(run, "5-finish")
    assert finish(proc) == 0, tail(proc)
    assert finish(baseline) == 0, tail(baseline)

    # Same seed, config and device count: bitwise the uninterrupted result.
    assert steps_logged(run) == list(range(1, STEPS + 1)), why
    assert records(run) == records(base), why
    chex.assert_trees_all_equal(
        load_file(run / "final" / "model.safetensors"),
        load_file(base / "final" / "model.safetensors"),
    )
    chex.assert_trees_all_equal(state(run, STEPS), state(base, STEPS))
    leftovers = [n for n in os.listdir(run / "checkpoints") if not n.isdigit()]
    assert leftovers == [], leftovers


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
