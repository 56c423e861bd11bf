"""Decoder, config, HF load/save and sharding: parity with transformers' fixtures."""

import json
import os
import shutil
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from ogpsa_jax.models import (
    Decoder,
    DecoderConfig,
    init_random,
    llama3_1_8b_config,
    load_hf,
    make_mesh,
    param_shardings,
    qwen2_5_7b_config,
    save_hf,
    sequence_logprobs,
    smollm2_135m_config,
    tiny_config,
)
from ogpsa_jax.models.functional import (
    forward,
    forward_with_cache,
    head_logits,
    hidden_states,
    prefill,
)
from ogpsa_jax.models.layers import attention_chunk_rows

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"])) for k, v in header.items()}


def _same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b)))


def test_fixture_set_covers_brief():
    configs = [DecoderConfig.from_hf(json.load(open(f"{FIXTURES}/{n}/config.json"))) for n in NAMES]
    assert {c.architecture for c in configs} == {"llama", "qwen2"}
    assert {c.tie_word_embeddings for c in configs} == {True, False}
    assert {c.num_heads // c.num_kv_heads for c in configs} >= {1, 2, 4}
    assert any(c.rope_scaling and c.rope_scaling["rope_type"] == "llama3" for c in configs)
    assert any(c.head_dim * c.num_heads != c.hidden_size for c in configs)


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    ref = np.load(f"{FIXTURES}/{name}/reference.npz")
    model = load_hf(f"{FIXTURES}/{name}", dtype=jnp.float32)
    for kind in ("left", "right"):
        mask = ref[f"mask_{kind}"]
        got = np.asarray(_logits(model, jnp.asarray(ref["input_ids"]), jnp.asarray(mask)))
        real = mask.astype(bool)
        # float32 both sides; differences come from summation order only
        np.testing.assert_allclose(got[real], ref[f"logits_{kind}"][real], rtol=1e-4, atol=1e-4)
        assert np.isfinite(got).all()


@pytest.mark.parametrize("name", NAMES)
def test_save_hf_matches_transformers_layout_and_roundtrips(name, tmp_path):
    src = f"{FIXTURES}/{name}"
    model = load_hf(src, dtype=jnp.float32)
    out = save_hf(model, tmp_path / "out")
    assert _header(f"{out}/model.safetensors") == _header(f"{src}/model.safetensors")
    again = load_hf(out, dtype=jnp.float32)
    assert _same(nnx.state(model), nnx.state(again))
    saved_cfg = DecoderConfig.from_hf(json.load(open(f"{out}/config.json")))
    assert saved_cfg == model.config


def test_save_hf_sharded_index_and_bf16(tmp_path):
    model = init_random(tiny_config(architecture="qwen2"), seed=5, dtype=jnp.float32)
    out = save_hf(model, tmp_path / "sharded", max_shard_bytes=60_000)
    index = json.load(open(f"{out}/model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert not os.path.exists(f"{out}/model.safetensors")
    assert _same(nnx.state(model), nnx.state(load_hf(out, dtype=jnp.float32)))
    out16 = save_hf(model, tmp_path / "bf16", dtype=jnp.bfloat16)
    assert {d for d, _ in _header(f"{out16}/model.safetensors").values()} == {"BF16"}
    back = load_hf(out16, dtype=jnp.float32)
    expect = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32), nnx.state(model))
    assert _same(expect, nnx.state(back))


def test_config_roundtrip_through_transformers():
    from transformers import AutoConfig

    for cfg in (
        tiny_config(),
        tiny_config(architecture="qwen2"),
        smollm2_135m_config(),
        qwen2_5_7b_config(),
        llama3_1_8b_config(),
    ):
        d = cfg.to_hf_dict()
        hf = AutoConfig.for_model(**d)
        assert DecoderConfig.from_hf(hf) == cfg
        assert DecoderConfig.from_hf(d) == cfg


def test_large_presets_build_abstractly_with_shardings():
    mesh = make_mesh((2, 2, 2))
    for cfg, expect in (
        (qwen2_5_7b_config(), 7_615_616_512),
        (llama3_1_8b_config(), 8_030_261_248),
    ):
        model = nnx.eval_shape(lambda c=cfg: Decoder(c, rngs=nnx.Rngs(0)))
        state = nnx.state(model, nnx.Param)
        assert sum(x.size for x in jax.tree.leaves(state)) == cfg.num_params == expect
        shardings = param_shardings(state, mesh)
        assert shardings["layers"]["q_proj"].get_value().spec == PartitionSpec(
            None, "fsdp", "tensor"
        )
    # SmolLM2: 49152 rows split on tensor; the 9-head q projection (576) splits too
    small = nnx.eval_shape(lambda: Decoder(smollm2_135m_config(), rngs=nnx.Rngs(0)))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(small))) == 134_515_008


# vocab 98 splits on tensor=2; 97 cannot and must fall back to replicated on that axis
@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,axis_type,vocab", [((2, 2, 2), "auto", 98), ((1, 4, 2), "explicit", 97)]
)
def test_sharded_model_matches_single_device(shape, axis_type, vocab):
    cfg = tiny_config(vocab_size=vocab, architecture="qwen2").replace(tie_word_embeddings=False)
    ids = jax.random.randint(jax.random.key(1), (4, 9), 0, vocab)
    mask = jnp.ones((4, 9), jnp.int32).at[1, :3].set(0).at[2, 6:].set(0)
    single = init_random(cfg, seed=2, dtype=jnp.float32)
    ref = _logits(single, ids, mask)
    mesh = make_mesh(shape, axis_type=axis_type)
    sharded = init_random(cfg, seed=2, dtype=jnp.float32, mesh=mesh)
    assert _same(nnx.state(single), nnx.state(sharded))
    vocab_axis = "tensor" if vocab % 2 == 0 else None
    assert sharded.lm_head.get_value().sharding.spec == PartitionSpec("fsdp", vocab_axis)
    assert sharded.embed_tokens.get_value().sharding.spec == PartitionSpec(vocab_axis, "fsdp")
    sharded.attention_chunk = 4  # blocked causal attention (4 + 4 + 1 rows) on the mesh too
    with jax.set_mesh(mesh):
        got = _logits(sharded, ids, mask)
        built = Decoder(cfg, dtype=jnp.float32, rngs=nnx.Rngs(2))  # also builds under set_mesh
    assert built.layers.up_proj.get_value().sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    # same math, different reduction order across shards (padded query rows differ: masked)
    keep = mask[..., None].astype(bool)
    chex.assert_trees_all_close(
        jnp.where(keep, got, 0), jnp.where(keep, ref, 0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.slow
def test_frozen_layers_same_forward_and_zero_grads():
    cfg = tiny_config(vocab_size=97).replace(num_layers=4)
    model = init_random(cfg, seed=3, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 97)
    mask = jnp.ones((2, 8), jnp.int32).at[0, :2].set(0)

    @nnx.jit(static_argnums=3)
    def loss_and_grad(model, ids, mask, frozen):
        def loss(m):
            return jnp.mean(m(ids, mask, frozen_layers=frozen) ** 2)

        return nnx.value_and_grad(loss)(model)

    l0, g0 = loss_and_grad(model, ids, mask, 0)
    l2, g2 = loss_and_grad(model, ids, mask, 2)
    chex.assert_trees_all_close(l0, l2, rtol=1e-6, atol=0)
    for name in ("q_proj", "down_proj", "attn_norm"):
        frozen = getattr(g2.layers, name).get_value()
        full = getattr(g0.layers, name).get_value()
        assert not np.any(np.asarray(frozen[:2]))
        chex.assert_trees_all_close(frozen[2:], full[2:], rtol=1e-4, atol=1e-7)
        assert np.all(np.abs(np.asarray(full[:2])).sum(axis=tuple(range(1, full.ndim))) > 0)
    with pytest.raises(ValueError, match="frozen_layers"):
        model(ids, mask, frozen_layers=5)


@pytest.mark.slow
def test_scan_unroll_same_logits_and_grads():
    # 1 (a loop), 2 (4 layers in 2 iterations), 3 (a remainder) and 0 (unrolled) are the same
    # math; only XLA's schedule differs (tolerance: float32 reassociation).
    cfg = tiny_config(vocab_size=97).replace(num_layers=4)
    ids = jax.random.randint(jax.random.key(2), (2, 8), 0, 97)
    mask = jnp.ones((2, 8), jnp.int32).at[0, :2].set(0)

    @nnx.jit
    def loss_and_grad(model):
        return nnx.value_and_grad(lambda m: jnp.mean(m(ids, mask, frozen_layers=1) ** 2))(model)

    ref = loss_and_grad(init_random(cfg, seed=3, dtype=jnp.float32))
    for unroll in (2, 3, 0):
        model = init_random(cfg, seed=3, dtype=jnp.float32, scan_unroll=unroll)
        got = loss_and_grad(model)
        chex.assert_trees_all_close(got, ref, rtol=1e-5, atol=1e-7)
    model.scan_unroll = 1  # a plain attribute, settable after construction
    chex.assert_trees_all_close(loss_and_grad(model), ref, rtol=1e-6, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="scan_unroll"):
            init_random(cfg, seed=3, scan_unroll=bad)
    model.scan_unroll = -2
    with pytest.raises(ValueError, match="scan_unroll must be an int >= 0"):
        model(ids, mask)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_chunks_same_logits_and_grads(arch):
    # Blocks of query rows against their key prefix are the same causal attention as one L x L
    # block: logits at real tokens and gradients of a loss on them agree (float32
    # reassociation), with left and right padding, a ragged last block, and auto (130 tokens:
    # blocks of 64, 64, 2).
    cfg = tiny_config(vocab_size=97, architecture=arch)
    n = 130
    ids = jax.random.randint(jax.random.key(4), (3, n), 0, 97)
    mask = jnp.ones((3, n), jnp.int32).at[0, :9].set(0).at[1, -20:].set(0)
    keep = mask.astype(jnp.float32)[..., None]

    @nnx.jit
    def loss_and_grad(model):
        def loss(m):
            return jnp.sum(jnp.square(m(ids, mask)) * keep) / jnp.sum(keep)

        return nnx.value_and_grad(loss)(model)

    model = init_random(cfg, seed=5, dtype=jnp.float32, attention_chunk=0)
    ref_logits = model(ids, mask) * keep
    ref = loss_and_grad(model)
    for chunk in (-1, 48, 129):
        model.attention_chunk = chunk
        chex.assert_trees_all_close(model(ids, mask) * keep, ref_logits, rtol=1e-5, atol=1e-5)
        chex.assert_trees_all_close(loss_and_grad(model), ref, rtol=1e-4, atol=1e-6)
    assert [attention_chunk_rows(t) for t in (64, 65, 130, 1024, 1025, 4096)] == [
        0,
        64,
        64,
        64,
        65,
        256,
    ]
    assert attention_chunk_rows(130, 0) == 0 and attention_chunk_rows(130, 200) == 0
    for bad in (-2, 2.0, None):
        with pytest.raises(ValueError, match="attention_chunk must be an int >= -1"):
            init_random(cfg, seed=5, attention_chunk=bad)


def test_fully_padded_row_is_finite():
    model = init_random(tiny_config(), seed=0, dtype=jnp.float32)
    ids = jnp.arange(14).reshape(2, 7)
    mask = jnp.zeros((2, 7), jnp.int32).at[1].set(1)
    out = _logits(model, ids, mask)
    assert np.isfinite(np.asarray(out)).all()


def test_config_and_checkpoint_errors(tmp_path):
    with pytest.raises(ValueError, match="num_kv_heads"):
        tiny_config().replace(num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown architecture"):
        tiny_config().replace(architecture="gpt2")
    src = f"{FIXTURES}/{NAMES[0]}"

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    bad = copy("arch")
    cfg = json.load(open(bad / "config.json"))
    json.dump({**cfg, "model_type": "mistral"}, open(bad / "config.json", "w"))
    with pytest.raises(ValueError, match="mistral"):
        load_hf(bad)

    from safetensors.numpy import load_file, save_file

    tensors = load_file(f"{src}/model.safetensors")
    missing = copy("missing")
    save_file(
        {k: v for k, v in tensors.items() if k != "model.layers.1.mlp.up_proj.weight"},
        str(missing / "model.safetensors"),
    )
    with pytest.raises(
        ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"
    ):
        load_hf(missing)
    extra = copy("extra")
    save_file(
        {**tensors, "model.layers.0.extra.weight": np.ones(3, np.float32)},
        str(extra / "model.safetensors"),
    )
    with pytest.raises(ValueError, match="model.layers.0.extra.weight"):
        load_hf(extra)
    shape = copy("shape")
    save_file(
        {**tensors, "model.norm.weight": np.ones(5, np.float32)}, str(shape / "model.safetensors")
    )
    with pytest.raises(ValueError, match="final_norm"):
        load_hf(shape)


def test_sequence_logprobs_of_model_logits_match_manual():
    model = init_random(tiny_config(vocab_size=89, architecture="qwen2"), seed=4, dtype=jnp.float32)
    ids = jax.random.randint(jax.random.key(3), (2, 7), 0, 89)
    mask = jnp.array([[0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], jnp.int32)
    loss_mask = jnp.array([[0, 0, 0, 1, 1, 0, 1], [0, 1, 1, 0, 1, 0, 0]], jnp.int32)
    logits = _logits(model, ids, mask)
    total, count = jax.jit(sequence_logprobs)(logits, ids, loss_mask)
    logits = np.asarray(logits, np.float64)
    for b in range(2):
        expect = 0.0
        for t in np.flatnonzero(np.asarray(loss_mask[b])):
            row = logits[b, t - 1]
            expect += row[int(ids[b, t])] - np.log(np.exp(row - row.max()).sum()) - row.max()
        np.testing.assert_allclose(float(total[b]), expect, rtol=1e-5, atol=1e-5)
        assert float(count[b]) == float(loss_mask[b].sum())
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_logprobs(logits, ids, loss_mask[:, 1:])


def test_functional_entry_points_match_forward():
    # qwen2: untied lm_head and q/k/v biases; an odd vocabulary
    model = init_random(
        tiny_config(vocab_size=101, architecture="qwen2"), seed=7, dtype=jnp.float32
    )
    cfg, p, c = model.config, 3, 10

    @jax.jit
    def run(params, ids, mask, rows):
        full = forward(params, cfg, jnp.float32, ids, mask)
        h = hidden_states(params, cfg, jnp.float32, ids, mask)
        sliced = head_logits(params, cfg, jnp.float32, jnp.take_along_axis(h, rows[..., None], 1))
        # prefill the first p tokens, then the remaining c through the cache
        caches = prefill(params, cfg, jnp.float32, ids[:, :p], mask[:, :p], p + c)
        positions = jnp.broadcast_to(jnp.arange(p, p + c), (ids.shape[0], c))
        cached, _ = forward_with_cache(
            params, cfg, jnp.float32, ids[:, p:], positions, mask.astype(bool), caches, p
        )
        return full, sliced, caches[0].shape, cached

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 101, size=(3, p + c)), jnp.int32)
    n_real = np.array([13, 9, 4])
    mask = jnp.asarray(np.arange(p + c)[None] < n_real[:, None], jnp.int32)  # right padding
    rows = jnp.asarray([[0, 12], [3, 8], [1, 3]])
    full, sliced, k_shape, cached = run(model.params(), ids, mask, rows)
    # the lm_head on gathered hidden rows equals those rows of the full logits (float32)
    chex.assert_trees_all_close(sliced, jnp.take_along_axis(full, rows[..., None], 1), atol=1e-5)
    assert k_shape == (cfg.num_layers, 3, cfg.num_kv_heads, p + c, cfg.head_dim)
    for b in range(3):  # float32, cached vs full attention over the same real tokens
        chex.assert_trees_all_close(cached[b, : n_real[b] - p], full[b, p : n_real[b]], atol=1e-5)
    with pytest.raises(ValueError, match="cache_length=2 < prompt length 3"):
        prefill(model.params(), cfg, jnp.float32, ids[:, :p], mask[:, :p], 2)
