"""Batched generation from left-padded prompts with a KV cache (greedy or nucleus sampling)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.decoder import Decoder
from ogpsa_jax.models.functional import forward_with_cache, token_positions
from ogpsa_jax.models.sharding import constrain_batch, with_auto_axes


def _sample(logits_BxV: jax.Array, greedy: bool, temperature, top_p, key) -> jax.Array:
    if greedy:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each token
    keep = before < top_p  # the top token is always kept
    choice = jax.random.categorical(key, jnp.where(keep, sorted_logits, -jnp.inf), axis=-1)
    return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "max_new_tokens", "greedy"))
def _generate(
    params: dict[str, Any],
    input_ids: jax.Array,
    attention_mask: jax.Array,
    temperature: jax.Array,
    top_p: jax.Array,
    rng: jax.Array,
    eos_E: jax.Array,
    pad_id: jax.Array,
    *,
    config: DecoderConfig,
    dtype: Any,
    max_new_tokens: int,
    greedy: bool,
) -> jax.Array:
    run = lambda *args: _generate_loop(
        *args,
        config=config,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
    )
    out_shape = (input_ids.shape[0], max_new_tokens)
    return with_auto_axes(run, out_shape)(
        params, input_ids, attention_mask, temperature, top_p, rng, eos_E, pad_id
    )


def _generate_loop(
    params,
    input_ids,
    attention_mask,
    temperature,
    top_p,
    rng,
    eos_E,
    pad_id,
    *,
    config,
    dtype,
    max_new_tokens,
    greedy,
):
    b, p = input_ids.shape
    t = p + max_new_tokens
    shape = (config.num_layers, b, config.num_kv_heads, t, config.head_dim)
    # the caches (and every activation) split over the batch like the embedded prompts
    caches = tuple(constrain_batch(jnp.zeros(shape, dtype), axis=1) for _ in range(2))
    valid_BxP = attention_mask.astype(bool)
    kv_valid_BxT = jnp.concatenate([valid_BxP, jnp.zeros((b, max_new_tokens), bool)], axis=1)
    n_real_B = jnp.sum(valid_BxP, axis=1, dtype=jnp.int32)
    logits, caches = forward_with_cache(
        params, config, dtype, input_ids, token_positions(valid_BxP), kv_valid_BxT, caches, 0
    )
    rng, key = jax.random.split(rng)
    token_B = _sample(logits[:, -1], greedy, temperature, top_p, key)
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)

    def cond(state):
        i, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, out, done, token_B, caches, kv_valid_BxT, rng = state
        out = out.at[:, i].set(jnp.where(done, pad_id, token_B))
        done = done | jnp.any(token_B[:, None] == eos_E[None], axis=1)
        slot = p + i
        kv_valid_BxT = kv_valid_BxT.at[:, slot].set(True)
        logits, caches = forward_with_cache(
            params,
            config,
            dtype,
            token_B[:, None],
            (n_real_B + i)[:, None],
            kv_valid_BxT,
            caches,
            slot,
        )
        rng, key = jax.random.split(rng)
        token_B = _sample(logits[:, -1], greedy, temperature, top_p, key)
        return i + 1, out, done, token_B, caches, kv_valid_BxT, rng

    state = (jnp.int32(0), out, done, token_B, caches, kv_valid_BxT, rng)
    return jax.lax.while_loop(cond, body, state)[1]


def generate(
    model: Decoder,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    pad_token_id: int | None = None,
) -> jax.Array:
    """Generates continuations of left-padded prompts with a KV cache.

    Args:
        model: the decoder.
        input_ids: [B, P] int prompt ids, left-padded.
        attention_mask: [B, P], 1 for prompt tokens, 0 for (left) padding.
        max_new_tokens: number of tokens to generate per row (static: one compile per value).
        eos_token_id: id or ids that end a row; the EOS itself is emitted.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling mass (1.0 = plain sampling).
        rng: PRNG key for sampling (required when temperature > 0).
        pad_token_id: filler after a row's EOS (default: the first EOS id).

    Returns:
        int32 [B, max_new_tokens] new tokens.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> ids = jnp.ones((2, 5), jnp.int32)
        >>> generate(model, ids, jnp.ones_like(ids), max_new_tokens=4, eos_token_id=2).shape
        (2, 4)
    """
    if input_ids.ndim != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"input_ids {input_ids.shape} and attention_mask {attention_mask.shape} must be "
            "equal [batch, length] shapes"
        )
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    greedy = temperature == 0.0
    if not greedy and rng is None:
        raise ValueError("sampling (temperature > 0) needs an rng key")
    eos_ids = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id)
    if not eos_ids:
        raise ValueError("eos_token_id must name at least one id")
    pad_id = eos_ids[0] if pad_token_id is None else int(pad_token_id)
    return _generate(
        model.params(),
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        jnp.float32(max(temperature, 1e-6)),
        jnp.float32(top_p),
        jax.random.key(0) if rng is None else rng,
        jnp.asarray(eos_ids, jnp.int32),
        jnp.int32(pad_id),
        config=model.config,
        dtype=model.dtype,
        max_new_tokens=int(max_new_tokens),
        greedy=greedy,
    )
