"""Data for `ogpsa train`: every documented format and example file loads, local paths are local
(any extension), a missing file is a named error before anything runs, chat turns and masks."""

import pathlib
import shutil

import numpy as np
import pytest

from ogpsa_jax import data
from ogpsa_jax.cli import EXIT_BAD_INPUT, main
from ogpsa_jax.overrides import apply_overrides
from ogpsa_jax.train import preset
from ogpsa_jax.train.inputs import load_inputs
from ogpsa_jax.train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples" / "data"

# file -> (loader, rows); every example file docs/data.md links to.
CASES = {
    "sft.jsonl": ("sft", 3),
    "sft_list.json": ("sft", 3),
    "sft_rows.txt": ("sft", 3),
    "sft.parquet": ("sft", 3),
    "messages.jsonl": ("sft", 2),
    "preferences.jsonl": ("prefs", 2),
    "preferences_messages.jsonl": ("prefs", 2),
    "pku_saferlhf.jsonl": ("prefs", 2),
    "halueval_qa.jsonl": ("prefs", 2),
}


def load(kind, path):
    return data.load_sft(path) if kind == "sft" else data.load_preferences(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_example_file_loads(name):
    kind, rows = CASES[name]
    loaded = load(kind, EXAMPLES / name)
    assert len(loaded) == rows
    assert name in (ROOT / "docs" / "data.md").read_text()  # documented
    if kind == "prefs":  # pairs are SFT data too (the chosen reply)
        assert [e.response for e in data.load_sft(EXAMPLES / name)] == [p.chosen for p in loaded]


def test_every_file_in_the_examples_folder_is_tested():
    assert sorted(p.name for p in EXAMPLES.iterdir()) == sorted(CASES)


def test_extensionless_and_odd_extensions_are_local(tmp_path):
    want = data.load_sft(EXAMPLES / "sft.jsonl")
    for name, src in (("rows", "sft.jsonl"), ("rows.data", "sft_list.json"), ("t", "sft.parquet")):
        shutil.copy(EXAMPLES / src, tmp_path / name)
        assert data.load_sft(tmp_path / name) == want, name
    (tmp_path / "notes.txt").write_text("just some text\n")
    with pytest.raises(ValueError, match=r"notes.txt: not a JSON-lines, JSON or Parquet file"):
        data.load_sft(tmp_path / "notes.txt")


def test_source_kind_local_first_hub_only_for_org_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data.source_kind("org/name") == "hub"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_text('{"prompt": "p", "response": "r"}\n')
    assert data.source_kind("org/name") == "file"  # an existing path wins over a hub id
    assert data.source_kind(tmp_path / "org") == "folder"
    for missing in ("data/x.txt", "org/name.jsonl", "./org/other", "/no/such", "a/b/c", "x.txt"):
        with pytest.raises(ValueError, match="no such file or folder"):
            data.source_kind(missing)


def cli(out, *args):
    return main(["train", "sft", "--preset", "tiny", "--output-dir", str(out), *args])


@pytest.mark.parametrize("field", ["sft.data", "sft.ogpsa.reference"])
def test_missing_data_file_is_a_named_error_before_anything(tmp_path, capsys, field):
    out = tmp_path / "never"
    missing = tmp_path / "my_data.txt"
    assert cli(out, "--set", f"{field}={missing}") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"config field '{field}': {missing}: no such file or folder" in err, err
    assert not out.exists()


def test_train_turns_all_or_last_sets_the_loss_mask():
    messages = str(EXAMPLES / "messages.jsonl")
    masks = {}
    for turns in ("all", "last"):
        cfg = apply_overrides(
            preset("tiny"),
            [f"sft.data={messages}", f"sft.train_turns={turns}", "sft.ogpsa.enabled=false"],
        )
        inputs = load_inputs("sft", cfg)
        enc = inputs.encoded["sft"][0]  # the two-turn conversation
        masks[turns] = inputs.tokenizer.decode(enc.ids[np.asarray(enc.loss_mask, bool)])
    assert masks["all"] == "12 x 12 = 144.<|im_end|>Half of 144 is 72.<|im_end|>"
    assert masks["last"] == "Half of 144 is 72.<|im_end|>"


@pytest.mark.slow
def test_train_on_a_local_txt_file_and_an_extensionless_reference(tmp_path):
    shutil.copy(data.assets_path("safety_sft.jsonl"), tmp_path / "my_sft.txt")
    shutil.copy(data.assets_path("general.jsonl"), tmp_path / "general")
    out = tmp_path / "run"
    sets = [f"sft.data={tmp_path / 'my_sft.txt'}", f"sft.ogpsa.reference={tmp_path / 'general'}"]
    assert cli(out, "--max-steps", "1", *[a for s in sets for a in ("--set", s)]) == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1]
    assert (out / "final" / "model.safetensors").is_file()


def test_output_folder_is_checked_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    reads = []
    monkeypatch.setattr(data, "load_sft", lambda *a, **k: reads.append(a) or [])
    # a missing data file and a foreign folder: the folder is named, nothing was read
    assert cli(out, "--set", f"sft.data={tmp_path / 'missing.jsonl'}") == EXIT_BAD_INPUT
    assert "exists and is not an ogpsa run" in capsys.readouterr().err
    assert reads == [] and (out / "notes.txt").read_text() == "precious"
