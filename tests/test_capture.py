"""Decoder activation capture (`ogpsa_jax.models.capture`) against a NumPy float64 re-derivation.

The reference below recomputes every linear layer's input from the layer weights by hand
(RMSNorm, RoPE, grouped-query causal attention with padding, SwiGLU), on a Qwen2-style model
with odd sizes (hidden 43, MLP 71, 3 query heads of width 10 sharing one KV head, untied head,
biases and norms randomised) and a batch with left and right padding.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogpsa_jax.models import DecoderConfig, init_random, make_mesh, tiny_config
from ogpsa_jax.models.capture import capture_inputs, sample_rows, stack_rows
from ogpsa_jax.models.functional import forward

CFG = DecoderConfig(
    architecture="qwen2",
    vocab_size=53,
    hidden_size=43,
    intermediate_size=71,
    num_layers=3,
    num_heads=3,
    num_kv_heads=1,
    head_dim=10,
    rope_theta=500.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    attention_bias=True,
)
B, T = 3, 11


def random_params(seed=0):
    """A params dict with every array random (weights at scale 0.15: O(1) activations whose
    attention is not flat)."""
    model = init_random(CFG, seed=seed, dtype=jnp.float32)
    params = model.params()
    rng = np.random.default_rng(seed)

    def fresh(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return jnp.asarray(1.0 + 0.2 * rng.standard_normal(x.shape), jnp.float32)
        scale = 0.15 if "proj" in name or "bias" in name else 1.0
        return jnp.asarray(scale * rng.standard_normal(x.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(fresh, params)


def batch(seed=0):
    rng = np.random.default_rng(seed + 100)
    ids = rng.integers(1, CFG.vocab_size, size=(B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    mask[0, :4] = 0  # left padding
    mask[2, 7:] = 0  # right padding
    return ids, mask


def reference_inputs(params, ids, mask):
    """Each linear layer's input per layer, [B*T, d_in] float64, computed with NumPy."""
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
    eps, hq, hk, e = CFG.rms_norm_eps, CFG.num_heads, CFG.num_kv_heads, CFG.head_dim

    def rms(x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # [B, T]
    inv = 1.0 / CFG.rope_theta ** (np.arange(0, e, 2) / e)
    ang = pos[..., None] * inv  # [B, T, e/2]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(x):  # [B, T, H, e]
        half = e // 2
        rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
        return x * cos[:, :, None] + rot * sin[:, :, None]

    allowed = np.tril(np.ones((T, T), bool))[None] & mask[:, None, :].astype(bool)  # [B, T, T]
    h = p["embed_tokens"][ids]
    out = {k: [] for k in ("attn_in", "o_in", "mlp_in", "down_in")}
    lay = p["layers"]
    for layer in range(CFG.num_layers):
        w = {k: v[layer] for k, v in lay.items()}
        x = rms(h, w["attn_norm"])
        q = (x @ w["q_proj"] + w["q_bias"]).reshape(B, T, hq, e)
        k = (x @ w["k_proj"] + w["k_bias"]).reshape(B, T, hk, e)
        v = (x @ w["v_proj"] + w["v_bias"]).reshape(B, T, hk, e)
        q, k = rope(q), rope(k)
        o = np.zeros((B, T, hq, e))
        for head in range(hq):
            kv = head // (hq // hk)
            s = np.einsum("bte,bse->bts", q[:, :, head], k[:, :, kv]) / np.sqrt(e)
            s = np.where(allowed, s, -1e30)
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            o[:, :, head] = np.einsum("bts,bse->bte", s, v[:, :, kv])
        o = o.reshape(B, T, hq * e)
        h = h + o @ w["o_proj"]
        xm = rms(h, w["mlp_norm"])
        g, u = xm @ w["gate_proj"], xm @ w["up_proj"]
        act = g / (1.0 + np.exp(-g)) * u
        h = h + act @ w["down_proj"]
        for name, val in (("attn_in", x), ("o_in", o), ("mlp_in", xm), ("down_in", act)):
            out[name].append(val.reshape(B * T, -1))
    out = {k: np.stack(v) for k, v in out.items()}
    out["head_in"] = rms(h, p["final_norm"]).reshape(B * T, -1)
    return out


# One jitted capture shared by the tests (compiled once per shape / row count).
cap_jit = jax.jit(capture_inputs, static_argnames=("config", "dtype", "rows", "with_logits"))


def cap(params, ids, mask, **kw):
    return cap_jit(params, CFG, jnp.asarray(ids), jnp.asarray(mask), **kw)


SITE_OF = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}


@pytest.fixture(scope="module")
def setup():
    params = random_params()
    ids, mask = batch()
    full = cap(params, ids, mask, with_logits=True)
    return params, ids, mask, full


@pytest.mark.slow
def test_captured_inputs_equal_hand_computed_inputs(setup):
    params, ids, mask, cap = setup
    ref = reference_inputs(params, ids, mask)
    valid = mask.reshape(-1).astype(bool)
    np.testing.assert_array_equal(np.asarray(cap.row_valid), valid)
    layers = cap.inputs["layers"]
    assert set(k for k, v in layers.items() if v is not None) == set(SITE_OF)
    assert cap.inputs["embed_tokens"] is None and cap.inputs["final_norm"] is None
    for name in ("attn_norm", "mlp_norm", "q_bias", "k_bias", "v_bias"):
        assert layers[name] is None
    for name, site in SITE_OF.items():
        x = np.asarray(layers[name])
        assert x.shape == (CFG.num_layers, B * T, ref[site].shape[-1]), name
        # float32 forward vs float64 NumPy on O(1) activations.
        chex.assert_trees_all_close(x[:, valid], ref[site][:, valid], rtol=0, atol=1e-5)
        assert np.all(x[:, ~valid] == 0), f"{name}: padding rows must be zero"
    head = np.asarray(cap.inputs["lm_head"])
    chex.assert_trees_all_close(head[valid], ref["head_in"][valid], rtol=0, atol=1e-5)
    assert np.all(head[~valid] == 0)
    # The capture path is the model's forward: same logits as `forward` (float32 round-off).
    logits = forward(params, CFG, jnp.float32, jnp.asarray(ids), jnp.asarray(mask))
    chex.assert_trees_all_close(cap.logits, logits, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_row_sampling_takes_real_tokens_then_zeroed_padding(setup):
    params, ids, mask, full = setup
    n_real = int(mask.sum())
    for rows in (7, n_real + 3):  # fewer than the real tokens; more (padding tops up)
        got = cap(params, ids, mask, rows=rows, key=jax.random.key(rows))
        idx, ok = sample_rows(jnp.asarray(mask), rows, jax.random.key(rows))
        idx, ok = np.asarray(idx), np.asarray(ok)
        assert len(set(idx.tolist())) == rows
        np.testing.assert_array_equal(np.asarray(got.row_valid), ok)
        assert int(ok.sum()) == min(rows, n_real)
        assert np.all(mask.reshape(-1)[idx] == ok)
        for name in ("k_proj", "o_proj", "down_proj"):
            x = np.asarray(got.inputs["layers"][name])
            want = np.asarray(full.inputs["layers"][name])[:, idx] * ok[None, :, None]
            chex.assert_trees_all_close(x, want, rtol=0, atol=1e-6)  # same program, gathered
        assert got.logits is None


@pytest.mark.slow
def test_explicit_mesh_capture_equals_unsharded(setup):
    _, ids, mask, _ = setup
    tiny = tiny_config(vocab_size=53)  # sizes the 2x2x2 mesh divides, so weights are sharded
    run = jax.jit(lambda p, i, m: capture_inputs(p, tiny, i, m, rows=17))
    want = run(init_random(tiny, seed=3, dtype=jnp.float32).params(), ids, mask)
    mesh = make_mesh((2, 2, 2), axis_type="explicit")
    sharded = init_random(tiny, seed=3, dtype=jnp.float32, mesh=mesh).params()
    assert not sharded["layers"]["down_proj"].sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        got = run(sharded, ids, mask)
    # Sharded reductions change float32 summation order only.
    chex.assert_trees_all_close(got.inputs, want.inputs, rtol=0, atol=1e-5)


def test_stack_rows_joins_batches_on_the_row_axis(setup):
    params, ids, mask, full = setup
    sampled = cap(params, ids, mask, rows=7)
    rows = stack_rows(c.inputs for c in (sampled, full))
    assert rows["layers"]["up_proj"].shape == (CFG.num_layers, 7 + B * T, CFG.hidden_size)
    assert rows["layers"]["q_bias"] is None and rows["embed_tokens"] is None
    for name in ("o_proj", "down_proj"):
        got, parts = rows["layers"][name], (sampled.inputs, full.inputs)
        want = np.concatenate([np.asarray(p["layers"][name]) for p in parts], axis=1)
        np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
        np.asarray(rows["lm_head"]),
        np.concatenate([np.asarray(sampled.inputs["lm_head"]), np.asarray(full.inputs["lm_head"])]),
    )
    with pytest.raises(ValueError, match="no captured batches"):
        stack_rows([])


def test_bad_inputs_are_named_errors(setup):
    params, ids, mask, _ = setup
    with pytest.raises(ValueError, match="rows must be"):
        capture_inputs(params, CFG, ids, mask, rows=0)
    with pytest.raises(ValueError, match="input_ids must be"):
        capture_inputs(params, CFG, ids[0], mask[0])
    with pytest.raises(ValueError, match="attention_mask shape"):
        capture_inputs(params, CFG, ids, mask[:, :-1])
    with pytest.raises(ValueError, match="lm_head"):
        capture_inputs({k: v for k, v in params.items() if k != "lm_head"}, CFG, ids, mask)
