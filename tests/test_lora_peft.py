"""PEFT adapter folders: parity with peft 0.21.2 (tests/fixtures/peft, written by
tools/make_peft_fixtures.py) both ways, the merge against `merge_and_unload()`, and the
loader's named errors."""

import json
import os
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from ogpsa_jax.models import (
    LoRAConfig,
    add_lora,
    init_random,
    load_hf,
    load_peft,
    merge_lora,
    save_hf,
    save_peft,
    tiny_config,
)
from ogpsa_jax.models.peft import peft_tensor_name

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "peft")
NAMES = sorted(os.listdir(FIXTURES))
MADE_BY_PEFT = [n for n in NAMES if n.startswith("peft_")]
MADE_BY_US = [n for n in NAMES if n.startswith("ours_")]


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def _config(name: str) -> dict:
    with open(os.path.join(FIXTURES, name, "adapter_config.json")) as f:
        return json.load(f)


def _base_dir(name: str) -> str:
    return os.path.join(REPO, _config(name)["base_model_name_or_path"])


def _load(name: str, dtype=jnp.float32):
    return load_peft(load_hf(_base_dir(name), dtype=dtype), os.path.join(FIXTURES, name))


def _check_logits(model, name: str) -> None:
    ref = np.load(os.path.join(FIXTURES, name, "reference.npz"))
    base = load_hf(_base_dir(name), dtype=jnp.float32)
    for kind in ("left", "right"):
        ids, mask = jnp.asarray(ref["input_ids"]), jnp.asarray(ref[f"mask_{kind}"])
        got = np.asarray(_logits(model, ids, mask))
        real = ref[f"mask_{kind}"].astype(bool)
        # float32 on both sides: summation order only
        np.testing.assert_allclose(got[real], ref[f"logits_{kind}"][real], rtol=1e-4, atol=1e-4)
        # the adapters move the logits far more than the tolerance
        assert np.abs(got - np.asarray(_logits(base, ids, mask)))[real].max() > 0.05


def test_fixture_cases_cover_the_brief():
    assert MADE_BY_PEFT and MADE_BY_US
    seen = set()
    for name in NAMES:
        c = _config(name)
        hf = json.load(open(os.path.join(_base_dir(name), "config.json")))
        seen.add(("by", name.split("_")[0]))
        seen |= {("arch", hf["model_type"]), ("tied", hf["tie_word_embeddings"])}
        seen |= {("all7", len(c["target_modules"]) == 7), ("rslora", c["use_rslora"])}
    assert seen >= {("by", "peft"), ("by", "ours"), ("arch", "llama"), ("arch", "qwen2")}
    assert seen >= {("tied", True), ("tied", False), ("all7", True), ("all7", False)}
    assert seen >= {("rslora", True), ("rslora", False)}


@pytest.mark.parametrize("name", MADE_BY_PEFT)
def test_peft_made_adapter_reproduces_peft_logits(name):
    model = _load(name)
    c = _config(name)
    assert model.lora == LoRAConfig(
        rank=c["r"],
        alpha=c["lora_alpha"],
        targets=tuple(c["target_modules"]),
        use_rslora=c["use_rslora"],
    )
    _check_logits(model, name)


@pytest.mark.parametrize("name", MADE_BY_US)
def test_our_adapter_in_peft_same_logits_and_merge(name, tmp_path):
    model = _load(name)
    _check_logits(model, name)  # PEFT's logits for the folder our save_peft wrote
    peft_merged = load_file(os.path.join(FIXTURES, name, "merged.safetensors"))
    merged = merge_lora(model)
    p = merged.params()["layers"]
    for i in range(model.config.num_layers):
        for t, module in (("q_proj", "self_attn"), ("o_proj", "self_attn"), ("up_proj", "mlp")):
            hf = peft_merged[f"model.layers.{i}.{module}.{t}.weight"]
            np.testing.assert_allclose(np.asarray(p[t][i]).T, hf, rtol=0, atol=1e-5)
    # our merged folder equals merge_and_unload()'s weights, tensor by tensor (float32)
    out = save_hf(merged, tmp_path / "merged")
    ours = load_file(os.path.join(out, "model.safetensors"))
    assert set(ours) == set(peft_merged)
    for key, want in peft_merged.items():
        np.testing.assert_allclose(ours[key], want, rtol=0, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", MADE_BY_US)
def test_save_peft_writes_back_the_committed_folder(name, tmp_path):
    src = os.path.join(FIXTURES, name)
    base_dir = _base_dir(name)
    out = save_peft(_load(name), tmp_path / "again", base_model_name_or_path=base_dir)
    got, want = (
        load_file(f"{out}/adapter_model.safetensors"),
        load_file(f"{src}/adapter_model.safetensors"),
    )
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    config = json.load(open(f"{out}/adapter_config.json"))
    assert config.pop("base_model_name_or_path") == os.path.abspath(base_dir)  # local: absolute
    want_config = _config(name)
    want_config.pop("base_model_name_or_path")
    assert config == want_config


def test_save_peft_names_shapes_and_hub_base(tmp_path):
    lora = LoRAConfig(rank=3, alpha=6, targets=("k", "down"), use_rslora=True)
    model = add_lora(init_random(tiny_config(), dtype=jnp.float32), lora)
    out = save_peft(model, tmp_path / "a", base_model_name_or_path="org/tiny-base")
    tensors = load_file(f"{out}/adapter_model.safetensors")
    assert tensors[peft_tensor_name(2, "k", "A")].shape == (3, 64)  # [r, d_in]
    assert tensors[peft_tensor_name(2, "k", "B")].shape == (32, 3)  # [d_out, r]
    assert tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"].shape == (3, 176)
    assert len(tensors) == 3 * 2 * 2
    c = json.load(open(f"{out}/adapter_config.json"))
    assert (c["peft_type"], c["task_type"], c["r"], c["lora_alpha"]) == ("LORA", "CAUSAL_LM", 3, 6)
    assert c["target_modules"] == ["k_proj", "down_proj"] and c["use_rslora"] is True
    assert c["base_model_name_or_path"] == "org/tiny-base"  # not a local folder: as given
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_peft(merge_lora(model), tmp_path / "b", base_model_name_or_path="x")


def _broken(tmp_path, name, *, config=None, tensors=None):
    """A copy of fixture `name` with its config and/or tensors changed."""
    dst = tmp_path / f"broken_{len(os.listdir(tmp_path))}"
    shutil.copytree(os.path.join(FIXTURES, name), dst)
    c = _config(name)
    c["base_model_name_or_path"] = _base_dir(name)
    if config is not None:
        c = config(c)
    json.dump(c, open(dst / "adapter_config.json", "w"))
    if tensors is not None:
        t = tensors(load_file(str(dst / "adapter_model.safetensors")))
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


def test_load_peft_named_errors(tmp_path):
    name = "ours_llama_untied_k_o_up"
    base = load_hf(_base_dir(name), dtype=jnp.float32)
    key_b = peft_tensor_name(1, "o", "B")

    def drop(t):
        return {k: v for k, v in t.items() if k != key_b}

    cases = [
        (dict(tensors=drop), rf"missing tensors \['{key_b}'\]"),
        (
            dict(tensors=lambda t: {**t, key_b.replace("lora_B", "lora_X"): t[key_b]}),
            r"unexpected tensors \['.*layers.1.self_attn.o_proj.lora_X.weight'\]",
        ),
        (
            dict(tensors=lambda t: {**t, key_b: np.zeros((5, 2), np.float32)}),
            r"1 tensors have shapes that do not fit .*lora_B.weight': \(\(5, 2\), \(64, 2\)\)",
        ),
        (dict(config=lambda c: {**c, "peft_type": "IA3"}), "peft_type 'IA3' is not LORA"),
        (dict(config=lambda c: {**c, "task_type": "SEQ_CLS"}), "task_type 'SEQ_CLS'"),
        (dict(config=lambda c: {**c, "use_dora": True}), r"use_dora=True \(DoRA\)"),
        (
            dict(config=lambda c: {**c, "rank_pattern": {"o_proj": 8}}),
            "rank_pattern.*per-module ranks",
        ),
        (dict(config=lambda c: {**c, "bias": "all"}), "bias='all'"),
        (
            dict(config=lambda c: {**c, "target_modules": ["c_attn", "o_proj"]}),
            r"target modules \['c_attn'\] not found in the llama decoder",
        ),
        (dict(config=lambda c: {**c, "target_modules": ".*proj"}), "must list module names"),
        (dict(config=lambda c: {**c, "r": 64}), "rank 64 exceeds target 'k'"),
        (
            dict(
                config=lambda c: {**c, "base_model_name_or_path": _base_dir("peft_llama_tied_all")}
            ),
            "made for another base model.*'hidden_size': \\(48, 64\\)",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            load_peft(base, _broken(tmp_path, name, **kwargs))
    # a base folder of another architecture
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    json.dump({"model_type": "gpt2"}, open(gpt2 / "config.json", "w"))
    folder = _broken(tmp_path, name, config=lambda c: {**c, "base_model_name_or_path": str(gpt2)})
    with pytest.raises(ValueError, match="made for a 'gpt2' model"):
        load_peft(base, folder)
    # the adapter onto another base model (hub id: no config to compare; the shapes differ)
    other = load_hf(_base_dir("peft_llama_tied_all"), dtype=jnp.float32)
    folder = _broken(tmp_path, name, config=lambda c: {**c, "base_model_name_or_path": "org/x"})
    with pytest.raises(ValueError, match="missing tensors|do not fit"):
        load_peft(other, folder)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_peft(_load(name), os.path.join(FIXTURES, name))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        load_peft(base, tmp_path)
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="no adapter_model.safetensors"):
        load_peft(base, folder)


def test_load_peft_onto_a_mesh_and_bf16():
    from ogpsa_jax.models import make_mesh

    name = MADE_BY_PEFT[0]
    ref = _load(name)
    mesh = make_mesh((1, 2, 4), axis_type="explicit")
    sharded = load_peft(
        load_hf(_base_dir(name), dtype=jnp.float32, mesh=mesh), f"{FIXTURES}/{name}"
    )
    a = sharded.layers.q_proj_lora.a[...]
    assert a.sharding.spec == jax.P(None, "fsdp", None)
    chex.assert_trees_all_close(
        jax.tree.map(np.asarray, nnx.state(sharded)), jax.tree.map(np.asarray, nnx.state(ref))
    )
    data = np.load(f"{FIXTURES}/{name}/reference.npz")
    ids, mask = jnp.asarray(data["input_ids"]), jnp.asarray(data["mask_right"])
    bf16 = _load(name, dtype=jnp.bfloat16)
    real = data["mask_right"].astype(bool)
    err = np.abs(np.asarray(_logits(bf16, ids, mask)) - data["logits_right"])[real].max()
    assert err < 0.05 * np.abs(data["logits_right"]).max(), err  # bf16 compute
