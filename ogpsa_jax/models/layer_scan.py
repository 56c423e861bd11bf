"""The machinery every entry point of `ogpsa_jax.models.functional` is built from.

`preamble` embeds the new tokens and builds their RoPE tables and the causal mask over key
slots; `scan_layers` runs `ogpsa_jax.models.layers.block` over the stacked layers in one
`lax.scan` (optionally writing KV caches, rematerialising each block, or tapping its inputs).

Example:
    >>> from ogpsa_jax.models import init_random, tiny_config
    >>> model = init_random(tiny_config(), dtype=jnp.float32)
    >>> p, ids = model.params(), jnp.ones((2, 7), jnp.int32)
    >>> pos, valid = jnp.broadcast_to(jnp.arange(7), (2, 7)), jnp.ones((2, 7), bool)
    >>> h, rope, mask = preamble(p, model.config, jnp.float32, ids, pos, valid, 0)
    >>> out, caches, _ = scan_layers(p["layers"], h, rope, mask, model.config, jnp.float32)
    >>> out.shape, caches
    ((2, 7, 64), None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.layers import block, remat_policy, rope_tables
from ogpsa_jax.models.sharding import constrain_batch

Caches = tuple[jax.Array, jax.Array]  # (k, v), each [num_layers, B, kv_heads, T, head_dim]


def preamble(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids_BxL: jax.Array,
    positions_BxL: jax.Array,
    kv_valid_BxT: jax.Array,
    first_slot: jax.Array | int,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array], jax.Array]:
    """The preamble of every entry point: embedded tokens, RoPE tables, and the mask letting
    new token i (at key slot first_slot + i) see the real slots up to its own.

    Args:
        params: parameter dict (see `Decoder.params`).
        config: architecture.
        dtype: compute dtype.
        input_ids_BxL: [B, L] new token ids.
        positions_BxL: [B, L] their RoPE positions.
        kv_valid_BxT: bool [B, T], which key slots hold real tokens.
        first_slot: key slot of the first new token (0 for whole sequences).

    Returns:
        (embedded tokens [B, L, D] in ``dtype``, RoPE (cos, sin) tables, bool mask [B, L, T]).
    """
    n, t = input_ids_BxL.shape[1], kv_valid_BxT.shape[1]
    slots_L = first_slot + jnp.arange(n)
    mask_BxLxT = (slots_L[:, None] >= jnp.arange(t)[None, :])[None] & kv_valid_BxT[:, None, :]
    # The lookup's output would take the table's split (hidden over fsdp); every activation
    # after it follows the batch split of the ids instead.
    h_BxLxD = constrain_batch(params["embed_tokens"].astype(dtype)[input_ids_BxL])
    return h_BxLxD, rope_tables(config, positions_BxL), mask_BxLxT


def scan_layers(
    layers: dict[str, jax.Array],
    h_BxLxD: jax.Array,
    rope_BxLxE: tuple[jax.Array, jax.Array],
    mask_BxLxT: jax.Array,
    config: DecoderConfig,
    dtype: Any,
    *,
    caches: Caches | None = None,
    write_index: jax.Array | int = 0,
    unroll: int = 1,
    chunk: int = 0,
    tap: Callable[[dict[str, jax.Array]], Any] | None = None,
    remat: str = "none",
) -> tuple[jax.Array, Caches | None, Any]:
    """`block` scanned over the stacked layers: (h, caches, tap's outputs stacked per layer);
    with `remat`, each block is rematerialised in the backward pass (`remat_policy`).

    Args:
        layers: the stacked layer parameters (leading axis: layers).
        h_BxLxD: the block input, e.g. from `preamble`.
        rope_BxLxE: RoPE (cos, sin) tables from `preamble`.
        mask_BxLxT: attention mask from `preamble`.
        config: architecture.
        dtype: compute dtype.
        caches: KV caches to write the new tokens into (None: no cache).
        write_index: first cache slot of the new tokens.
        unroll: the scan's unroll (0 = every layer unrolled).
        chunk: causal attention block rows (0 = one block).
        tap: called on each block's intermediates; its outputs are stacked per layer.
        remat: "none", "block" or "dots".

    Returns:
        (the last block's output [B, L, D], the updated caches or None, the tap's outputs
        stacked on a leading layer axis or None).
    """

    def body(h: jax.Array, xs: tuple) -> tuple[jax.Array, tuple]:
        p, cache = xs
        h, cache, taps = block(
            p,
            h,
            rope_BxLxE,
            mask_BxLxT,
            config,
            dtype,
            cache=cache,
            write_index=write_index,
            chunk=chunk,
            capture=tap is not None,
        )
        return h, (cache, None if tap is None else tap(taps))

    policy = remat_policy(remat)
    if remat != "none":  # the scan already keeps XLA from merging the recomputation away
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    h, (caches, tapped) = jax.lax.scan(
        body, h_BxLxD, (layers, caches), unroll=True if unroll == 0 else unroll
    )
    return h, caches, tapped
