"""KV-cache generation against full forwards and transformers' greedy generation."""

import contextlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ogpsa_jax.models import generate, init_random, load_hf, tiny_config

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
NAMES = sorted(d for d in os.listdir(FIXTURES) if os.path.isdir(os.path.join(FIXTURES, d)))
N_NEW = 7


@contextlib.contextmanager
def count_compiles():
    """Counts XLA compilations in the block (jax's compile-duration monitoring event)."""
    count = [0]

    def listener(event: str, duration: float, **kwargs) -> None:
        count[0] += event == "/jax/core/compile/backend_compile_duration"

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield count
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


@nnx.jit
def fwd(model, ids, mask):
    return model(ids, mask)


@pytest.fixture(scope="module")
def model():
    return init_random(tiny_config(vocab_size=89, architecture="qwen2"), seed=4, dtype=jnp.float32)


@pytest.fixture(scope="module")
def prompts():
    ids = jax.random.randint(jax.random.key(7), (3, 6), 3, 89)
    mask = jnp.array([[0, 0, 1, 1, 1, 1], [1] * 6, [0, 0, 0, 0, 0, 1]], jnp.int32)
    return jnp.where(mask == 1, ids, 0), mask


def _full_forward_greedy(model, ids, mask, n_new, eos_ids, pad_id):
    """Reference: argmax of repeated full forward passes (one compile: fixed total length)."""
    b, p = ids.shape
    seq = jnp.concatenate([ids, jnp.zeros((b, n_new), ids.dtype)], axis=1)
    full_mask = jnp.concatenate([mask, jnp.zeros((b, n_new), mask.dtype)], axis=1)
    out = np.full((b, n_new), pad_id)
    done = np.zeros(b, bool)
    for i in range(n_new):
        logits = fwd(model, seq, full_mask)
        nxt = np.asarray(jnp.argmax(logits[:, p + i - 1], axis=-1))
        out[:, i] = np.where(done, pad_id, nxt)
        done |= np.isin(nxt, eos_ids)
        seq = seq.at[:, p + i].set(nxt)
        full_mask = full_mask.at[:, p + i].set(1)
    return out


@pytest.mark.parametrize("name", NAMES[:2])
def test_greedy_matches_transformers_generate(name):
    ref = np.load(f"{FIXTURES}/{name}/reference.npz")
    eos, pad, n = (int(x) for x in ref["gen_meta"])
    model = load_hf(f"{FIXTURES}/{name}", dtype=jnp.float32)
    got = generate(
        model,
        jnp.asarray(ref["gen_input_ids"]),
        jnp.asarray(ref["mask_left"]),
        max_new_tokens=n,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    np.testing.assert_array_equal(np.asarray(got), ref["gen_tokens"])


def test_kv_cache_greedy_equals_full_forward_with_eos_stop(model, prompts):
    ids, mask = prompts
    # pick as EOS the token row 1 emits at step 2 (found without any EOS), so a stop happens
    free = _full_forward_greedy(model, ids, mask, N_NEW, [-1], 0)
    eos = [int(free[1, 2]), 88, -1]  # three ids, as in the other tests: one compile
    ref = _full_forward_greedy(model, ids, mask, N_NEW, eos, 0)
    got = generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=eos, pad_token_id=0)
    assert got.dtype == jnp.int32 and got.shape == (3, N_NEW)
    np.testing.assert_array_equal(np.asarray(got), ref)
    assert (ref[1, 3:] == 0).all() and ref[1, 2] == eos[0]
    # default pad = first EOS id; same compiled function (no recompile) for equal shapes
    with count_compiles() as compiles:
        again = generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=eos)
        again = np.asarray(again)
    np.testing.assert_array_equal(again[1, 3:], eos[0])
    np.testing.assert_array_equal(again[0], ref[0])
    assert compiles[0] == 0


def test_all_rows_done_stops_early(model, prompts):
    ids, mask = prompts
    free = generate(model, ids, mask, max_new_tokens=N_NEW, eos_token_id=[-1, -1, -1])
    first = np.asarray(free)[:, 0]
    out = generate(
        model, ids, mask, max_new_tokens=N_NEW, eos_token_id=first.tolist(), pad_token_id=5
    )
    np.testing.assert_array_equal(np.asarray(out)[:, 0], first)
    assert (np.asarray(out)[:, 1:] == 5).all()


def test_sampling(model, prompts):
    ids, mask = prompts
    kw = dict(max_new_tokens=N_NEW, eos_token_id=[-1, -1, -1])
    greedy = generate(model, ids, mask, **kw)
    # a nucleus this small keeps only the top token: sampling reduces to greedy
    tiny_p = generate(model, ids, mask, temperature=0.7, top_p=1e-6, rng=jax.random.key(0), **kw)
    np.testing.assert_array_equal(np.asarray(tiny_p), np.asarray(greedy))
    hot = dict(temperature=5.0, top_p=1.0, **kw)
    a = generate(model, ids, mask, rng=jax.random.key(1), **hot)
    b = generate(model, ids, mask, rng=jax.random.key(1), **hot)
    c = generate(model, ids, mask, rng=jax.random.key(2), **hot)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    assert ((np.asarray(a) >= 0) & (np.asarray(a) < 89)).all()


def test_bad_arguments(model, prompts):
    ids, mask = prompts
    with pytest.raises(ValueError, match="rng"):
        generate(model, ids, mask, max_new_tokens=2, eos_token_id=2, temperature=1.0)
    with pytest.raises(ValueError, match="attention_mask"):
        generate(model, ids, mask[:, 1:], max_new_tokens=2, eos_token_id=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, mask, max_new_tokens=0, eos_token_id=2)


def test_generate_from_ids_batches_without_padding_a_small_set(model, monkeypatch):
    """A set smaller than batch_size runs as one batch of its own size; larger sets keep the
    fixed batch shape (the last batch padded with copies); the answers do not depend on it."""
    from ogpsa_jax.eval import generation

    shapes = []

    def recording(model, ids, mask, **kw):
        shapes.append(tuple(ids.shape))
        return generate(model, ids, mask, **kw)

    monkeypatch.setattr(generation, "generate", recording)
    encoded = [[3, 4, 5], [6], [7, 8], [9, 10, 11, 12], [13]]
    kw = dict(eos_token_ids=[-1], pad_id=0, max_new_tokens=4, length_bucket=4, progress=False)
    small = generation.generate_from_ids(model, encoded[:3], batch_size=32, **kw)
    assert [s[0] for s in shapes] == [3]
    shapes.clear()
    batched = generation.generate_from_ids(model, encoded, batch_size=2, **kw)
    assert [s[0] for s in shapes] == [2, 2, 2]
    single = [generation.generate_from_ids(model, [e], batch_size=8, **kw)[0] for e in encoded]
    assert batched == single and small == single[:3]
