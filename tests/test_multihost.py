"""Multi-process jobs: the job's shape read from flags and launcher environments (unit tests),
and 2 JAX processes x 4 virtual CPU devices standing in for 2 hosts (slow tests): the same
training as 1 process x 8 devices, a SIGTERM to one process stopping both at one step, a
SIGKILLed process stopping the other, and a two-process checkpoint resumed by one process.

Every process a test starts is SIGKILLed at the end if still alive (JAX's preemption service
swallows SIGTERM)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import chex
import numpy as np
import pytest
from safetensors.numpy import load_file

from ogpsa_jax import cli, launch
from ogpsa_jax.distributed import JobSpec, job_spec
from ogpsa_jax.train import apply_overrides, preset, train
from ogpsa_jax.train.checkpoint import complete_steps
from ogpsa_jax.train.metrics import read_metrics
from ogpsa_jax.train.signals import EXIT_PREEMPTED, StopRequest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- the job's shape

JAX3 = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "2"}
SLURM = {
    "SLURM_JOB_ID": "77",
    "SLURM_NTASKS": "8",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_STEP_NODELIST": "gpu[01-02]",
}
OMPI = {
    "OMPI_COMM_WORLD_SIZE": "2",
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_RANK": "0",
    "OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.1.2.3:4567",
}


@pytest.mark.parametrize(
    "env, flags, want",
    [
        ({}, {}, JobSpec("single")),
        ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, {}, JobSpec("single")),  # one task
        ({"OMPI_COMM_WORLD_SIZE": "1"}, {}, JobSpec("single")),
        (JAX3, {}, JobSpec("JAX_*", "10.0.0.1:1234", 4, 2)),
        (SLURM, {}, JobSpec("SLURM", None, 8, 5)),
        ({**SLURM, "JAX_COORDINATOR_ADDRESS": "n1:9"}, {}, JobSpec("SLURM", "n1:9", 8, 5)),
        (OMPI, {}, JobSpec("Open MPI", None, 2, 1)),
        (
            {**OMPI, "OMPI_MCA_orte_hnp_uri": "", "JAX_COORDINATOR_ADDRESS": "h:2"},
            {},
            JobSpec("Open MPI", "h:2", 2, 1),
        ),
        ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, {}, JobSpec("TPU")),
        ({"TPU_WORKER_HOSTNAMES": "t0"}, {}, JobSpec("single")),  # a one-host TPU VM
        ({}, {"detect": True}, JobSpec("detect")),
        (
            {},
            {"coordinator": "h:1", "num_processes": 2, "process_id": 0},
            JobSpec("flags", "h:1", 2, 0),
        ),
        (  # flags win over a launcher's variables that agree with them
            SLURM,
            {"coordinator": "h:1", "num_processes": 8, "process_id": 5},
            JobSpec("flags", "h:1", 8, 5),
        ),
    ],
)
def test_job_spec_reads_each_launcher(env, flags, want):
    assert job_spec(env, **flags) == want


@pytest.mark.parametrize(
    "env, flags, message",
    [
        ({"JAX_COORDINATOR_ADDRESS": "h:1"}, {}, "without JAX_NUM_PROCESSES, JAX_PROCESS_ID"),
        ({"JAX_NUM_PROCESSES": "2"}, {}, "without JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID"),
        ({**JAX3, "JAX_PROCESS_ID": "4"}, {}, "JAX_PROCESS_ID=4 must be below"),
        ({**JAX3, "JAX_PROCESS_ID": "one"}, {}, "JAX_PROCESS_ID must be an integer"),
        ({**JAX3, "JAX_NUM_PROCESSES": "0"}, {}, "JAX_NUM_PROCESSES must be >= 1"),
        ({**JAX3, "JAX_COORDINATOR_ADDRESS": "10.0.0.1"}, {}, "must read HOST:PORT"),
        ({**JAX3, "JAX_NUM_CPU_DEVICES": "four"}, {}, "JAX_NUM_CPU_DEVICES must be an integer"),
        ({k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}, {}, "SLURM_PROCID not set"),
        (
            {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NODELIST"},
            {},
            "SLURM_STEP_NODELIST not set: start every process with the launcher (srun)",
        ),
        ({**SLURM, "SLURM_NTASKS": "x"}, {}, "SLURM_NTASKS must be an integer"),
        ({**OMPI, "OMPI_MCA_orte_hnp_uri": ""}, {}, "set JAX_COORDINATOR_ADDRESS=HOST:PORT"),
        ({**SLURM, "JAX_NUM_PROCESSES": "4"}, {}, "without JAX_COORDINATOR_ADDRESS"),
        (
            {**SLURM, **JAX3},  # an environment left over from two launchers
            {},
            "inconsistent environment: SLURM_NTASKS=8 but JAX_* says 4",
        ),
        ({}, {"num_processes": 2}, "--num-processes given without --coordinator, --process-id"),
        (
            {},
            {"coordinator": "h:1", "num_processes": 2, "process_id": 2},
            "--process-id=2 must be below --num-processes=2",
        ),
        ({}, {"coordinator": "h:0", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
        (
            JAX3,
            {"coordinator": "h:1", "num_processes": 2, "process_id": 0},
            "inconsistent environment: JAX_NUM_PROCESSES=4 but flags says 2",
        ),
    ],
)
def test_job_spec_names_partial_or_inconsistent_environments(env, flags, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        job_spec(env, **flags)


def test_cli_names_a_bad_job_before_anything_runs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    out = tmp_path / "run"
    code = cli.main(["train", "sft", "--preset", "tiny", "--output-dir", str(out)])
    assert code == cli.EXIT_BAD_INPUT
    assert "set without JAX_NUM_PROCESSES, JAX_PROCESS_ID" in capsys.readouterr().err
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    args = ["train", "sft", "--preset", "tiny", "--output-dir", str(out)]
    assert cli.main([*args, "--process-id", "1"]) == cli.EXIT_BAD_INPUT
    assert "--process-id given without --coordinator" in capsys.readouterr().err
    assert cli.main([*args, "--heartbeat-timeout", "0"]) == cli.EXIT_BAD_INPUT
    assert "--heartbeat-timeout must be >= 1" in capsys.readouterr().err
    assert not out.exists()


def test_launcher_environment_and_statuses():
    env = launch.process_env(
        {"SLURM_JOB_ID": "3", "SLURM_NTASKS": "4", "KEEP": "1"},
        port=4321,
        processes=3,
        index=2,
        devices=4,
    )
    assert job_spec(env) == JobSpec("JAX_*", "127.0.0.1:4321", 3, 2)  # the outer job is gone
    assert env["JAX_NUM_CPU_DEVICES"] == "4" and env["KEEP"] == "1"
    assert launch.exit_status(-signal.SIGKILL) == 137 and launch.exit_status(75) == 75
    assert "aborted by JAX's distributed runtime" in launch.describe(0, launch.ABORTED)
    with pytest.raises(ValueError, match="nothing to run"):
        launch.run_job([], processes=2, devices=1)
    with pytest.raises(ValueError, match="--processes and --devices-per-process must be >= 1"):
        launch.run_job(["train"], processes=0, devices=1)


def test_a_multi_process_first_ctrl_c_waits_for_the_others():
    stop = StopRequest(agree=lambda sig: sig)  # a multi-process job: the others must agree
    stop.handle(signal.SIGINT)  # nothing unsaved, yet no KeyboardInterrupt: the others wait
    assert stop.requested() and stop.signal == "SIGINT"
    with pytest.raises(KeyboardInterrupt):  # a second one still stops at once
        stop.handle(signal.SIGINT)


# ----------------------------------------------------------------------------- 2 x 4 devices

STEPS = 3
# SFT with a flat basis, DPO (precomputed reference log-probs) with an activation basis.
SETS = ["checkpoint_every=2", "dpo.ogpsa.method=activation"]
ARGS = ["--preset", "tiny", "--max-steps", str(STEPS)] + [x for s in SETS for x in ("--set", s)]
TIMING = {"tokens_per_s", "refresh_s"}
WEIGHTS_ATOL = 1e-4  # 2 x 4 vs 1 x 8: gloo's cross-process sums add in another order (~1e-5)
METRICS_RTOL = 1e-3


def tiny_config():
    cfg = apply_overrides(preset("tiny"), SETS)
    return apply_overrides(cfg, [f"sft.max_steps={STEPS}", f"dpo.max_steps={STEPS}"])


def started(procs):
    """SIGKILLs whatever is left of ``procs`` (SIGTERM is swallowed by JAX)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def start(out, command, port, index, *, drill="", poison=(), log_name, extra=(), args=ARGS):
    """Process ``index`` of a 2 x 4 job running ``ogpsa train COMMAND`` (under the fault drill
    when ``drill``, with `ogpsa_jax.testing`'s poison options ``poison``); its output goes to
    a log file."""
    env = launch.process_env(os.environ, port=port, processes=2, index=index, devices=4)
    env.update(OPENBLAS_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    runner = ["ogpsa_jax.testing", "--fault-drill", drill, *poison]
    cmd = [sys.executable, "-m", *runner, "train", command, "--output-dir", str(out), *args]
    log = out.parent / f"{log_name}.{index}.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([*cmd, *extra], cwd=REPO, env=env, stdout=f, stderr=f)
    proc.log_path = log
    return proc


def wait(proc, timeout=400):
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, proc.log_path.read_text()


def wait_all(procs):
    """Every process's (exit status, log); whatever is left is SIGKILLed."""
    try:
        return [wait(p) for p in procs]
    finally:
        started(procs)


def weights(folder):
    return load_file(folder / "model.safetensors")


def metrics(path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(path)]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """``ogpsa launch --processes 2 --devices-per-process 4 -- train sft-dpo ...``."""
    root = tmp_path_factory.mktemp("two")
    out = root / "two"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        mp.setenv("OPENBLAS_NUM_THREADS", "1")
        with open(root / "launch.log", "w") as f:
            code = launch.run_job(
                ["train", "sft-dpo", "--output-dir", str(out), *ARGS],
                processes=2,
                devices=4,
                out=f,
            )
    return code, out, (root / "launch.log").read_text()


@pytest.mark.slow
def test_two_processes_train_like_one_and_write_once(two_process_run, tmp_path):
    code, two, log = two_process_run
    assert code == 0, log
    one = tmp_path / "one"
    train("sft-dpo", tiny_config(), one)  # this test process: 1 process x 8 devices
    for stage in ("sft/", ""):
        chex.assert_trees_all_close(
            weights(two / f"{stage}final"), weights(one / f"{stage}final"), atol=WEIGHTS_ATOL
        )
        a, b = metrics(two / f"{stage}metrics.jsonl"), metrics(one / f"{stage}metrics.jsonl")
        assert [r["step"] for r in a] == list(range(1, STEPS + 1))  # every step once
        assert [sorted(r) for r in a] == [sorted(r) for r in b]
        for ra, rb in zip(a, b, strict=True):
            for key in ra:
                if stage == "" and ra["step"] == 1 and key == "accuracy":
                    # step 1 of DPO: policy == reference, so the reward margins are rounding
                    # noise and their signs (the accuracy) follow the summation order
                    continue
                np.testing.assert_allclose(ra[key], rb[key], rtol=METRICS_RTOL, atol=1e-6)
        assert json.loads((two / f"{stage}done.json").read_text())["step"] == STEPS
        assert len(list((two / f"{stage}tb").iterdir())) == 1  # one TensorBoard writer
    assert json.loads((two / "config.json").read_text())["command"] == "sft-dpo"
    # Process 0 tells the run; process 1 says nothing at INFO; no gloo lines.
    assert log.count("model exported to") == 2 and "[0] " in log, log
    assert not [line for line in log.splitlines() if line.startswith("[1] ")], log
    assert "Gloo" not in log


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_one_step_and_resumes(two_process_run, tmp_path):
    code, uninterrupted, _ = two_process_run
    assert code == 0
    run, port = tmp_path / "run", launch.free_port()
    # SIGTERM to process 1 only, while it computes SFT step 1: both checkpoint step 1, exit 75.
    procs = [
        start(run, "sft-dpo", port, 0, log_name="term"),
        start(run, "sft-dpo", port, 1, drill="step@1+0:TERM", log_name="term"),
    ]
    (code0, log0), (code1, log1) = wait_all(procs)
    assert (code0, code1) == (EXIT_PREEMPTED, EXIT_PREEMPTED), log0 + log1
    assert "stopped by SIGTERM at step 1 (checkpoint saved)" in log0, log0
    assert complete_steps(run / "sft" / "checkpoints") == [1]
    assert [r["step"] for r in read_metrics(run / "sft" / "metrics.jsonl")] == [1]
    elastic = tmp_path / "elastic"
    shutil.copytree(run, elastic)

    # Rerunning both resumes and ends bitwise equal to the uninterrupted two-process run.
    port = launch.free_port()
    procs = [start(run, "sft-dpo", port, i, log_name="resume") for i in (0, 1)]
    (code0, log0), (code1, log1) = wait_all(procs)
    assert (code0, code1) == (0, 0), log0 + log1
    assert "sft: resumed from checkpoint step 1" in log0, log0
    for stage in ("sft/", ""):
        chex.assert_trees_all_equal(
            weights(run / f"{stage}final"), weights(uninterrupted / f"{stage}final")
        )
        assert metrics(run / f"{stage}metrics.jsonl") == metrics(
            uninterrupted / f"{stage}metrics.jsonl"
        )

    # The two-process checkpoint resumes on one process x 8 devices (params, optimizer state,
    # basis onto the new mesh) and ends where the two-process run ended.
    result = train("sft-dpo", tiny_config(), elastic)
    assert not result.preempted
    for stage in ("sft/", ""):
        chex.assert_trees_all_close(
            weights(elastic / f"{stage}final"),
            weights(uninterrupted / f"{stage}final"),
            atol=WEIGHTS_ATOL,
        )


@pytest.mark.slow
def test_sigkill_of_one_process_stops_the_other_and_both_resume(two_process_run, tmp_path):
    code, uninterrupted, _ = two_process_run
    assert code == 0
    run, port = tmp_path / "run", launch.free_port()
    beat = ["--heartbeat-timeout", "10"]
    # Process 1 is SIGKILLed computing SFT step 3 (checkpoint 2 is complete); process 0, in
    # the step's collectives, is aborted by JAX once the heartbeat timeout passes.
    procs = [
        start(run, "sft", port, 0, log_name="kill", extra=beat),
        start(run, "sft", port, 1, drill="step@3+0.2:KILL", log_name="kill", extra=beat),
    ]
    try:
        code1, log1 = wait(procs[1])
        died = time.monotonic()
        code0, log0 = wait(procs[0], timeout=180)
        after = time.monotonic() - died
    finally:
        started(procs)
    assert code1 == -signal.SIGKILL, log1
    assert code0 != 0 and after < 120, (code0, after, log0)
    assert "another task died" in log0 or "unhealthy" in log0, log0
    assert complete_steps(run / "checkpoints") == [2]

    port = launch.free_port()
    procs = [start(run, "sft", port, i, log_name="again") for i in (0, 1)]
    (code0, log0), (code1, log1) = wait_all(procs)
    assert (code0, code1) == (0, 0), log0 + log1
    assert "resumed from checkpoint step 2" in log0, log0
    # `train sft` computes what the SFT stage of `train sft-dpo` computes.
    chex.assert_trees_all_equal(weights(run / "final"), weights(uninterrupted / "sft" / "final"))


@pytest.mark.slow
def test_a_nonfinite_step_is_skipped_by_every_process_and_lora_exports_once(tmp_path):
    # The poison is NaN in process 1's copy of the step input only (0 in process 0's): the
    # gradient is non-finite on process 1's devices alone, and the skip is still decided alike,
    # from the step's global values. The run trains LoRA adapters, so process 0 also writes
    # the PEFT folder and the merged model from the gathered weights.
    run, port = tmp_path / "run", launch.free_port()
    args = ["--preset", "tiny", "--max-steps", "3", "--set", "model.lora.rank=4"]
    procs = [
        start(
            run,
            "sft",
            port,
            i,
            poison=["--poison-steps", "2", "--poison", p],
            args=args,
            log_name="nonfinite",
        )
        for i, p in ((0, "0"), (1, "nan"))
    ]
    (code0, log0), (code1, log1) = wait_all(procs)
    assert (code0, code1) == (0, 0), log0 + log1
    for log in (log0, log1):
        assert "sft step 2 skipped: non-finite value at parameter" in log, log
    records = read_metrics(run / "metrics.jsonl")
    assert [(r["step"], r["skipped"], r["skips"]) for r in records] == [
        (1, 0, 0),
        (2, 1, 1),
        (3, 0, 1),
    ]
    assert json.loads((run / "done.json").read_text()) == {"step": 3, "skips": 1, "total": 3}
    assert (run / "final" / "adapter_model.safetensors").is_file()
    merged, base = weights(run / "final-merged"), weights(run / "base")
    assert merged.keys() == base.keys() and all(np.isfinite(v).all() for v in merged.values())
    assert any(not np.array_equal(merged[k], base[k]) for k in merged)  # the adapters trained
