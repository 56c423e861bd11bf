"""Flax NNX decoder for the Llama 3.x and Qwen2 families: stacked layers run under `lax.scan`.

Layout (L = layers, D = hidden, Q = heads * head_dim, K = kv_heads * head_dim, F = mlp):
`embed_tokens` (V, D); `layers.{attn_norm (L, D), q_proj (L, D, Q), k_proj (L, D, K),
v_proj (L, D, K), [q_bias (L, Q), k_bias (L, K), v_bias (L, K)], o_proj (L, Q, D),
mlp_norm (L, D), gate_proj (L, D, F), up_proj (L, D, F), down_proj (L, F, D)}`;
`final_norm` (D,); `lm_head` (D, V) unless embeddings are tied.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, PartitionSpec

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.sharding import fit_spec, param_shardings

# Mesh axes per parameter dimension (the stacked layer axis is never sharded).
PARAM_AXES: dict[str, tuple[str | None, ...]] = {
    "embed_tokens": ("tensor", "fsdp"),
    "attn_norm": (None, None),
    "q_proj": (None, "fsdp", "tensor"),
    "k_proj": (None, "fsdp", "tensor"),
    "v_proj": (None, "fsdp", "tensor"),
    "q_bias": (None, "tensor"),
    "k_bias": (None, "tensor"),
    "v_bias": (None, "tensor"),
    "o_proj": (None, "tensor", "fsdp"),
    "mlp_norm": (None, None),
    "gate_proj": (None, "fsdp", "tensor"),
    "up_proj": (None, "fsdp", "tensor"),
    "down_proj": (None, "tensor", "fsdp"),
    "final_norm": (None,),
    "lm_head": ("fsdp", "tensor"),
}
NEG_INF = -1e30  # finite mask value: fully padded rows give a uniform softmax, never NaN


def layer_param_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked per-layer parameters, by our name."""
    n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {
        "attn_norm": (n, d),
        "q_proj": (n, d, q),
        "k_proj": (n, d, kv),
        "v_proj": (n, d, kv),
        "o_proj": (n, q, d),
        "mlp_norm": (n, d),
        "gate_proj": (n, d, f),
        "up_proj": (n, d, f),
        "down_proj": (n, f, d),
    }
    if config.attention_bias:
        shapes.update(q_bias=(n, q), k_bias=(n, kv), v_bias=(n, kv))
    return shapes


def _ambient_mesh() -> jax.sharding.Mesh | None:
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    try:  # only outside of a trace (under jit / eval_shape the caller places the values)
        concrete = jax.sharding.get_mesh()
    except ValueError:
        return None
    return None if concrete.empty else concrete


def _make_param(name: str, value: jax.Array) -> nnx.Param:
    # The nominal mesh axes are recorded (mesh-independent, so states built with and without a
    # mesh have the same tree); `param_shardings` drops the axes a given mesh cannot divide.
    return nnx.Param(value, out_sharding=PARAM_AXES[name], eager_sharding=False)


class _Layers(nnx.Module):
    """All decoder blocks' parameters, stacked on a leading layer axis."""

    def __init__(self, config: DecoderConfig, param_dtype: Any, rngs: nnx.Rngs):
        for name, shape in layer_param_shapes(config).items():
            if name.endswith("_norm"):
                value = jnp.ones(shape, param_dtype)
            elif name.endswith("_bias"):
                value = jnp.zeros(shape, param_dtype)
            else:
                value = 0.02 * jax.random.normal(rngs.params(), shape, param_dtype)
            setattr(self, name, _make_param(name, value))


class Decoder(nnx.Module):
    """Llama / Qwen2 causal decoder returning float32 logits.

    Args:
        config: the architecture.
        dtype: compute dtype of matmuls and activations (norms and softmax run in float32).
        param_dtype: storage dtype of the parameters.
        rngs: random streams (`rngs.params()` draws the N(0, 0.02) initialisation).
        scan_unroll: layers per iteration of the layer `lax.scan` (1 = a loop, compiled once;
            0 = every layer unrolled: faster for a few small layers, where the loop's stacked
            activations and slicing cost more than the layers, and slower to compile for deep
            models). A plain attribute: ``model.scan_unroll = 0`` works after construction.
        attention_chunk: query rows per block of the causal attention (-1 = auto, see
            `attention_chunk_rows`; 0 = one L x L block). Each block of queries attends only
            to the keys up to its last row, so the masked upper triangle is (mostly) never
            computed: same result, ~2x fewer attention FLOPs and a smaller working set
            (`benchmarks/attention.py`: forward + backward of SmolLM2-shaped layers at 2048
            tokens 1.5x faster on a 2-core CPU). A plain attribute too.

    Example:
        >>> model = Decoder(tiny_config(), rngs=nnx.Rngs(0))  # doctest: +SKIP
        >>> logits = model(jnp.ones((2, 7), jnp.int32))  # [2, 7, 97] float32
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        dtype: Any = jnp.bfloat16,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
        scan_unroll: int = 1,
        attention_chunk: int = -1,
    ):
        self.config = config
        self.dtype = dtype
        self.scan_unroll = check_scan_unroll(scan_unroll)
        self.attention_chunk = check_attention_chunk(attention_chunk)
        mesh = _ambient_mesh()
        d, v = config.hidden_size, config.vocab_size
        embed = 0.02 * jax.random.normal(rngs.params(), (v, d), param_dtype)
        self.embed_tokens = _make_param("embed_tokens", embed)
        self.layers = _Layers(config, param_dtype, rngs)
        self.final_norm = _make_param("final_norm", jnp.ones((d,), param_dtype))
        if not config.tie_word_embeddings:
            head = 0.02 * jax.random.normal(rngs.params(), (d, v), param_dtype)
            self.lm_head = _make_param("lm_head", head)
        if mesh is not None and not isinstance(embed, jax.core.Tracer):
            state = nnx.state(self, nnx.Param)
            nnx.update(self, jax.device_put(state, param_shardings(state, mesh)))

    def params(self) -> dict[str, Any]:
        """The parameters as a plain dict of arrays (`layers` is a dict of stacked arrays)."""
        layers = {name: getattr(self.layers, name)[...] for name in layer_param_shapes(self.config)}
        out = {
            "embed_tokens": self.embed_tokens[...],
            "layers": layers,
            "final_norm": self.final_norm[...],
        }
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        *,
        frozen_layers: int = 0,
    ) -> jax.Array:
        """Logits [B, L, V] float32 for token ids [B, L].

        Args:
            input_ids: int token ids, shape [B, L].
            attention_mask: 1 for real tokens, 0 for padding (left or right); None = all real.
            frozen_layers: run the first n layers under `stop_gradient` (no weight grads there).

        Returns:
            float32 logits of shape [B, L, V].
        """
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if not 0 <= frozen_layers <= self.config.num_layers:
            raise ValueError(f"frozen_layers={frozen_layers} outside [0, {self.config.num_layers}]")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        elif attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids {input_ids.shape}"
            )
        unroll = check_scan_unroll(self.scan_unroll)
        chunk = check_attention_chunk(self.attention_chunk)

        def run(p: dict[str, Any], i: jax.Array, m: jax.Array) -> jax.Array:
            return forward(
                p,
                self.config,
                self.dtype,
                i,
                m,
                frozen_layers=frozen_layers,
                scan_unroll=unroll,
                attention_chunk=chunk,
            )

        out_shape = (*input_ids.shape, self.config.vocab_size)
        return with_auto_axes(run, out_shape, input_ids)(self.params(), input_ids, attention_mask)


def _check_int(name: str, value: Any, minimum: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum} ({meaning}), got {value!r}")
    return int(value)


def check_scan_unroll(value: Any) -> int:
    """`value` if it is a valid `scan_unroll` (an int >= 0), else a ValueError naming it."""
    return _check_int("scan_unroll", value, 0, "0 = unroll every layer")


def check_attention_chunk(value: Any) -> int:
    """`value` if it is a valid `attention_chunk` (an int >= -1), else a ValueError naming it."""
    return _check_int("attention_chunk", value, -1, "-1 = auto, 0 = one block")


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


def with_auto_axes(fn: Any, out_shape: tuple[int, ...], batch_like: Any = None) -> Any:
    """Runs `fn` with GSPMD propagation when the ambient mesh has Explicit axes.

    The decoder's matmuls contract sharded dimensions, which Explicit-axis typing refuses
    without per-op output shardings; inside `auto_axes` XLA chooses them. The result's leading
    (batch) axis is sharded like `batch_like`'s leading axis when that one is sharded (a
    training batch split over `data` and `fsdp` gives logits split the same way, so the loss's
    gather by token id needs no collective), else over `data` (replicated where `data` does not
    divide the batch).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AxisType.Explicit not in mesh.axis_types:
        return fn
    spec = fit_spec(("data",) + (None,) * (len(out_shape) - 1), out_shape, dict(mesh.shape))
    if batch_like is not None:
        batch_spec = getattr(jax.typeof(batch_like).sharding, "spec", None)
        if batch_spec and batch_spec[0] is not None:
            spec = PartitionSpec(batch_spec[0], *([None] * (len(out_shape) - 1)))
    return jax.sharding.auto_axes(fn, out_sharding=spec)


def init_random(
    config: DecoderConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.bfloat16,
    param_dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    scan_unroll: int = 1,
    attention_chunk: int = -1,
) -> Decoder:
    """A randomly initialised decoder (HF-like: weights N(0, 0.02), norms 1, biases 0).

    Args:
        config: the architecture.
        seed: PRNG seed.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        mesh: when given, parameters are created directly with their shardings on it.
        scan_unroll: the layer scan's unroll (see `Decoder`).
        attention_chunk: causal attention block rows (see `Decoder`).

    Returns:
        A `Decoder`.

    Example:
        >>> model = init_random(tiny_config(), seed=0, dtype=jnp.float32)  # doctest: +SKIP
    """

    def make() -> Decoder:
        return Decoder(
            config,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(seed),
            scan_unroll=scan_unroll,
            attention_chunk=attention_chunk,
        )

    if mesh is None:
        return make()
    with jax.set_mesh(mesh):
        graphdef, abs_state = nnx.split(nnx.eval_shape(make))
        shardings = param_shardings(abs_state, mesh)
        state = jax.jit(lambda: nnx.split(make())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------
# Pure functions on the parameter dict (shared by the module call and the KV-cache generation).
# ---------------------------------------------------------------------------------------------


def rope_inv_freq(config: DecoderConfig) -> np.ndarray:
    """Inverse RoPE frequencies [head_dim / 2] float32, with Llama-3 / linear scaling."""
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


def _rope(x_BxHxLxE: jax.Array, cos_BxLxE: jax.Array, sin_BxLxE: jax.Array) -> jax.Array:
    half = x_BxHxLxE.shape[-1] // 2
    x = x_BxHxLxE.astype(jnp.float32)
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = x * cos_BxLxE[:, None] + rotated * sin_BxLxE[:, None]
    return out.astype(x_BxHxLxE.dtype)


def _rms_norm(x: jax.Array, w: jax.Array, eps: float, dtype: Any) -> jax.Array:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return x32.astype(dtype) * w.astype(dtype)


def _linear(x_NxI: jax.Array, w_IxO: jax.Array, dtype: Any) -> jax.Array:
    return jnp.dot(x_NxI, w_IxO.astype(dtype), preferred_element_type=jnp.float32).astype(dtype)


def _block(
    p: dict[str, jax.Array],
    h_BxLxD: jax.Array,
    cos_BxLxE: jax.Array,
    sin_BxLxE: jax.Array,
    mask_BxLxT: jax.Array,
    config: DecoderConfig,
    dtype: Any,
    cache: tuple[jax.Array, jax.Array] | None,
    write_index: jax.Array | int,
    taps: dict[str, jax.Array] | None = None,
    chunk: int = 0,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """One decoder block. With a cache (k, v each [B, Hkv, T, E]) the new keys are written
    at `write_index` and attention runs over the whole cache. A `taps` dict (capture path
    only, `ogpsa_jax.models.capture`) receives the [B*L, d_in] inputs of the linear layers
    under the keys attn_in, o_in, mlp_in, down_in; the normal forward passes None. Without a
    cache, `chunk` > 0 runs the attention in blocks of that many query rows, each against the
    keys up to its last row: exact only for a causal `mask_BxLxT` (the callers' masks)."""
    b, n, d = h_BxLxD.shape
    hq, hk, e = config.num_heads, config.num_kv_heads, config.head_dim
    x_NxD = _rms_norm(h_BxLxD, p["attn_norm"], config.rms_norm_eps, dtype).reshape(b * n, d)
    if taps is not None:
        taps["attn_in"] = x_NxD
    q, k, v = (_linear(x_NxD, p[f"{s}_proj"], dtype) for s in "qkv")
    if config.attention_bias:
        q, k, v = (t + p[f"{s}_bias"].astype(dtype) for t, s in zip((q, k, v), "qkv", strict=True))
    q_BxHxLxE = _rope(q.reshape(b, n, hq, e).transpose(0, 2, 1, 3), cos_BxLxE, sin_BxLxE)
    k_BxKxLxE = _rope(k.reshape(b, n, hk, e).transpose(0, 2, 1, 3), cos_BxLxE, sin_BxLxE)
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
                _attend(
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
        o_BxKxGxLxE = _attend(q_BxKxGxLxE, k_BxKxTxE, v_BxKxTxE, mask_BxLxT, dtype)
    o_NxQ = o_BxKxGxLxE.reshape(b, hq, n, e).transpose(0, 2, 1, 3).reshape(b * n, hq * e)
    if taps is not None:
        taps["o_in"] = o_NxQ
    h_BxLxD = h_BxLxD + _linear(o_NxQ, p["o_proj"], dtype).reshape(b, n, d)
    x_NxD = _rms_norm(h_BxLxD, p["mlp_norm"], config.rms_norm_eps, dtype).reshape(b * n, d)
    gate, up = _linear(x_NxD, p["gate_proj"], dtype), _linear(x_NxD, p["up_proj"], dtype)
    act_NxF = jax.nn.silu(gate) * up
    if taps is not None:
        taps.update(mlp_in=x_NxD, down_in=act_NxF)
    mlp_NxD = _linear(act_NxF, p["down_proj"], dtype)
    return h_BxLxD + mlp_NxD.reshape(b, n, d), cache


def _attend(
    q_BxKxGxLxE: jax.Array,
    k_BxKxTxE: jax.Array,
    v_BxKxTxE: jax.Array,
    mask_BxLxT: jax.Array,
    dtype: Any,
) -> jax.Array:
    """Grouped-query softmax attention (scores and softmax in float32), output in `dtype`."""
    s_BxKxGxLxT = jnp.einsum(
        "bkgle,bkte->bkglt", q_BxKxGxLxE, k_BxKxTxE, preferred_element_type=jnp.float32
    ) * (1.0 / math.sqrt(q_BxKxGxLxE.shape[-1]))
    s_BxKxGxLxT = jnp.where(mask_BxLxT[:, None, None], s_BxKxGxLxT, NEG_INF)
    probs = jax.nn.softmax(s_BxKxGxLxT, axis=-1).astype(dtype)
    return jnp.einsum(
        "bkglt,bkte->bkgle", probs, v_BxKxTxE, preferred_element_type=jnp.float32
    ).astype(dtype)


def _scan_layers(
    layer_params, h, cos, sin, mask, config, dtype, caches=None, write_index=0, unroll=1, chunk=0
):
    def body(h, xs):
        p, cache = xs
        h, cache = _block(p, h, cos, sin, mask, config, dtype, cache, write_index, chunk=chunk)
        return h, cache

    return jax.lax.scan(body, h, (layer_params, caches), unroll=True if unroll == 0 else unroll)


def rope_tables(config: DecoderConfig, positions_BxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables [B, L, head_dim] float32 for integer positions."""
    inv = jnp.asarray(rope_inv_freq(config))
    freqs = positions_BxL.astype(jnp.float32)[..., None] * inv
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _logits(params: dict[str, Any], h_BxLxD: jax.Array, config: DecoderConfig, dtype: Any):
    h = _rms_norm(h_BxLxD, params["final_norm"], config.rms_norm_eps, dtype)
    return head_logits(params, config, dtype, h)


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
) -> jax.Array:
    """Full-sequence forward on a parameter dict (see `Decoder.params`); float32 logits.

    `frozen_layers` bottom layers run under `stop_gradient`; `scan_unroll` and
    `attention_chunk` are the layer scan's unroll and the causal attention's block rows (see
    `Decoder`)."""
    valid_BxL = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=-1) - 1, 0)
    cos, sin = rope_tables(config, positions)
    n = input_ids.shape[1]
    causal_LxL = jnp.tril(jnp.ones((n, n), bool))
    mask_BxLxL = causal_LxL[None] & valid_BxL[:, None, :]
    h = params["embed_tokens"].astype(dtype)[input_ids]
    layers = params["layers"]
    run = dict(unroll=scan_unroll, chunk=attention_chunk_rows(n, attention_chunk))
    if frozen_layers > 0:
        frozen = jax.tree.map(lambda a: a[:frozen_layers], layers)
        layers = jax.tree.map(lambda a: a[frozen_layers:], layers)
        h, _ = _scan_layers(frozen, h, cos, sin, mask_BxLxL, config, dtype, **run)
        h = jax.lax.stop_gradient(h)
    if frozen_layers < config.num_layers:
        h, _ = _scan_layers(layers, h, cos, sin, mask_BxLxL, config, dtype, **run)
    return _logits(params, h, config, dtype)


def forward_with_cache(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    positions: jax.Array,
    kv_valid_BxT: jax.Array,
    caches: tuple[jax.Array, jax.Array],
    write_index: jax.Array | int,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
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
    """
    n, t = input_ids.shape[1], kv_valid_BxT.shape[1]
    cos, sin = rope_tables(config, positions)
    slots = write_index + jnp.arange(n)
    mask = (jnp.arange(t)[None, :] <= slots[:, None])[None] & kv_valid_BxT[:, None, :]
    h = params["embed_tokens"].astype(dtype)[input_ids]
    h, caches = _scan_layers(
        params["layers"], h, cos, sin, mask, config, dtype, caches, write_index
    )
    return _logits(params, h, config, dtype), caches


# ---------------------------------------------------------------------------------------------
# Scoring entry points: hidden states without the lm_head, the head on a gathered slice, and a
# prefill that only fills a KV cache (used by `ogpsa_jax.eval.scoring`).
# ---------------------------------------------------------------------------------------------


def hidden_states(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    attention_chunk: int = -1,
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

    Returns:
        [B, L, hidden_size] array of dtype `dtype`.

    Example:
        >>> h = hidden_states(params, model.config, jnp.float32, ids, mask)  # doctest: +SKIP
    """
    valid_BxL = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=-1) - 1, 0)
    cos, sin = rope_tables(config, positions)
    n = input_ids.shape[1]
    mask_BxLxL = jnp.tril(jnp.ones((n, n), bool))[None] & valid_BxL[:, None, :]
    h = params["embed_tokens"].astype(dtype)[input_ids]
    chunk = attention_chunk_rows(n, attention_chunk)
    h, _ = _scan_layers(params["layers"], h, cos, sin, mask_BxLxL, config, dtype, chunk=chunk)
    return _rms_norm(h, params["final_norm"], config.rms_norm_eps, dtype)


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
        float32 [B, C, vocab_size].

    Example:
        >>> logits = head_logits(params, config, jnp.float32, h[:, -1:])  # doctest: +SKIP
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
) -> tuple[jax.Array, jax.Array]:
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
        >>> k, v = prefill(params, config, jnp.float32, ids, mask, 40)  # doctest: +SKIP
    """
    b, n = input_ids.shape
    if cache_length < n:
        raise ValueError(f"cache_length={cache_length} < prompt length {n}")
    valid_BxP = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid_BxP.astype(jnp.int32), axis=-1) - 1, 0)
    cos, sin = rope_tables(config, positions)
    shape = (config.num_layers, b, config.num_kv_heads, cache_length, config.head_dim)
    caches = (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    kv_valid_BxT = jnp.pad(valid_BxP, ((0, 0), (0, cache_length - n)))
    mask_BxPxT = (jnp.arange(cache_length)[None, :] <= jnp.arange(n)[:, None])[None] & (
        kv_valid_BxT[:, None, :]
    )
    h = params["embed_tokens"].astype(dtype)[input_ids]
    _, caches = _scan_layers(params["layers"], h, cos, sin, mask_BxPxT, config, dtype, caches, 0)
    return caches
