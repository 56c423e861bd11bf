"""Model folders in `ogpsa train`, `ogpsa eval` and `ogpsa generate`: `model.path` alone selects
a folder and its tokenizer, the tokenizer is checked against the model before any compute, and a
run whose every step was skipped never reports success."""

import json
import logging
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from transformers import AutoTokenizer

from ogpsa_jax import data, models
from ogpsa_jax.cli import EXIT_BAD_INPUT, EXIT_NONFINITE, main
from ogpsa_jax.testing import inject_nonfinite

pytestmark = pytest.mark.slow  # end-to-end runs: `make test` runs them, `make test-fast` not


def tokenizer():
    return AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))


def model_folder(path, *, vocab_size=None, seed=123, with_tokenizer=True, extra_token=False):
    """A tiny HF folder (random weights of ``seed``) with the shipped tokenizer's files (plus
    one token of its own with ``extra_token``, to tell it from the shipped tokenizer)."""
    tok = tokenizer()
    if extra_token:
        tok.add_tokens(["<|folder_token|>"])
    cfg = models.tiny_config(vocab_size=vocab_size or len(tok))
    models.save_hf(models.init_random(cfg, seed=seed, dtype=jnp.float32), path)
    if with_tokenizer:
        tok.save_pretrained(path)
    return path


def train(out, *args):
    return main(["train", "sft", "--preset", "tiny", "--output-dir", str(out), *args])


def test_tokenizer_that_does_not_fit_the_model_is_named_before_compute(tmp_path, capsys):
    folder = model_folder(tmp_path / "small-vocab", vocab_size=20)
    out = tmp_path / "never"
    assert train(out, "--set", f"model.path={folder}", "--max-steps", "3") == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    n = len(tokenizer())
    assert f"tokenizer '{folder}' has {n} tokens but the model's embedding has 20 rows" in err
    assert not out.exists()


def test_folder_without_tokenizer_files_or_chat_template(tmp_path, capsys):
    folder = model_folder(tmp_path / "bare", with_tokenizer=False)
    out = tmp_path / "never"
    assert train(out, "--set", f"model.path={folder}") == EXIT_BAD_INPUT
    assert f"folder '{folder}' holds no tokenizer" in capsys.readouterr().err
    # a tokenizer folder without a chat template (model.tokenizer names another folder)
    tok_dir = tmp_path / "no-template"
    tokenizer().save_pretrained(tok_dir)
    (tok_dir / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    args = ["--set", f"model.path={folder}", "--set", f"model.tokenizer={tok_dir}"]
    assert train(out, *args) == EXIT_BAD_INPUT
    assert f"tokenizer '{tok_dir}' has no chat template" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run started from a model folder given by `model.path` alone, learning rate 0."""
    root = tmp_path_factory.mktemp("models")
    folder = model_folder(root / "start", extra_token=True)
    out = root / "run"
    args = ["--set", f"model.path={folder}", "--set", "sft.learning_rate=0", "--max-steps", "2"]
    assert train(out, *args) == 0
    return folder, out


@pytest.mark.slow
def test_model_path_alone_selects_the_folder_and_its_tokenizer(trained):
    folder, out = trained
    # learning rate 0: the exported model is the folder's, bitwise (not a random init)
    start, final = (
        load_file(folder / "model.safetensors"),
        load_file(out / "final" / "model.safetensors"),
    )
    assert sorted(start) == sorted(final)
    for name in start:
        np.testing.assert_array_equal(final[name], start[name], err_msg=name)
    # the folder's own tokenizer (one token more than the shipped one), not the shipped one
    assert "<|folder_token|>" in (out / "final" / "tokenizer.json").read_text()
    assert len(AutoTokenizer.from_pretrained(out / "final")) == len(tokenizer()) + 1
    assert json.loads((out / "config.json").read_text())["config"]["model"]["path"] == str(folder)


@pytest.mark.slow
def test_eval_writes_json_and_markdown_for_a_run_final_folder(trained, tmp_path, capsys):
    final = trained[1] / "final"
    small = ["harmful_limit=2", "overrefusal_limit=2", "bbq_limit=2", "gsm8k_limit=2"]
    small += ["drift_limit=2", "max_new_tokens=4", "ifeval_limit=2", "ifeval_max_new_tokens=4"]
    small += ["choice_tasks=arc_easy,copa", "choice_limit=2"]
    sets = [a for s in small for a in ("--set", s)]
    assert main(["eval", str(final), *sets]) == 0
    table = capsys.readouterr().out
    result = json.loads((final / "eval.json").read_text())
    n = result["n"]
    assert {k: n[k] for k in ("safety", "over_refusal", "bbq", "gsm8k", "drift")} == {
        "safety": 4,
        "over_refusal": 2,
        "bbq": 2,
        "gsm8k": 2,
        "drift": 0,
    }
    assert n["ifeval_prompts"] == 2 and n["ifeval_instructions"] >= 2
    assert n["choice"] == {"arc_easy": 2, "copa": 2}
    for key in ("safety", "over_refusal", "capability", "gsm8k", "bbq", "choice_mean"):
        assert 0.0 <= result[key] <= 1.0
    for key in ("ifeval_prompt_strict", "ifeval_inst_loose"):
        assert 0.0 <= result[key] <= 1.0
    assert "| IFEval prompt-level accuracy, strict |" in table
    assert result["truthfulqa_mc1"] is None and "TruthfulQA" in result["truthfulqa_note"]
    assert result["drift"] is None  # no --start: no drift
    assert len(result["responses"]["harmful"]) == 4
    assert (final / "eval.md").read_text() == table
    label = "safety (refusal rate on harmful prompts, higher is safer)"
    assert f"| {label} | {result['safety']:.3f} | 4 |" in table
    # --start adds the drift from a starting model; --output puts the files elsewhere
    out = tmp_path / "res" / "e.json"
    assert main(["eval", str(final), "--start", str(trained[0]), "--output", str(out), *sets]) == 0
    result = json.loads(out.read_text())
    assert (
        result["n"]["drift"] == 2 and result["drift"] > 0 and (tmp_path / "res" / "e.md").is_file()
    )


@pytest.mark.slow
def test_generate_answers_each_prompt_with_the_chat_template(trained, capsys):
    final = str(trained[1] / "final")
    args = ["--prompt", "What is 2+2?", "--prompt", "Hi", "--max-new-tokens", "4"]
    assert main(["generate", final, *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "### What is 2+2?" and "### Hi" in out
    assert main(["generate", str(trained[0].parent / "nope"), "--prompt", "x"]) == EXIT_BAD_INPUT
    assert "model folder" in capsys.readouterr().err


@pytest.mark.slow
def test_a_run_whose_every_step_was_skipped_never_reports_success(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    out = tmp_path / "run"
    args = ["--max-steps", "3", "--set", "max_consecutive_skips=10"]
    with inject_nonfinite((1, 2, 3)):
        assert train(out, *args) == EXIT_NONFINITE
    assert "every one of the 3 steps was skipped as non-finite" in caplog.text
    assert "sft: 3 steps" in caplog.text  # INFO lines are captured ...
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("ogpsa_jax")]
    assert not [m for m in ours if "done" in m]  # ... and none of ours says done
    assert not (out / "final").exists() and not (out / "done.json").exists()
    shutil.rmtree(out)
