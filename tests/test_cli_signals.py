"""Ctrl-C behaves like SIGTERM: the first one checkpoints at the next step boundary and exits
130 with one line; a second one stops at once, and the checkpoint it cut short is never resumed
from. The runs are subprocesses of the fault drill (`ogpsa_jax.testing`), whose hooks send the
Ctrl-C (SIGINT) at a chosen moment; the interrupted chain ends bitwise equal to a clean run."""

import os
import random
import signal
import subprocess
import sys

import chex
import pytest
from safetensors.numpy import load_file

from ogpsa_jax.train.checkpoint import complete_steps
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.signals import EXIT_INTERRUPTED, StopRequest

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
# Checkpoints after every 3rd step: a stop at step 2 or 5 writes a checkpoint of its own.
ARGS = ["--preset", "tiny", "--max-steps", str(STEPS), "--set", "checkpoint_every=3"]
TIMING = {"tokens_per_s", "refresh_s"}
SEED = int(os.environ.get("OGPSA_DRILL_SEED", random.SystemRandom().randrange(10**6)))
WHY = f"(OGPSA_DRILL_SEED={SEED})"


def launch(out, name, drill=None):
    env = dict(os.environ)
    env.update(
        JAX_NUM_CPU_DEVICES="2",
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    runner = ["ogpsa_jax.testing", "--fault-drill", drill] if drill else ["ogpsa_jax.cli"]
    cmd = [sys.executable, "-m", *runner, "train", "sft", "--output-dir", str(out), *ARGS]
    log = out.parent / f"{out.name}.{name}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    proc.log_path = log
    return proc


def finish(proc):
    try:
        code = proc.wait(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, proc.log_path.read_text()


def records(out):
    return [
        {k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(out / "metrics.jsonl")
    ]


@pytest.mark.slow
def test_ctrl_c_checkpoints_a_second_one_stops_at_once_and_nothing_half_written_is_resumed(
    tmp_path,
):
    clean, run = tmp_path / "clean", tmp_path / "run"
    baseline = launch(clean, "clean")  # in parallel with the chain

    # 1. Ctrl-C during step 2: the step finishes, checkpoint 2 is written, one line, exit 130.
    code, log = finish(launch(run, "1-int", "step@2+0:INT"))
    assert code == EXIT_INTERRUPTED, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    assert log.count("stopped by Ctrl-C at step 2 (checkpoint saved)") == 1, log
    assert complete_steps(run / "checkpoints") == [2]
    assert [r["step"] for r in records(run)] == [1, 2] and not (run / "final").exists()

    # 2. Resumed; Ctrl-C during step 5 (unsaved since checkpoint 3) asks for a checkpoint at
    #    5, and a second Ctrl-C a random 0-0.2 s into writing it stops at once: in the save
    #    (left incomplete), in orbax's clean-up of step 2 after it, or just after.
    delay = random.Random(SEED).uniform(0.0, 0.2)
    code, log = finish(launch(run, "2-int-int", f"step@5+0:INT,save@5+{delay:.3f}:INT"))
    assert code == EXIT_INTERRUPTED, f"{log} {WHY}"
    assert "Traceback" not in log and "Ctrl-C: checkpointing at the next step" in log, log
    assert log.rstrip().endswith("(run the same command again to resume)"), log
    complete = complete_steps(run / "checkpoints")
    assert complete[-1] in (3, 5), f"{complete} {WHY}"
    incomplete = sorted(set(os.listdir(run / "checkpoints")) - {str(s) for s in complete})
    assert not (run / "final").exists()

    # 3. The same command again removes whatever the cut left, resumes from the last complete
    #    checkpoint, and finishes.
    code, log = finish(launch(run, "3-finish"))
    assert code == 0, log
    assert f"resumed from checkpoint step {complete[-1]}" in log, f"{log} {WHY}"
    assert ("removing the incomplete checkpoint" in log) == bool(incomplete), f"{incomplete} {WHY}"
    assert finish(baseline)[0] == 0
    assert records(run) == records(clean)
    chex.assert_trees_all_equal(
        load_file(run / "final" / "model.safetensors"),
        load_file(clean / "final" / "model.safetensors"),
    )
    assert [n for n in os.listdir(run / "checkpoints") if not n.isdigit()] == []


def test_stop_request_first_ctrl_c_asks_second_raises():
    stop = StopRequest()
    with pytest.raises(KeyboardInterrupt):  # nothing unsaved (loading, compiling): at once
        stop.handle(signal.SIGINT)
    assert not stop.requested()
    stop.unsaved = True
    stop.handle(signal.SIGINT)  # steps to keep: checkpoint at the next boundary
    assert stop.requested() and stop.signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        stop.handle(signal.SIGINT)
    term = StopRequest()
    term.handle(signal.SIGTERM)
    term.handle(signal.SIGTERM)  # repeated SIGTERMs only ask again
    assert term.requested() and term.signal == "SIGTERM"
    agreed = StopRequest(agree=lambda sig: "SIGTERM")  # the multi-host seam decides
    assert agreed.requested() and agreed.signal == "SIGTERM"
    assert not StopRequest(agree=lambda sig: None).requested()
