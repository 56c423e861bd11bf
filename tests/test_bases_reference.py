"""Tests of the reference gradients (ogpsa_jax/bases/reference.py) against jax.grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ogpsa_jax as og


def test_reference_gradients_per_batch_groups_and_token_mean():
    rng = np.random.default_rng(4)
    params = {
        "w": jnp.asarray(rng.standard_normal((3, 5)), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(5), jnp.float32),
    }
    batches = [
        {
            "x": rng.standard_normal((7, 3)).astype(np.float32),
            "y": rng.standard_normal((7, 5)).astype(np.float32),
            "m": (rng.random(7) < 0.3 + 0.15 * i).astype(np.float32),
        }
        for i in range(4)
    ]

    def sq_err(p, batch):  # per-row summed squared error, (7,)
        return jnp.sum((batch["x"] @ p["w"] + p["b"] - batch["y"]) ** 2, axis=-1)

    def mean_loss(p, batch):
        return jnp.mean(sq_err(p, batch))

    def sum_count_loss(p, batch):
        return jnp.sum(sq_err(p, batch) * batch["m"]), jnp.sum(batch["m"])

    per_batch = og.reference_gradients(mean_loss, params, batches)
    assert len(per_batch) == 4
    for g, batch in zip(per_batch, batches, strict=True):
        chex.assert_trees_all_close(g, jax.grad(mean_loss)(params, batch), rtol=1e-6, atol=1e-6)
    grouped = og.reference_gradients(mean_loss, params, batches, group_size=2)
    assert len(grouped) == 2
    want = jax.tree.map(lambda a, b: (a + b) / 2, per_batch[2], per_batch[3])
    chex.assert_trees_all_close(grouped[1], want, rtol=1e-6, atol=1e-6)
    same = og.reference_gradients(mean_loss, params, groups=[batches[:2], batches[2:]])
    chex.assert_trees_all_close(same, grouped, rtol=0, atol=0)
    # (sum, count): gradient of the token-mean over the whole set
    tok = og.reference_gradients(sum_count_loss, params, groups=[batches[:3]])[0]

    def whole_set(p):
        s = sum(sum_count_loss(p, b)[0] for b in batches[:3])
        return s / sum(float(np.sum(b["m"])) for b in batches[:3])

    chex.assert_trees_all_close(tok, jax.grad(whole_set)(params), rtol=1e-5, atol=1e-6)
    one = og.reference_gradients(sum_count_loss, params, batches[:1])[0]
    chex.assert_trees_all_close(
        one,
        jax.grad(lambda p: sum_count_loss(p, batches[0])[0] / np.sum(batches[0]["m"]))(params),
        rtol=1e-5,
        atol=1e-6,
    )


def test_bad_input_raises_value_error():
    t = {"w": np.ones((8, 13), np.float32)}
    loss = lambda p, b: jnp.sum(p["w"])
    with pytest.raises(ValueError, match="exactly one of batches or groups"):
        og.reference_gradients(loss, t)
    with pytest.raises(ValueError, match="groups of 2"):
        og.reference_gradients(loss, t, [1, 2, 3], group_size=2)
    with pytest.raises(ValueError, match="non-empty"):
        og.reference_gradients(loss, t, groups=[[1], []])
