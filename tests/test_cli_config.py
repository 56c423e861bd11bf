"""``ogpsa config``: the resolved config, the generated reference page, and the stage split."""

import dataclasses
import json
import pathlib
import re
import tomllib

import pytest

from ogpsa_jax.cli import EXIT_BAD_INPUT, main
from ogpsa_jax.overrides import apply_overrides, field_names, to_dict
from ogpsa_jax.train import DPOConfig, SFTConfig, StageConfig, TrainConfig, preset, validate
from ogpsa_jax.train.config_doc import config_lines, config_reference, field_comments

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_config_show_prints_the_resolved_preset_as_set_lines(capsys):
    items = ["sft.ogpsa.k=4", "dpo.beta=0.5"]
    args = [a for item in items for a in ("--set", item)]
    assert main(["config", "show", "--preset", "smollm2", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "sft.ogpsa.k = 4" in lines and "dpo.beta = 0.5" in lines
    assert 'model.path = "smollm2"' in lines and "sft.max_steps = 20" in lines
    # every line is valid --set syntax that rebuilds the same config
    want = apply_overrides(preset("smollm2"), items)
    lines_as_sets = [line.replace(" = ", "=", 1) for line in lines]
    assert apply_overrides(TrainConfig(), lines_as_sets) == want


def test_config_show_json_and_defaults(capsys):
    assert main(["config", "show", "--preset", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == to_dict(preset("tiny"))
    assert main(["config", "show"]) == 0  # no preset: the dataclass defaults
    assert 'sft.data = "assets:safety_sft.jsonl"' in capsys.readouterr().out.splitlines()


def test_config_show_of_a_pod_config_on_this_machine(capsys):
    # the paper preset wants 8 devices; show skips the device checks, not the others
    assert main(["config", "show", "--preset", "qwen2_5_7b_paper"]) == 0
    assert "num_devices = 8" in capsys.readouterr().out
    code = main(["config", "show", "--preset", "tiny", "--set", "sft.ogpsa.k=0"])
    assert code == EXIT_BAD_INPUT
    assert "'sft.ogpsa.k' must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("sft.beta=0.1", r"unknown config field 'sft.beta'; did you mean dpo.beta"),
        ("sft.loss_type=ipo", r"did you mean dpo.loss_type"),
        ("sft.dpo_reference=model", r"did you mean dpo.dpo_reference"),
        ("sft.label_smoothing=0.1", r"did you mean dpo.label_smoothing"),
        ("sft.safe_pairs_only=true", r"did you mean dpo.safe_pairs_only"),
        ("dpo.train_turns=last", r"did you mean sft.train_turns"),
        ("model.init=hf", r"unknown config field 'model.init'"),
    ],
)
def test_stage_configs_hold_only_their_own_fields(capsys, item, message):
    assert main(["config", "show", "--preset", "tiny", "--set", item]) == EXIT_BAD_INPUT
    assert re.search(message, capsys.readouterr().err)


def test_stage_split_keeps_every_field_name_that_remains():
    sft_only, dpo_only = (
        {"train_turns"},
        {
            "beta",
            "label_smoothing",
            "loss_type",
            "dpo_reference",
            "safe_pairs_only",
        },
    )
    common = {f.name for f in dataclasses.fields(StageConfig)}
    assert {f.name for f in dataclasses.fields(SFTConfig)} == common | sft_only
    assert {f.name for f in dataclasses.fields(DPOConfig)} == common | dpo_only
    cfg = preset("tiny")
    for name in field_names(TrainConfig):  # every leaf accepts its own value back via --set
        leaf = cfg
        for part in name.split("."):
            leaf = getattr(leaf, part)
        if dataclasses.is_dataclass(leaf):
            continue
        (line,) = [x for x in config_lines(cfg) if x.startswith(f"{name} = ")]
        assert apply_overrides(cfg, [line.replace(" = ", "=", 1)]) == cfg, name
    assert TrainConfig().dpo == DPOConfig() and TrainConfig().dpo.ogpsa.k == 1


def test_reference_page_is_generated_and_in_sync():
    page = config_reference()
    assert (ROOT / "docs" / "config.md").read_text() == page, (
        "docs/config.md is out of date: run `ogpsa config reference > docs/config.md`"
    )
    # every field of every config class has a row with a comment
    for cls in (TrainConfig, SFTConfig, DPOConfig, StageConfig):
        comments = field_comments(cls)
        for f in dataclasses.fields(cls):
            assert comments.get(f.name), f"{cls.__name__}.{f.name} has no comment"
            assert f"| `{f.name}` |" in page
    assert '| `train_turns` | `str` | `"all"` |' in page
    assert "`OGPSAConfig(k=1, refresh_every=5)`" in page  # the DPO stage's own default


def test_config_reference_command_prints_the_page(capsys):
    assert main(["config", "reference"]) == 0
    assert capsys.readouterr().out == config_reference()


def test_validate_without_devices_skips_only_the_mesh():
    cfg = preset("qwen2_5_7b_paper")
    assert validate(cfg, "sft-dpo", device_count=None) == (1, 8, 1)
    with pytest.raises(ValueError, match="8 are used|only 1 devices"):
        validate(cfg, "sft-dpo", device_count=1)


def test_accelerator_extras_pin_the_same_jax():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    jax_pin = next(d for d in meta["dependencies"] if d.startswith("jax=="))
    version = jax_pin.split("==")[1]
    assert f"jaxlib=={version}" in meta["dependencies"]
    assert meta["optional-dependencies"]["cuda"] == [f"jax[cuda12]=={version}"]
    assert meta["optional-dependencies"]["tpu"] == [f"jax[tpu]=={version}"]
