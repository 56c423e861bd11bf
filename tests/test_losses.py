"""Loss functions against hand-computed values (float64 NumPy transcriptions of the formulas)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ogpsa_jax.models import sequence_logprobs
from ogpsa_jax.train.losses import dpo_loss, dpo_rewards, token_nll


def _logsigmoid(x):
    return -np.log1p(np.exp(-x))


@pytest.fixture
def logps():
    rng = np.random.default_rng(3)
    return [rng.normal(-20.0, 5.0, size=7).astype(np.float32) for _ in range(4)]


@pytest.mark.parametrize("ls", [0.0, 0.1, 0.3])
def test_dpo_sigmoid_matches_formula(logps, ls):
    pc, pr, rc, rr = logps
    beta = 0.2
    h = (pc.astype(np.float64) - pr) - (rc.astype(np.float64) - rr)
    want = -(1 - ls) * _logsigmoid(beta * h) - ls * _logsigmoid(-beta * h)
    got = jax.jit(lambda *a: dpo_loss(*a, beta=beta, label_smoothing=ls))(pc, pr, rc, rr)
    # float32 differences of O(20) log-probs: ~1e-6 relative.
    chex.assert_trees_all_close(np.asarray(got), want, rtol=1e-5, atol=1e-6)


def test_dpo_known_values():
    # h = 1 -> -logsigmoid(0.1) = log(1 + e^-0.1) = 0.6443966...; h = 0 -> log 2.
    got = dpo_loss(
        jnp.array([-1.0, -3.0]),
        jnp.array([-2.0, -3.0]),
        jnp.zeros(2),
        jnp.zeros(2),
        beta=0.1,
    )
    chex.assert_trees_all_close(got, jnp.array([np.log1p(np.exp(-0.1)), np.log(2.0)]), atol=1e-6)
    # Label smoothing 0.25 at h = 1, beta = 1: 0.75 * log(1+e^-1) + 0.25 * log(1+e^1).
    got = dpo_loss(
        jnp.array([1.0]),
        jnp.array([0.0]),
        jnp.zeros(1),
        jnp.zeros(1),
        beta=1.0,
        label_smoothing=0.25,
    )
    want = 0.75 * np.log1p(np.exp(-1.0)) + 0.25 * np.log1p(np.exp(1.0))
    chex.assert_trees_all_close(got, jnp.array([want]), atol=1e-6)


def test_dpo_ipo_matches_formula(logps):
    pc, pr, rc, rr = logps
    beta = 0.5
    h = (pc.astype(np.float64) - pr) - (rc.astype(np.float64) - rr)
    got = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    chex.assert_trees_all_close(np.asarray(got), (h - 1 / (2 * beta)) ** 2, rtol=1e-5, atol=1e-4)
    # h = 1/(2 beta) is the IPO minimum.
    zero = dpo_loss(
        jnp.array([1.0]), jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), beta=0.5, loss_type="ipo"
    )
    chex.assert_trees_all_close(zero, jnp.zeros(1), atol=1e-7)


def test_dpo_rewards(logps):
    pc, pr, rc, rr = logps
    r = dpo_rewards(pc, pr, rc, rr, beta=0.2)
    chex.assert_trees_all_close(r["rewards_chosen"], 0.2 * (pc - rc), rtol=1e-6, atol=1e-5)
    chex.assert_trees_all_close(r["rewards_rejected"], 0.2 * (pr - rr), rtol=1e-6, atol=1e-5)
    chex.assert_trees_all_close(r["margins"], r["rewards_chosen"] - r["rewards_rejected"])
    np.testing.assert_array_equal(r["accuracy"], (0.2 * (pc - rc) > 0.2 * (pr - rr)).astype(float))


def test_dpo_bad_arguments():
    z = jnp.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(z, z, z, z, beta=0.1, loss_type="hinge2")
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(z, z, z, z, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(z, z, z, z, beta=0.1, label_smoothing=0.5)


def test_token_nll_and_sequence_logprobs_match_numpy():
    rng = np.random.default_rng(0)
    b, n_len, v = 3, 11, 13
    logits = rng.normal(size=(b, n_len, v)).astype(np.float32)
    ids = rng.integers(0, v, size=(b, n_len)).astype(np.int32)
    mask = (rng.random((b, n_len)) < 0.6).astype(np.int32)
    mask[2] = 0  # a row with no targets
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    lp = np.take_along_axis(logits[:, :-1], ids[:, 1:, None], -1)[..., 0] - lse[:, :-1]
    want_s = (lp * mask[:, 1:]).sum(-1)
    s, n = jax.jit(sequence_logprobs)(logits, ids, mask)
    chex.assert_trees_all_close(np.asarray(s), want_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), mask[:, 1:].sum(-1))
    total, count = token_nll(logits, ids, mask)
    chex.assert_trees_all_close(float(total), -want_s.sum(), rtol=1e-5)
    assert float(count) == mask[:, 1:].sum()
    # Sum/count split: accumulating two halves then dividing once equals the full mean.
    t1, c1 = token_nll(logits[:1], ids[:1], mask[:1])
    t2, c2 = token_nll(logits[1:], ids[1:], mask[1:])
    chex.assert_trees_all_close((t1 + t2) / (c1 + c2), total / count, rtol=1e-6)
