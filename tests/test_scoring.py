"""Tests for the fast scoring paths of ``score_continuations`` (the decoder entry points they
use, ``hidden_states``, ``head_logits``, ``prefill``, are tested in ``tests/test_models.py``).

Every path (shared prefix, full sequence with the lm_head on gathered rows, generic full logits)
is compared with a hand computation from the model's full [L, V] logits of each unpadded
sequence, in float64, on tiny random float32 decoders with an odd vocabulary (101).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ogpsa_jax.eval.batching import shared_prefix_batches
from ogpsa_jax.eval.scoring import score_continuations
from ogpsa_jax.models import init_random, make_mesh, tiny_config

VOCAB = 101
WIDTH = 48  # hand computations run every sequence filled to this width (one compilation)


@pytest.fixture(scope="module")
def model():
    # qwen2: untied lm_head and q/k/v biases
    return init_random(
        tiny_config(vocab_size=VOCAB, architecture="qwen2"), seed=7, dtype=jnp.float32
    )


@pytest.fixture(scope="module")
def ref_model():
    # llama: tied embeddings; a different architecture exercises the separate ref config
    return init_random(tiny_config(vocab_size=VOCAB), seed=8, dtype=jnp.float32)


_full_logits = jax.jit(lambda g, s, ids: nnx.merge(g, s)(ids)[0], static_argnums=0)


def _log_softmax_np(logits):
    x = np.asarray(logits, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _hand_logp(model, seq):
    """[len(seq), V] float64 log-softmax of one unpadded causal forward (filler after it)."""
    assert len(seq) <= WIDTH
    ids = jnp.asarray([list(seq) + [0] * (WIDTH - len(seq))], jnp.int32)
    return _log_softmax_np(_full_logits(*nnx.split(model), ids)[: len(seq)])


def _hand(model, ref_model, ctx, cont, max_length=None):
    seq = list(ctx) + list(cont)
    if max_length is not None and len(seq) > max_length:
        seq = seq[len(seq) - max_length :]
    start = len(seq) - len(cont)
    pred = np.arange(start - 1, len(seq) - 1)  # rows predicting the continuation tokens
    logp = _hand_logp(model, seq)[pred]
    out = {
        "logprob": logp[np.arange(len(cont)), cont].sum(),
        "count": float(len(cont)),
        "greedy": float(np.all(logp.argmax(-1) == np.asarray(cont))),
    }
    if ref_model is not None:
        ref = _hand_logp(ref_model, seq)[pred]
        out["kl"] = (np.exp(ref) * (ref - logp)).sum()
    return out


def _greedy_continuation(model, ctx, n):
    seq = list(ctx)
    for _ in range(n):
        seq.append(int(_hand_logp(model, seq)[-1].argmax()))
    return seq[len(ctx) :]


def _requests(model):
    rng = np.random.default_rng(0)
    tokens = lambda n: rng.integers(3, VOCAB, size=n).tolist()
    shared3, shared5, single, short = tokens(19), tokens(11), tokens(23), tokens(1)
    return [
        (shared3, tokens(1)),  # a context shared by 3 requests, choices of 1, 4 and 9 tokens
        (single, tokens(6)),  # a context used once
        (shared3, tokens(4)),
        (short, tokens(3)),  # a one-token context: its prefill is empty
        (shared3, tokens(9)),
        *[(shared5, tokens(k)) for k in (2, 5, 3, 1, 7)],  # 5 > batch_size: split
        (single[:13], _greedy_continuation(model, single[:13], 3)),  # all-greedy continuation
    ]


def _expected(model, ref_model, reqs, max_length=None):
    rows = [_hand(model, ref_model, c, x, max_length) for c, x in reqs]
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def _check(out, want):
    assert set(out) == set(want)
    # float32 forwards (padded, batched, cached vs one unpadded row): sums agree to 1e-4.
    chex.assert_trees_all_close(out, want, rtol=1e-5, atol=1e-4)


class _Wrapped(nnx.Module):
    """Not a Decoder: forces the generic full-logits path."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, input_ids, attention_mask=None):
        return self.inner(input_ids, attention_mask)


@pytest.mark.slow
def test_all_paths_match_hand_computation(model, ref_model):
    reqs = _requests(model)
    want = _expected(model, ref_model, reqs)
    assert want["greedy"][-1] == 1.0 and want["greedy"].min() == 0.0  # both outcomes occur
    kw = dict(batch_size=4, length_bucket=32, ref_model=ref_model)
    _check(score_continuations(model, reqs, **kw), want)
    _check(score_continuations(model, reqs, shared_prefix=False, **kw), want)
    _check(score_continuations(_Wrapped(model), reqs, **kw), want)


def test_left_truncated_contexts(model, ref_model):
    reqs = _requests(model)
    want = _expected(model, ref_model, reqs, max_length=12)
    for shared in (True, False):
        out = score_continuations(
            model,
            reqs,
            batch_size=4,
            length_bucket=32,
            max_length=12,
            ref_model=ref_model,
            shared_prefix=shared,
        )
        _check(out, want)
    with pytest.raises(ValueError, match="continuation of 9 tokens does not fit max_length=9"):
        score_continuations(model, reqs, max_length=9)


def test_shared_batches_prefill_each_context_once():
    ctx_a, ctx_b = [5, 6, 7, 8], [9, 10]
    reqs = [(ctx_a, [1]), (ctx_b, [2, 3]), (ctx_a, [4, 4, 4]), (ctx_a, [5, 6])]
    seqs = [c + x for c, x in reqs]
    starts = [len(c) for c, _ in reqs]
    (rows, arrays), *rest = shared_prefix_batches(seqs, starts, 4, 8, 0)
    ctx_ids, ctx_mask, group, ids, pos, tok, valid = arrays
    assert not rest and sorted(rows) == [0, 1, 2, 3]
    # two context rows (the longer first), contexts minus their last token, right-padded
    assert ctx_ids.shape == (2, 8) and ctx_mask.sum(1).tolist() == [3, 1]
    assert ctx_ids[0, :3].tolist() == [5, 6, 7] and ctx_ids[1, :1].tolist() == [9]
    for b, j in enumerate(rows):
        ctx, cont = reqs[j]
        assert group[b] == (0 if ctx == ctx_a else 1)
        c = len(cont)
        assert ids[b, :c].tolist() == [ctx[-1], *cont[:-1]] and tok[b, :c].tolist() == cont
        assert valid[b].sum() == c and pos[b, 0] == len(ctx) - 1
    # a group larger than the batch is split, each part with its own context row
    split = list(shared_prefix_batches(seqs[:1] * 5, starts[:1] * 5, 2, 8, 0))
    assert [len(r) for r, _ in split] == [2, 2, 1]


@pytest.mark.slow
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_model_matches_hand_computation(model, ref_model, axis_type):
    reqs = _requests(model)[:5]  # 3 + 1 + 1 requests: one batch of 5 rows, 3 contexts
    want = _expected(model, ref_model, reqs)
    mesh = make_mesh((2, 4, 1), axis_type=axis_type)
    sharded = init_random(model.config, seed=7, dtype=jnp.float32, mesh=mesh)
    sharded_ref = init_random(ref_model.config, seed=8, dtype=jnp.float32, mesh=mesh)
    with jax.set_mesh(mesh):
        out = score_continuations(
            sharded, reqs, batch_size=5, length_bucket=32, ref_model=sharded_ref
        )
    _check(out, want)
