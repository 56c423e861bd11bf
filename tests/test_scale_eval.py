"""Scoring and generation keep the batch split over data x fsdp on a sharded model.

Their programs run the decoder's entry points (`hidden_states` + `head_logits` for full
sequences, `prefill` into a KV cache, `forward_with_cache` for new tokens) on ids that arrive
replicated; the shared preamble splits the embedded tokens (and the caches) over the batch. On
8 devices the per-device temporaries must shrink to at most 0.3x those on 1 device, and greedy
generation on a 2x4 mesh must give the tokens of the unsharded model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogpsa_jax.models import generate, init_random, make_mesh, tiny_config
from ogpsa_jax.models.functional import forward_with_cache, head_logits, hidden_states, prefill
from ogpsa_jax.models.sharding import with_auto_axes

pytestmark = pytest.mark.slow  # compiles on 1 and 8 devices; `make test-fast` skips them

SHRINK_BOUND = 0.3
CONFIG = tiny_config(vocab_size=512)
ROWS, PROMPT, NEW = 32, 48, 16


def _temps(mesh_shape, axis_type, program):
    n = int(np.prod(mesh_shape))
    mesh = make_mesh(mesh_shape, axis_type=axis_type, devices=jax.devices()[:n])
    model = init_random(CONFIG, seed=0, dtype=jnp.float32, mesh=mesh)
    ids = jax.ShapeDtypeStruct((ROWS, PROMPT), jnp.int32)
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, i, m: with_auto_axes(program, (ROWS, 4))(p, i, m))
        compiled = fn.lower(model.params(), ids, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def _score_full(p, ids, mask):  # as eval/scoring.py: hidden states, lm_head on gathered rows
    h = hidden_states(p, CONFIG, jnp.float32, ids, mask)
    logits = head_logits(p, CONFIG, jnp.float32, h[:, -4:])
    return jax.nn.log_softmax(logits, axis=-1)[..., 0]


def _prefill_and_decode(p, ids, mask):  # as eval/scoring.py's shared prefix and generation
    caches = prefill(p, CONFIG, jnp.float32, ids, mask, PROMPT + 4)
    valid = jnp.ones((ROWS, PROMPT + 4), bool)
    pos = jnp.broadcast_to(PROMPT + jnp.arange(4), (ROWS, 4))
    logits, _ = forward_with_cache(p, CONFIG, jnp.float32, ids[:, :4], pos, valid, caches, PROMPT)
    return logits[..., 0]


@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
@pytest.mark.parametrize("program", [_score_full, _prefill_and_decode], ids=["full", "cache"])
def test_scoring_and_generation_programs_split_the_batch(axis_type, program):
    one = _temps((1, 1, 1), axis_type, program)
    eight = _temps((2, 4, 1), axis_type, program)
    assert eight <= SHRINK_BOUND * one, (one, eight)


def test_generation_on_a_mesh_equals_one_device():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, CONFIG.vocab_size, size=(8, 12)), jnp.int32)
    mask = jnp.ones_like(ids).at[:3, :4].set(0)  # some left padding
    plain = init_random(CONFIG, seed=1, dtype=jnp.float32)
    expected = generate(plain, ids, mask, max_new_tokens=NEW, eos_token_id=2)
    mesh = make_mesh((2, 4, 1))
    sharded = init_random(CONFIG, seed=1, dtype=jnp.float32, mesh=mesh)
    with jax.set_mesh(mesh):
        got = generate(sharded, ids, mask, max_new_tokens=NEW, eos_token_id=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
