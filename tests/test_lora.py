"""LoRA adapters on the decoder: config checks, PEFT's initialisation, step-0 identity, the
maths of the update and the merge, gradients, frozen layers, meshes, bf16, generation,
scoring and capture."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from ogpsa_jax.eval.scoring import score_continuations
from ogpsa_jax.models import (
    Decoder,
    LoRAConfig,
    LoRAParam,
    add_lora,
    generate,
    init_random,
    load_hf,
    make_mesh,
    merge_lora,
    qwen2_5_7b_config,
    save_hf,
    tiny_config,
)
from ogpsa_jax.models.capture import capture_inputs
from ogpsa_jax.models.lora import TARGETS, LoRAWeights, adapters, lora_shapes

ALL = tuple(TARGETS)


@nnx.jit
def _logits(model, ids, mask):
    return model(ids, mask)


def _batch(vocab=97, shape=(3, 9), seed=1):
    ids = jax.random.randint(jax.random.key(seed), shape, 0, vocab)
    mask = jnp.ones(shape, jnp.int32).at[1, :3].set(0).at[2, 6:].set(0)  # left and right padding
    return ids, mask


def _random_b(model, seed=7, scale=0.1):
    """Fills every adapter's B with random values (as after some training)."""
    for i, adapter in enumerate(adapters(model).values()):
        key = jax.random.fold_in(jax.random.key(seed), i)
        b = adapter.b[...]
        adapter.b[...] = jax.device_put(
            scale * jax.random.normal(key, b.shape, b.dtype), b.sharding
        )
    return model


def test_lora_config_checks_and_normalises():
    cfg = LoRAConfig(rank=8, alpha=16, targets="down, q,v_proj")
    assert cfg.targets == ("q", "v", "down") and cfg.scaling == 2.0 and cfg.alpha == 16.0
    assert LoRAConfig(rank=4, alpha=8, targets=ALL, use_rslora=True).scaling == 4.0
    for bad, match in (
        (dict(rank=0), "rank must be an int >= 1"),
        (dict(rank=2.0), "rank must be an int >= 1"),
        (dict(rank=True), "rank must be an int >= 1"),
        (dict(alpha=0), "alpha must be a finite number > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number > 0"),
        (dict(targets=("q", "qkv", "lm_head")), r"unknown LoRA targets \['qkv', 'lm_head'\]"),
        (dict(targets=("q", "q_proj")), "twice"),
        (dict(targets=()), "none of the projections"),
        (dict(targets=" , "), "none of the projections"),
        (dict(use_rslora=1), "use_rslora must be a bool"),
    ):
        kwargs = dict(rank=4, alpha=8, targets=("q",)) | bad
        with pytest.raises(ValueError, match=match):
            LoRAConfig(**kwargs)


def test_rank_is_checked_against_every_target():
    cfg = tiny_config()  # k and v project 64 -> 32
    lora = LoRAConfig(rank=33, alpha=8, targets=("q", "k"))
    with pytest.raises(ValueError, match=r"rank 33 exceeds target 'k' \(k_proj is 64 x 32\)"):
        add_lora(init_random(cfg), lora)
    assert lora_shapes(lora.replace(targets=("q",)), cfg) == {"q": ((3, 64, 33), (3, 33, 64))}


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_init_as_peft_and_step0_is_the_base_model_bitwise(arch):
    base = init_random(tiny_config(architecture=arch), seed=3, dtype=jnp.float32)
    ids, mask = _batch()
    ref = _logits(base, ids, mask)
    model = add_lora(base, LoRAConfig(rank=5, alpha=7, targets=ALL), seed=11)
    assert base.lora is None and not adapters(base)  # the input model is unchanged
    assert model.lora.targets == ALL and set(adapters(model)) == set(ALL)
    shapes = lora_shapes(model.lora, model.config)
    for t, adapter in adapters(model).items():
        a, b = np.asarray(adapter.a[...]), np.asarray(adapter.b[...])
        assert (a.shape, b.shape) == shapes[t]
        assert isinstance(adapter.a, LoRAParam) and isinstance(adapter.b, LoRAParam)
        bound = 1 / np.sqrt(a.shape[1])  # PEFT: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(d_in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
        np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.15)
        assert not np.any(b)
    # each target draws its own A
    assert not np.array_equal(model.layers.q_proj_lora.a[...], model.layers.k_proj_lora.a[...])
    # B = 0: x @ W + scaling * (x @ A) @ 0 adds exact zeros, so the logits are bitwise equal
    assert jnp.array_equal(_logits(model, ids, mask), ref)
    bf16_base = init_random(tiny_config(architecture=arch), seed=3, dtype=jnp.bfloat16)
    bf16 = add_lora(bf16_base, LoRAConfig(rank=5, alpha=7, targets=ALL))
    assert jnp.array_equal(_logits(bf16, ids, mask), _logits(bf16_base, ids, mask))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(model, model.lora)
    with pytest.raises(ValueError, match="no LoRA adapters to merge"):
        merge_lora(base)


def test_update_and_merge_match_float64_maths():
    # qwen2: biases on q/k/v; a subset of targets; rsLoRA scaling alpha / sqrt(r)
    base = init_random(tiny_config(architecture="qwen2"), seed=4, dtype=jnp.float32)
    lora = LoRAConfig(rank=3, alpha=5, targets=("q", "v", "o", "down"), use_rslora=True)
    model = _random_b(add_lora(base, lora, seed=2))
    ids, mask = _batch()
    # the merged weights, computed in float64 from the parts
    merged = merge_lora(model)
    assert merged.lora is None and not adapters(merged) and model.lora == lora
    p, pm = model.params(), merged.params()
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w = np.asarray(p["layers"][name], np.float64)
        lw = p["layers"].get(f"{name}_lora")
        if lw is not None:
            a, b = np.asarray(lw.a, np.float64), np.asarray(lw.b, np.float64)
            w = w + lora.scaling * np.einsum("lir,lro->lio", a, b)
            assert lw.scaling == 5 / np.sqrt(3)
        np.testing.assert_allclose(np.asarray(pm["layers"][name]), w, rtol=0, atol=1e-6)
    # the adapter forward equals the merged forward (float32: reassociation only) and differs
    # from the base model
    got, want = _logits(model, ids, mask), _logits(merged, ids, mask)
    keep = mask[..., None].astype(bool)
    chex.assert_trees_all_close(jnp.where(keep, got, 0), jnp.where(keep, want, 0), atol=2e-5)
    assert float(jnp.max(jnp.abs(got - _logits(base, ids, mask)))) > 1e-2


def test_grads_only_for_adapters_and_zero_for_a_at_b_zero():
    base = init_random(tiny_config(), seed=5, dtype=jnp.float32)
    model = add_lora(base, LoRAConfig(rank=4, alpha=8, targets=ALL))
    ids, mask = _batch()

    def loss(m):
        return jnp.mean(jnp.square(m(ids, mask)))

    grads = nnx.jit(nnx.grad(loss, argnums=nnx.DiffState(0, LoRAParam)))(model)
    flat = nnx.to_flat_state(grads)
    paths = sorted("/".join(map(str, path)) for path, _ in flat)
    assert paths == sorted(f"layers/{TARGETS[t]}_lora/{m}" for t in ALL for m in "ab")
    assert all(isinstance(v, LoRAParam) for _, v in flat)
    for t in ALL:
        g = getattr(grads.layers, f"{TARGETS[t]}_lora")
        # dL/dA = scaling * x^T (dL/dy) B^T = 0 at B = 0; dL/dB = scaling * (x A)^T dL/dy != 0
        assert not np.any(np.asarray(g.a[...]))
        assert np.all(np.abs(np.asarray(g.b[...])).sum(axis=(1, 2)) > 0)  # every layer
    # the split phase 2 trains on: adapters in one state, the base weights in the rest
    graphdef, lora_state, rest = nnx.split(model, LoRAParam, ...)
    assert {type(v) for _, v in nnx.to_flat_state(lora_state)} == {LoRAParam}
    assert all(type(v) is nnx.Param for _, v in nnx.to_flat_state(rest) if isinstance(v, nnx.Param))
    again = nnx.merge(graphdef, lora_state, rest)
    assert jnp.array_equal(again(ids, mask), model(ids, mask))


@pytest.mark.slow
def test_frozen_layers_freeze_adapters_too():
    cfg = tiny_config().replace(num_layers=4)
    model = _random_b(
        add_lora(
            init_random(cfg, seed=3, dtype=jnp.float32),
            LoRAConfig(rank=2, alpha=4, targets=("q", "down")),
        )
    )
    ids, mask = _batch()

    @nnx.jit(static_argnums=1)
    def loss_and_grad(m, frozen):
        def loss(m):
            return jnp.mean(jnp.square(m(ids, mask, frozen_layers=frozen)))

        return nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam))(m)

    l0, g0 = loss_and_grad(model, 0)
    l2, g2 = loss_and_grad(model, 2)
    chex.assert_trees_all_close(l0, l2, rtol=1e-6, atol=0)
    for name in ("q_proj_lora", "down_proj_lora"):
        for m in "ab":
            frozen = np.asarray(getattr(getattr(g2.layers, name), m)[...])
            full = np.asarray(getattr(getattr(g0.layers, name), m)[...])
            assert not np.any(frozen[:2])
            assert np.all(np.abs(full[:2]).sum(axis=(1, 2)) > 0)
            np.testing.assert_allclose(frozen[2:], full[2:], rtol=1e-4, atol=1e-7)


# (data, fsdp, tensor) = 2 x 4 meshes of the 8 virtual devices; vocab 98 divides tensor=2 only
@pytest.mark.slow
@pytest.mark.parametrize("shape,axis_type", [((2, 1, 4), "auto"), ((1, 2, 4), "explicit")])
def test_adapters_on_a_mesh_equal_single_device(shape, axis_type):
    cfg = tiny_config(vocab_size=98, architecture="qwen2").replace(tie_word_embeddings=False)
    lora = LoRAConfig(rank=4, alpha=8, targets=ALL)
    ids, mask = _batch(vocab=98, shape=(4, 9))
    single = _random_b(add_lora(init_random(cfg, seed=2, dtype=jnp.float32), lora, seed=1))
    mesh = make_mesh(shape, axis_type=axis_type)
    sharded = _random_b(
        add_lora(init_random(cfg, seed=2, dtype=jnp.float32, mesh=mesh), lora, seed=1)
    )
    same = jax.tree.map(np.array_equal, nnx.state(single), nnx.state(sharded))
    assert all(jax.tree.leaves(same))
    fsdp = "fsdp"  # as the base weights: kept on the spec even where the axis has size 1
    q, o = sharded.layers.q_proj_lora, sharded.layers.o_proj_lora
    assert q.a[...].sharding.spec == PartitionSpec(None, fsdp, None)
    assert q.b[...].sharding.spec == PartitionSpec(None, None, "tensor")
    assert o.a[...].sharding.spec == PartitionSpec(None, "tensor", None)
    assert o.b[...].sharding.spec == PartitionSpec(None, None, fsdp)

    def loss(m):
        return jnp.mean(jnp.square(m(ids, mask) * mask[..., None]))

    grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoRAParam)))
    ref_logits, ref_grads = _logits(single, ids, mask), grad_fn(single)
    with jax.set_mesh(mesh):
        got_logits, got_grads = _logits(sharded, ids, mask), grad_fn(sharded)
        merged = merge_lora(sharded)
    keep = mask[..., None].astype(bool)
    # same maths, other reduction order across shards
    chex.assert_trees_all_close(
        jnp.where(keep, got_logits, 0), jnp.where(keep, ref_logits, 0), rtol=1e-5, atol=1e-5
    )
    chex.assert_trees_all_close(got_grads, ref_grads, rtol=1e-4, atol=1e-7)
    assert merged.layers.q_proj[...].sharding.spec == sharded.layers.q_proj[...].sharding.spec
    chex.assert_trees_all_close(
        nnx.state(merged), nnx.state(merge_lora(single)), rtol=1e-6, atol=1e-7
    )


def test_bf16_compute_and_bf16_params():
    base = init_random(tiny_config(), seed=6, dtype=jnp.float32)
    model = _random_b(add_lora(base, LoRAConfig(rank=4, alpha=8, targets=ALL)))
    ids, mask = _batch()
    ref = _logits(model, ids, mask)
    model.dtype = jnp.bfloat16
    got = _logits(model, ids, mask)
    assert got.dtype == jnp.float32
    keep = mask[..., None].astype(bool)
    # bf16 matmuls (8-bit mantissa) through 3 layers: within a few percent of the logit scale
    err = float(jnp.max(jnp.abs(jnp.where(keep, got - ref, 0))))
    assert err < 0.03 * float(jnp.max(jnp.abs(ref))), err
    bf = init_random(tiny_config(), seed=6, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf = add_lora(bf, LoRAConfig(rank=4, alpha=8, targets=("q", "up")))
    assert bf.layers.up_proj_lora.a[...].dtype == jnp.bfloat16
    assert np.isfinite(np.asarray(_logits(bf, ids, mask))).all()


@pytest.mark.slow
def test_generation_and_scoring_with_adapters_equal_the_merged_model():
    base = init_random(tiny_config(architecture="qwen2"), seed=8, dtype=jnp.float32)
    model = _random_b(add_lora(base, LoRAConfig(rank=4, alpha=16, targets=ALL)), scale=0.3)
    merged = merge_lora(model)
    prompts = jax.random.randint(jax.random.key(9), (3, 6), 3, 97)
    pmask = jnp.ones((3, 6), jnp.int32).at[0, :2].set(0).at[2, :4].set(0)  # left padding
    kw = dict(max_new_tokens=8, eos_token_id=2)
    got = generate(model, prompts, pmask, **kw)
    assert jnp.array_equal(got, generate(merged, prompts, pmask, **kw))
    assert not jnp.array_equal(got, generate(base, prompts, pmask, **kw))  # the adapters matter
    requests = [([1, 5, 9], [4, 7]), ([1, 5, 9], [3]), ([2, 8], [6, 6, 6])]
    for shared in (True, False):
        s_lora = score_continuations(model, requests, shared_prefix=shared)
        s_merged = score_continuations(merged, requests, shared_prefix=shared)
        np.testing.assert_allclose(s_lora["logprob"], s_merged["logprob"], rtol=1e-5, atol=1e-5)


def test_capture_gives_adapters_their_layers_inputs():
    model = add_lora(
        init_random(tiny_config(), seed=2, dtype=jnp.float32),
        LoRAConfig(rank=3, alpha=6, targets=("k", "o", "down")),
    )
    model = _random_b(model)
    ids, mask = _batch()
    cap = capture_inputs(model.params(), model.config, ids, mask, rows=7, with_logits=True)
    layers = cap.inputs["layers"]
    for name in ("k_proj", "o_proj", "down_proj"):
        adapter = layers[f"{name}_lora"]
        assert isinstance(adapter, LoRAWeights) and adapter.b is None
        assert jnp.array_equal(adapter.a, layers[name])  # an adapted layer's input is the same
    assert "q_proj_lora" not in layers
    chex.assert_trees_all_close(cap.logits, model(ids, mask), rtol=1e-6, atol=1e-6)


def test_merged_model_saves_as_a_full_hf_folder(tmp_path):
    model = _random_b(
        add_lora(
            init_random(tiny_config(architecture="qwen2"), seed=1, dtype=jnp.float32),
            LoRAConfig(rank=2, alpha=3, targets=("gate", "up", "down")),
        )
    )
    with pytest.raises(ValueError, match=r"save_hf\(merge_lora\(model\)"):
        save_hf(model, tmp_path / "adapters")
    assert not (tmp_path / "adapters").exists()  # refused before writing anything
    merged = merge_lora(model)
    again = load_hf(save_hf(merged, tmp_path / "merged"), dtype=jnp.float32)
    assert all(jax.tree.leaves(jax.tree.map(jnp.array_equal, again.params(), merged.params())))
    ids, mask = _batch()
    chex.assert_trees_all_close(_logits(again, ids, mask), _logits(model, ids, mask), atol=2e-5)


def test_adapter_memory_of_a_7b_model_abstractly():
    cfg = qwen2_5_7b_config()
    lora = LoRAConfig(rank=16, alpha=32, targets=ALL)
    model = nnx.eval_shape(lambda: add_lora(Decoder(cfg, rngs=nnx.Rngs(0)), lora))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    d, f, q, kv = 3584, 18944, 28 * 128, 4 * 128
    per_layer = 16 * ((d + q) * 2 + (d + kv) * 2 + (d + f) * 3)
    assert n == cfg.num_layers * per_layer == 40_370_176
