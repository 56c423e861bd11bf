"""What `ogpsa train` prints: readable lines with the numbers when stderr is not a terminal,
stage prefixes, no noise from other libraries, `--quiet`; and the logging pieces themselves."""

import io
import logging
import os
import re
import subprocess
import sys

import pytest

from ogpsa_jax import logs
from ogpsa_jax.train.progress import Progress, step_line

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = (
    "Unable to initialize backend",
    "PyTorch was not found",
    "absl",
    "Generating train split",
    "JAX version",
    "Traceback",
    "checkpoint saved",
)


def ogpsa(*args):
    """`python -m ogpsa_jax.cli ARGS` with stderr a pipe (as under nohup or SLURM)."""
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
    )
    env.pop("JAX_NUM_CPU_DEVICES", None)
    cmd = [sys.executable, "-m", "ogpsa_jax.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stderr


@pytest.mark.slow
def test_lines_without_a_terminal_stage_prefixes_no_noise_and_quiet(tmp_path):
    out = tmp_path / "run"
    base = ["train", "sft-dpo", "--preset", "tiny", "--output-dir", str(out), "--log-every", "2"]
    budget = ["--set", "sft.max_steps=4", "--set", "dpo.max_steps=2"]
    code, err = ogpsa(*base, *budget)
    assert code == 0, err
    lines = err.splitlines()
    step = r"\d\d:\d\d:\d\d INFO {} step {}/{} \| loss \d+\.\d{{4}} \| grad_norm \d+\.\d{{3}} \| "
    step += r"frac_removed \d+\.\d{{3}} \| \d+ tok/s"
    for stage, n, total in (("sft:", 1, 4), ("sft:", 2, 4), ("sft:", 4, 4), ("dpo:", 2, 2)):
        found = [x for x in lines if re.match(step.format(stage, n, total), x)]
        assert len(found) == 1, (stage, n, err)  # once: no duplicated lines
    assert not [x for x in lines if re.search(r"step 3/4 \|", x)]  # --log-every 2
    assert re.search(r"sft: step 4/4 .* \| eta 0:00:0\d", err), err  # an ETA once timed
    for phase in ("sft: step 1 (compiles the train step) ...", "sft: basis refresh before step 1"):
        assert phase in err, phase
    assert "dpo: reference log-probs of the starting model on 64 pairs" in err
    assert "sft: 4 steps: max_steps=4, fewer than the 12 steps of 3 epochs" in err
    assert "dpo: 2 steps: max_steps=2, fewer than the 12 steps of 3 epochs" in err
    stage_lines = [x for x in lines if " INFO " in x and "done: " not in x]
    assert all(re.match(r"\S+ INFO (sft|dpo): ", x) for x in stage_lines), err
    for noise in NOISE:
        assert noise not in err, noise
    assert "\r" not in err  # no tqdm bar

    # A larger DPO budget continues the run (a resume: orbax's read-only warnings are gone).
    code, err = ogpsa(*base, "--set", "sft.max_steps=4", "--set", "dpo.max_steps=3")
    assert code == 0, err
    assert "sft: already complete" in err and "dpo: resumed from checkpoint step 2" in err
    assert "dpo: step budget 2 -> 3 at step 2" in err
    for noise in NOISE:
        assert noise not in err, noise
    # --quiet: nothing but warnings and errors (none here)
    code, err = ogpsa(*base, "--set", "sft.max_steps=4", "--set", "dpo.max_steps=3", "--quiet")
    assert (code, err) == (0, "")


def test_setup_logging_format_noise_and_prefix_seam():
    out = io.StringIO()
    logs.setup_logging("INFO", stream=out, time_format="", prefix=lambda: "[p1] ")
    try:
        logging.getLogger("absl").warning("read_only=True, setting create=False")
        logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
        logging.getLogger("ogpsa_jax.train.loop").info("sft: resumed")
        with logs.stage("dpo"):
            logging.getLogger("ogpsa_jax.data.sources").info("loaded 64 rows")
            logging.getLogger("ogpsa_jax.train.loop").info("dpo: step 1/2")
            logging.getLogger("somelib").error("boom")
        assert out.getvalue().splitlines() == [
            "INFO [p1] sft: resumed",
            "INFO [p1] dpo: loaded 64 rows",
            "INFO [p1] dpo: step 1/2",
            "ERROR [p1] dpo: [somelib] boom",
        ]
        out = io.StringIO()
        logs.setup_logging("DEBUG", stream=out, time_format="")  # the noise, as DEBUG
        logging.getLogger("absl").warning("read_only=True")
        assert out.getvalue() == "DEBUG [absl] read_only=True\n"
        out = io.StringIO()
        logs.setup_logging("INFO", quiet=True, stream=out, time_format="")
        logging.getLogger("ogpsa_jax.x").info("progress")
        logging.getLogger("ogpsa_jax.x").warning("careful")
        assert out.getvalue() == "WARNING careful\n"
        with pytest.raises(ValueError, match="unknown log level 'LOUD'"):
            logs.setup_logging("LOUD")
    finally:
        logging.getLogger().handlers.clear()
        logging.getLogger().setLevel(logging.WARNING)


def test_progress_lines_every_n_steps_with_eta(caplog):
    caplog.set_level(logging.INFO, logger="ogpsa_jax.train.progress")
    p = Progress("sft", total=7, initial=2, every=3, bar=False)
    for step in range(3, 8):
        p.step(step, {"loss": 1.0, "grad_norm": 2.0, "frac_removed": 0.5, "tokens_per_s": 9.0})
    p.close()
    shown = [int(re.search(r"step (\d+)/7", r.getMessage())[1]) for r in caplog.records]
    assert shown == [3, 6, 7]  # the first of this process, every 3rd, the last
    assert "eta" not in caplog.records[0].getMessage() and "eta" in caplog.records[1].getMessage()
    assert step_line("dpo", 1, 2, {"loss": 0.5, "skipped": 1}, None) == (
        "dpo: step 1/2 | loss 0.5000 | SKIPPED (non-finite)"
    )
