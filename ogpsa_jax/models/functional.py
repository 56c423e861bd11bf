"""The decoder as pure functions of its parameter dict (`Decoder.params()`).

Every entry point shares one preamble (token embedding, RoPE tables from positions, the causal
mask over key slots) and one `lax.scan` of `ogpsa_jax.models.layers.block` over the stacked
layers (both in `ogpsa_jax.models.layer_scan`):

| entry point | what it returns |
| --- | --- |
| `forward` | float32 logits [B, L, V] of whole sequences (what `Decoder.__call__` runs) |
| `hidden_states` | final-norm hidden states [B, L, D]; `head_logits` turns any rows into logits |
| `hidden_states_with_taps` | the same, plus per layer what a `tap` keeps of the block's inputs |
| `prefill` | the KV caches of prompts (no logits) |
| `forward_with_cache` | logits of new tokens written into KV caches (generation, scoring) |

Example:
    >>> from ogpsa_jax.models import init_random, tiny_config
    >>> model = init_random(tiny_config(), dtype=jnp.float32)
    >>> ids = jnp.ones((2, 7), jnp.int32)
    >>> forward(model.params(), model.config, jnp.float32, ids, jnp.ones_like(ids)).shape
    (2, 7, 97)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.layer_scan import Caches, preamble, scan_layers
from ogpsa_jax.models.layers import attention_chunk_rows, rms_norm
from ogpsa_jax.models.sharding import constrain_batch


def token_positions(attention_mask_BxL: jax.Array) -> jax.Array:
    """RoPE positions [B, L] int32: the number of real tokens before each token (left or
    right padding; padding tokens get the position of a neighbour, they are masked anyway).

    Example:
        >>> token_positions(jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]]))
        Array([[0, 0, 0, 1, 2],
               [0, 1, 2, 2, 2]], dtype=int32)
    """
    valid_BxL = attention_mask_BxL.astype(bool)
    return jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=-1) - 1, 0)


def _full_sequence(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    frozen_layers: int = 0,
    scan_unroll: int = 1,
    attention_chunk: int = -1,
    remat: str = "none",
    tap: Callable[[dict[str, jax.Array]], Any] | None = None,
) -> tuple[jax.Array, Any]:
    """Final-norm hidden states of whole sequences, and the tap's per-layer outputs."""
    valid_BxL = attention_mask.astype(bool)
    positions_BxL = token_positions(valid_BxL)
    h, rope_BxLxE, mask_BxLxL = preamble(
        params, config, dtype, input_ids, positions_BxL, valid_BxL, 0
    )
    chunk = attention_chunk_rows(input_ids.shape[1], attention_chunk)
    run = dict(unroll=scan_unroll, chunk=chunk, tap=tap, remat=remat)
    layers, tapped = params["layers"], []
    if frozen_layers > 0:
        frozen = jax.tree.map(lambda a: a[:frozen_layers], layers)
        layers = jax.tree.map(lambda a: a[frozen_layers:], layers)
        h, _, out = scan_layers(frozen, h, rope_BxLxE, mask_BxLxL, config, dtype, **run)
        h = jax.lax.stop_gradient(h)
        tapped.append(out)
    if frozen_layers < config.num_layers:
        h, _, out = scan_layers(layers, h, rope_BxLxE, mask_BxLxL, config, dtype, **run)
        tapped.append(out)
    if tap is not None and len(tapped) > 1:
        tapped = [jax.tree.map(lambda *xs: jnp.concatenate(xs), *tapped)]
    return rms_norm(h, params["final_norm"], config.rms_norm_eps, dtype), tapped[0]


def forward(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    *,
    frozen_layers: int = 0,
    scan_unroll: int = 1,
    attention_chunk: int = -1,
    remat: str = "none",
) -> jax.Array:
    """Full-sequence forward on a parameter dict (see `Decoder.params`); float32 logits.

    Args:
        params: parameter dict.
        config: architecture.
        dtype: compute dtype.
        input_ids: [B, L] token ids.
        attention_mask: [B, L], 1 for real tokens (left or right padding).
        frozen_layers: bottom layers run under `stop_gradient`.
        scan_unroll: the layer scan's unroll (see `Decoder`).
        attention_chunk: causal attention block rows (see `Decoder`).
        remat: rematerialisation of the blocks in the backward pass (see `Decoder`).

    Returns:
        float32 logits [B, L, vocab_size] (example: see the module docstring).
    """
    h = hidden_states(
        params,
        config,
        dtype,
        input_ids,
        attention_mask,
        attention_chunk,
        frozen_layers=frozen_layers,
        scan_unroll=scan_unroll,
        remat=remat,
    )
    return head_logits(params, config, dtype, h)


def hidden_states(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    attention_chunk: int = -1,
    *,
    frozen_layers: int = 0,
    scan_unroll: int = 1,
    remat: str = "none",
) -> jax.Array:
    """Final-norm hidden states [B, L, D] (in `dtype`) of a full-sequence forward.

    `head_logits(params, config, dtype, hidden_states(...))` equals `forward(...)`; gathering
    rows of the hidden states first applies the lm_head only where logits are needed.

    Args:
        params: parameter dict (see `Decoder.params`).
        config: architecture.
        dtype: compute dtype.
        input_ids: [B, L] token ids.
        attention_mask: [B, L], 1 for real tokens (left or right padding).
        attention_chunk: causal attention block rows (see `Decoder`).
        frozen_layers: bottom layers run under `stop_gradient`.
        scan_unroll: the layer scan's unroll (see `Decoder`).
        remat: rematerialisation of the blocks in the backward pass (see `Decoder`).

    Returns:
        [B, L, hidden_size] array of dtype `dtype`.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> ids = jnp.ones((2, 7), jnp.int32)
        >>> h = hidden_states(model.params(), model.config, jnp.float32, ids, jnp.ones_like(ids))
        >>> head_logits(model.params(), model.config, jnp.float32, h[:, -1:]).shape
        (2, 1, 97)
    """
    h, _ = _full_sequence(
        params,
        config,
        dtype,
        input_ids,
        attention_mask,
        frozen_layers=frozen_layers,
        scan_unroll=scan_unroll,
        attention_chunk=attention_chunk,
        remat=remat,
    )
    return h


def hidden_states_with_taps(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    tap: Callable[[dict[str, jax.Array]], Any],
    attention_chunk: int = -1,
) -> tuple[jax.Array, Any]:
    """`hidden_states`, plus what `tap` keeps of every layer's block intermediates.

    Inside the layer scan each block also returns the inputs of its linear layers (the
    `ogpsa_jax.models.layers.BLOCK_TAPS` names -> [B * L, d_in] rows in `dtype`); `tap` maps
    that dict to any pytree (e.g. a few gathered rows, so no layer keeps more), and its
    outputs come back stacked on a leading layer axis. The block's capture switch is a
    trace-time flag, so the other entry points compile to the same program as without it.

    Args:
        params: parameter dict.
        config: architecture.
        dtype: compute dtype.
        input_ids: [B, L] token ids.
        attention_mask: [B, L], 1 for real tokens.
        tap: called once per traced layer on the block's intermediates.
        attention_chunk: causal attention block rows (see `Decoder`).

    Returns:
        (final-norm hidden states [B, L, D], tap's outputs with a leading num_layers axis).

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> ids = jnp.ones((2, 7), jnp.int32)
        >>> h, rows = hidden_states_with_taps(
        ...     model.params(), model.config, jnp.float32, ids, jnp.ones_like(ids),
        ...     lambda taps: taps["down_in"][:3])
        >>> rows.shape  # (num_layers, 3 rows, intermediate_size)
        (3, 3, 176)
    """
    return _full_sequence(
        params, config, dtype, input_ids, attention_mask, attention_chunk=attention_chunk, tap=tap
    )


def head_logits(
    params: dict[str, Any], config: DecoderConfig, dtype: Any, h_BxCxD: jax.Array
) -> jax.Array:
    """Float32 logits [B, C, V] of final-norm hidden states [B, C, D] (the lm_head alone).

    Args:
        params: parameter dict.
        config: architecture (tied embeddings use `embed_tokens.T`).
        dtype: compute dtype.
        h_BxCxD: hidden states from `hidden_states` (any gathered subset of positions).

    Returns:
        float32 [B, C, vocab_size] (example: see `hidden_states`).
    """
    b, c, d = h_BxCxD.shape
    head_DxV = (
        params["embed_tokens"].T if config.tie_word_embeddings else params["lm_head"]
    ).astype(dtype)
    logits = jnp.dot(h_BxCxD.reshape(b * c, d), head_DxV, preferred_element_type=jnp.float32)
    return logits.reshape(b, c, -1)


def prefill(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    cache_length: int,
) -> Caches:
    """KV caches of prompts [B, P] in slots [0, P) of a cache of `cache_length` slots.

    No logits are computed. Token t of a row gets RoPE position (number of real tokens before
    it), so RIGHT-padded prompts keep slot == position; padding slots hold junk that callers
    exclude with their `kv_valid` mask (e.g. in `forward_with_cache`, writing new tokens at
    slot P onwards).

    Args:
        params: parameter dict.
        config: architecture.
        dtype: compute dtype (and cache dtype).
        input_ids: [B, P] prompt ids.
        attention_mask: [B, P], 1 for real tokens.
        cache_length: total cache slots T >= P.

    Returns:
        (k, v), each [num_layers, B, num_kv_heads, cache_length, head_dim] of dtype `dtype`.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> ids = jnp.ones((2, 7), jnp.int32)
        >>> k, v = prefill(model.params(), model.config, jnp.float32, ids, ids, 10)
        >>> k.shape
        (3, 2, 2, 10, 16)
    """
    b, n = input_ids.shape
    if cache_length < n:
        raise ValueError(f"cache_length={cache_length} < prompt length {n}")
    valid_BxP = attention_mask.astype(bool)
    kv_valid_BxT = jnp.pad(valid_BxP, ((0, 0), (0, cache_length - n)))
    h, rope_BxPxE, mask_BxPxT = preamble(
        params, config, dtype, input_ids, token_positions(valid_BxP), kv_valid_BxT, 0
    )
    shape = (config.num_layers, b, config.num_kv_heads, cache_length, config.head_dim)
    caches = tuple(constrain_batch(jnp.zeros(shape, dtype), axis=1) for _ in range(2))
    _, caches, _ = scan_layers(
        params["layers"], h, rope_BxPxE, mask_BxPxT, config, dtype, caches=caches
    )
    return caches


def forward_with_cache(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    kv_valid_BxT: jax.Array,
    caches: Caches,
    write_index: jax.Array | int,
) -> tuple[jax.Array, Caches]:
    """Forward of `input_ids` [B, n] written into cache slots [write_index, write_index + n).

    Args:
        params: parameter dict.
        config: architecture.
        dtype: compute dtype.
        input_ids: [B, n] new tokens.
        positions: [B, n] RoPE positions of the new tokens.
        kv_valid_BxT: bool [B, T], which cache slots hold real tokens (including the new ones).
        caches: (k, v), each [num_layers, B, kv_heads, T, head_dim].
        write_index: first cache slot of the new tokens (scalar).

    Returns:
        (float32 logits [B, n, V], updated caches).

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> p, ids = model.params(), jnp.ones((2, 7), jnp.int32)
        >>> caches = prefill(p, model.config, jnp.float32, ids, ids, 8)
        >>> valid = jnp.ones((2, 8), bool)
        >>> logits, caches = forward_with_cache(
        ...     p, model.config, jnp.float32, ids[:, :1], jnp.full((2, 1), 7), valid, caches, 7)
        >>> logits.shape
        (2, 1, 97)
    """
    h, rope_BxLxE, mask_BxLxT = preamble(
        params, config, dtype, input_ids, positions, kv_valid_BxT, write_index
    )
    h, caches, _ = scan_layers(
        params["layers"],
        h,
        rope_BxLxE,
        mask_BxLxT,
        config,
        dtype,
        caches=caches,
        write_index=write_index,
    )
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps, dtype)
    return head_logits(params, config, dtype, h), caches
