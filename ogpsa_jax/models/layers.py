"""The decoder block's math as pure functions: RoPE, RMSNorm, grouped-query attention, SwiGLU.

Shapes: B = batch, L = new tokens, T = key slots (L without a cache), D = hidden,
H = query heads, K = kv heads, G = H / K, E = head_dim, F = mlp width, N = B * L rows.
`block` runs one layer on that layer's slice of the stacked parameters (see
`ogpsa_jax.models.decoder` for the layout and the entry points that scan it over the layers).

Example:
    >>> from ogpsa_jax.models import tiny_config
    >>> cos, sin = rope_tables(tiny_config(), jnp.arange(5)[None])
    >>> cos.shape
    (1, 5, 16)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from ogpsa_jax.models.config import DecoderConfig

if TYPE_CHECKING:
    from ogpsa_jax.models.lora import LoRAWeights

NEG_INF = -1e30  # finite mask value: fully padded rows give a uniform softmax, never NaN
# The block's intermediates returned with ``capture=True``: the [N, d_in] inputs of its linear
# layers (the rows ``x`` of ``y = x @ W``).
BLOCK_TAPS = ("attn_in", "o_in", "mlp_in", "down_in")
# Rematerialisation of the layer scan's block in the backward pass (`remat_policy`).
REMAT_CHOICES = ("none", "block", "dots")


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim / 2] float32, with Llama-3 / linear scaling.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> rope_inv_freq(tiny_config()).shape
        (8,)
    """
    dim = config.head_dim
    inv = 1.0 / (
        config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim)
    )
    inv = inv.astype(np.float32)
    rs = config.rope_scaling
    if rs is None:
        return inv
    kind = rs.get("rope_type", rs.get("type"))
    factor = float(rs["factor"])
    if kind == "linear":
        return (inv / factor).astype(np.float32)
    low, high = float(rs["low_freq_factor"]), float(rs["high_freq_factor"])
    old_len = float(rs.get("original_max_position_embeddings", config.max_position_embeddings))
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(config: DecoderConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, L, head_dim] float32 for integer positions (see module example)."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions_BxL.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def rope(x_BxHxLxE: jax.Array, cos_BxLxE: jax.Array, sin_BxLxE: jax.Array) -> jax.Array:
    """Rotary embedding in Hugging Face's rotate-half layout, computed in float32.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> x = jnp.ones((1, 2, 5, 16))
        >>> bool(jnp.allclose(rope(x, *rope_tables(tiny_config(), jnp.zeros((1, 5)))), x))
        True
    """
    half = x_BxHxLxE.shape[-1] // 2
    x = x_BxHxLxE.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxLxE[:, None] + rotated * sin_BxLxE[:, None]
    return out.astype(x_BxHxLxE.dtype)


def rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype: Any) -> jax.Array:
    """RMSNorm over the last axis (statistics in float32), scaled by `w`, in `dtype`.

    Example:
        >>> rms_norm(jnp.array([[2.0, -2.0]]), jnp.full(2, 0.5), 0.0, jnp.float32)
        Array([[ 0.5, -0.5]], dtype=float32)
    """
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(dtype) * w.astype(dtype)


def linear(
    x_NxI: jax.Array, w_IxO: jax.Array, dtype: Any, lora: LoRAWeights | None = None
) -> jax.Array:
    """``x @ w`` in `dtype` with float32 accumulation, plus a LoRA adapter's update if given.

    With `lora` (A [I, r], B [r, O]) the float32 result gains ``scaling * (x @ A) @ B`` (``x @ A``
    rounded to `dtype`) before the cast; without it the program is the plain matmul.

    Example:
        >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.float32).shape
        (2, 4)
    """
    y_NxO = jnp.dot(x_NxI, w_IxO.astype(dtype), preferred_element_type=jnp.float32)
    if lora is not None:
        t_NxR = jnp.dot(x_NxI, lora.a.astype(dtype), preferred_element_type=jnp.float32)
        t_NxR = t_NxR.astype(dtype)
        y_NxO = y_NxO + lora.scaling * jnp.dot(
            t_NxR, lora.b.astype(dtype), preferred_element_type=jnp.float32
        )
    return y_NxO.astype(dtype)


def attend(
    q_BxKxGxLxE: jax.Array,
    k_BxKxTxE: jax.Array,
    v_BxKxTxE: jax.Array,
    mask_BxLxT: jax.Array,
    dtype: Any,
) -> jax.Array:
    """Grouped-query softmax attention (scores and softmax in float32), output in `dtype`.

    Example:
        >>> q, k = jnp.ones((1, 1, 2, 3, 4)), jnp.ones((1, 1, 3, 4))
        >>> attend(q, k, k, jnp.tril(jnp.ones((1, 3, 3), bool)), jnp.float32).shape
        (1, 1, 2, 3, 4)
    """
    s_BxKxGxLxT = jnp.einsum(
        "bkgle,bkte->bkglt", q_BxKxGxLxE, k_BxKxTxE, preferred_element_type=jnp.float32
    ) * (1.0 / math.sqrt(q_BxKxGxLxE.shape[-1]))
    s_BxKxGxLxT = jnp.where(mask_BxLxT[:, None, None], s_BxKxGxLxT, NEG_INF)
    probs = jax.nn.softmax(s_BxKxGxLxT, axis=-1).astype(dtype)
    return jnp.einsum(
        "bkglt,bkte->bkgle", probs, v_BxKxTxE, preferred_element_type=jnp.float32
    ).astype(dtype)


def attention_chunk_rows(length: int, setting: int = -1) -> int:
    """Query rows per causal attention block for sequences of `length` (0 = one block).

    Auto (`setting` -1): blocks of 64 rows, or of length / 16 rows for sequences longer than
    1024 tokens (at most 16 blocks: the blocks are unrolled, so their number sets the compile
    time). Measured with `benchmarks/attention.py` (forward + backward of SmolLM2-shaped
    layers, 2-core CPU): over one block, 1.03x at 256 tokens, 1.27x at 1024, 1.50x at 2048;
    blocks of 64 or 128 rows were within 20 % of each other.

    Example:
        >>> attention_chunk_rows(256), attention_chunk_rows(2048), attention_chunk_rows(48)
        (64, 128, 0)
    """
    rows = max(64, -(-length // 16)) if setting < 0 else setting
    return 0 if rows >= length else rows


def remat_policy(remat: str) -> Any:
    """The `jax.checkpoint` policy of a `remat` setting (None for ``"none"``: no remat).

    ``"block"`` keeps only each block's input for the backward pass and recomputes the block
    (least memory: one [B, L, D] residual per layer; about one more forward pass of compute);
    ``"dots"`` also keeps the outputs of the block's linear layers (matmuls without batch
    dimensions: `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`) and recomputes the
    attention and the element-wise work in between.

    Example:
        >>> remat_policy("none") is None, remat_policy("block") is not None
        (True, True)
    """
    if remat not in REMAT_CHOICES:
        raise ValueError(f"remat must be one of {list(REMAT_CHOICES)}, got {remat!r}")
    policies = {
        "none": None,
        "block": jax.checkpoint_policies.nothing_saveable,
        "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }
    return policies[remat]


def block(
    p: dict[str, jax.Array],
    h_BxLxD: jax.Array,
    rope_BxLxE: tuple[jax.Array, jax.Array],
    mask_BxLxT: jax.Array,
    config: DecoderConfig,
    dtype: Any,
    *,
    cache: tuple[jax.Array, jax.Array] | None = None,
    write_index: jax.Array | int = 0,
    chunk: int = 0,
    capture: bool = False,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, dict[str, jax.Array]]:
    """One pre-norm decoder block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

    Args:
        p: this layer's parameters (`ogpsa_jax.models.decoder.layer_param_shapes` names,
            without the layer axis; `<w>_lora` adds a LoRA adapter to projection `<w>`).
        h_BxLxD: the residual stream.
        rope_BxLxE: the (cos, sin) tables of `rope_tables` for the L new tokens.
        mask_BxLxT: True where a query may attend a key slot.
        config: the architecture.
        dtype: compute dtype.
        cache: (k, v), each [B, kv_heads, T, head_dim]: the new keys and values are written at
            slot `write_index` and attention runs over the whole cache; None = attend the L
            new tokens only.
        write_index: first cache slot of the new tokens.
        chunk: without a cache, > 0 runs the attention in blocks of that many query rows,
            each against the keys up to its last row: exact for a causal `mask_BxLxT` only.
        capture: also return the inputs of the linear layers (`BLOCK_TAPS`). A trace-time
            switch: with False the traced program has no extra outputs.

    Returns:
        (new residual stream, updated cache or None, taps): taps maps each `BLOCK_TAPS` name
        to its [B * L, d_in] rows in `dtype` when `capture`, else is empty.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> cfg = tiny_config()
        >>> layers = init_random(cfg, dtype=jnp.float32).params()["layers"]
        >>> p = jax.tree.map(lambda a: a[0], layers)  # the first layer
        >>> h, mask = jnp.ones((1, 5, 64)), jnp.tril(jnp.ones((1, 5, 5), bool))
        >>> rope_BxLxE = rope_tables(cfg, jnp.arange(5)[None])
        >>> h, _, taps = block(p, h, rope_BxLxE, mask, cfg, jnp.float32, capture=True)
        >>> h.shape, taps["down_in"].shape
        ((1, 5, 64), (5, 176))
    """
    b, n, d = h_BxLxD.shape
    hq, hk, e = config.num_heads, config.num_kv_heads, config.head_dim
    cos_BxLxE, sin_BxLxE = rope_BxLxE
    taps: dict[str, jax.Array] = {}
    x_NxD = rms_norm(h_BxLxD, p["attn_norm"], config.rms_norm_eps, dtype).reshape(b * n, d)
    q, k, v = (linear(x_NxD, p[f"{s}_proj"], dtype, p.get(f"{s}_proj_lora")) for s in "qkv")
    if config.attention_bias:
        q, k, v = (t + p[f"{s}_bias"].astype(dtype) for t, s in zip((q, k, v), "qkv", strict=True))
    q_BxHxLxE = rope(q.reshape(b, n, hq, e).transpose(0, 2, 1, 3), cos_BxLxE, sin_BxLxE)
    k_BxKxLxE = rope(k.reshape(b, n, hk, e).transpose(0, 2, 1, 3), cos_BxLxE, sin_BxLxE)
    v_BxKxLxE = v.reshape(b, n, hk, e).transpose(0, 2, 1, 3)
    if cache is not None:
        ck, cv = cache
        start = (0, 0, write_index, 0)
        k_BxKxLxE = jax.lax.dynamic_update_slice(ck, k_BxKxLxE.astype(ck.dtype), start)
        v_BxKxLxE = jax.lax.dynamic_update_slice(cv, v_BxKxLxE.astype(cv.dtype), start)
        cache = (k_BxKxLxE, v_BxKxLxE)
    q_BxKxGxLxE = q_BxHxLxE.reshape(b, hk, hq // hk, n, e)
    k_BxKxTxE, v_BxKxTxE = k_BxKxLxE.astype(dtype), v_BxKxLxE.astype(dtype)
    if cache is None and 0 < chunk < n:
        o_BxKxGxLxE = jnp.concatenate(
            [
                attend(
                    q_BxKxGxLxE[:, :, :, i : i + chunk],
                    k_BxKxTxE[:, :, : i + chunk],
                    v_BxKxTxE[:, :, : i + chunk],
                    mask_BxLxT[:, i : i + chunk, : i + chunk],
                    dtype,
                )
                for i in range(0, n, chunk)
            ],
            axis=3,
        )
    else:
        o_BxKxGxLxE = attend(q_BxKxGxLxE, k_BxKxTxE, v_BxKxTxE, mask_BxLxT, dtype)
    o_NxQ = o_BxKxGxLxE.reshape(b, hq, n, e).transpose(0, 2, 1, 3).reshape(b * n, hq * e)
    h_BxLxD = h_BxLxD + linear(o_NxQ, p["o_proj"], dtype, p.get("o_proj_lora")).reshape(b, n, d)
    m_NxD = rms_norm(h_BxLxD, p["mlp_norm"], config.rms_norm_eps, dtype).reshape(b * n, d)
    gate = linear(m_NxD, p["gate_proj"], dtype, p.get("gate_proj_lora"))
    up = linear(m_NxD, p["up_proj"], dtype, p.get("up_proj_lora"))
    act_NxF = jax.nn.silu(gate) * up
    mlp_NxD = linear(act_NxF, p["down_proj"], dtype, p.get("down_proj_lora"))
    if capture:
        taps = dict(attn_in=x_NxD, o_in=o_NxQ, mlp_in=m_NxD, down_in=act_NxF)
    return h_BxLxD + mlp_NxD.reshape(b, n, d), cache, taps


__all__ = [
    "BLOCK_TAPS",
    "NEG_INF",
    "REMAT_CHOICES",
    "attend",
    "attention_chunk_rows",
    "block",
    "linear",
    "remat_policy",
    "rms_norm",
    "rope",
    "rope_inv_freq",
    "rope_tables",
]
