"""The ``ogpsa`` command line, called in-process: an end-to-end tiny run and the named errors."""

import json
import os
import re

import pytest
from safetensors.numpy import load_file

from ogpsa_jax.cli import EXIT_BAD_INPUT, main
from ogpsa_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not


def run(out, *extra):
    return main(["train", "sft", "--preset", "tiny", "--output-dir", str(out), *extra])


def snapshot(path):
    """Every file under path with its size and mtime (to show a folder is untouched)."""
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


def test_train_sft_end_to_end_then_resume_and_guard(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(out, "--max-steps", "3") == 0
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(r["skipped"] == 0 for r in recs)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["command"] == "sft" and cfg["config"]["sft"]["max_steps"] == 3
    assert sorted(os.listdir(out / "checkpoints")) == ["3"]
    assert any(f.startswith("events") for f in os.listdir(out / "tb"))
    weights = load_file(out / "final" / "model.safetensors")
    assert "model.embed_tokens.weight" in weights
    assert (out / "final" / "tokenizer.json").is_file()

    # Same command again: the run is complete, nothing is recomputed or rewritten.
    before = snapshot(out)
    assert run(out, "--max-steps", "3") == 0
    assert snapshot(out) == before

    # A different config refuses to touch the folder without --overwrite, naming the change.
    capsys.readouterr()
    assert run(out, "--max-steps", "3", "--set", "sft.learning_rate=0.1") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "different config" in err and "learning_rate" in err and "--overwrite" in err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "sft.ogpsa.kk=3"], r"unknown config field 'sft.ogpsa.kk'.*sft.ogpsa.k"),
        (["--set", "sft.learnig_rate=1"], r"did you mean sft.learning_rate"),
        (["--set", "sft.ogpsa.k=abc"], r"sft.ogpsa.k: expected an int"),
        (["--set", "sft.ogpsa.k=0"], r"'sft.ogpsa.k' must be >= 1"),
        (["--set", "sft.ogpsa.strength=1.5"], r"strength' must be in \[0, 1\]"),
        (["--set", "sft.max_length=0"], r"'sft.max_length' must be > 0"),
        (["--set", "model.scan_unroll=-1"], r"'model.scan_unroll' must be >= 0"),
        (["--set", "model.attention_chunk=-3"], r"'model.attention_chunk' must be >= -1"),
        (["--set", "mesh=3,1,1"], r"mesh \(3, 1, 1\) has 3 devices but 8 are used"),
        (["--set", "sft.batch_size=6"], r"batch_size'=6 is not divisible"),
        (
            ["--set", "sft.ogpsa.method=gradient", "--set", "sft.ogpsa.conflict_only=true"],
            r"'sft.ogpsa.conflict_only': conflict_only=True is not supported by the matrix",
        ),
        (["--set", "model.path=/no/such/model"], r"model folder '/no/such/model' not found"),
        (["--max-steps", "0"], r"--max-steps must be >= 1"),
    ],
)
def test_bad_config_leaves_output_untouched(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert run(out, *args) == EXIT_BAD_INPUT
    assert not out.exists()
    assert re.search(message, capsys.readouterr().err), message


def test_unknown_preset(tmp_path, capsys):
    out = tmp_path / "never"
    code = main(["train", "dpo", "--preset", "tinyy", "--output-dir", str(out)])
    assert code == EXIT_BAD_INPUT and not out.exists()
    assert "unknown preset 'tinyy' (did you mean tiny?)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (
            ['{"prompt": "hi", "response": "ok"}', '{"prompt": "x"}'],
            r"row 1: field 'response' is missing",
        ),
        (
            ['{"prompt": "hi", "response": "ok"}', '{"prompt": "x", "response": ""}'],
            r"row 1: field 'response' is empty",
        ),
        (
            ['{"prompt": "hi", "response": "ok"}', '{"prompt": "x", "resp'],
            r"row 1 \(line 2\): unreadable JSON",
        ),
    ],
)
def test_bad_data_file_named_error(tmp_path, capsys, lines, message):
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "never"
    assert run(out, "--set", f"sft.data={data}") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert str(data) in err and re.search(message, err), err
    assert not out.exists()


def test_overlong_row_without_truncation(tmp_path, capsys):
    out = tmp_path / "never"
    assert run(out, "--set", "sft.truncation=error", "--set", "sft.max_length=40") == 2
    assert re.search(r"example \d+ has \d+ tokens > max_length=40", capsys.readouterr().err)
    assert not out.exists()


def test_existing_foreign_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert run(out) == EXIT_BAD_INPUT
    assert "not an ogpsa run" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "precious"
