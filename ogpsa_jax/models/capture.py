"""The inputs of every linear layer of the decoder, for GPM-style activation bases.

`capture_inputs` runs the decoder's full-sequence forward with the block's capture switch on
(`ogpsa_jax.models.functional.hidden_states_with_taps`: a trace-time flag, so the normal
forward's program is unchanged) and returns, per projected weight, the rows ``x`` that multiply
it (``y = x @ W``):

| weight | its input | captured shape |
| --- | --- | --- |
| q_proj, k_proj, v_proj | RMSNorm(h) before attention | (L, R, hidden_size) |
| o_proj | attention output (heads concatenated) | (L, R, num_heads * head_dim) |
| gate_proj, up_proj | RMSNorm(h) before the MLP | (L, R, hidden_size) |
| down_proj | silu(gate) * up | (L, R, intermediate_size) |
| lm_head (untied only) | final RMSNorm(h) | (R, hidden_size) |
| LoRA A of `<w>` (`<w>_lora/a`) | the input of `<w>` (the same array) | as `<w>`'s |
| LoRA B of `<w>` (`<w>_lora/b`) | not captured (``x @ A``): None | |

The rows are R token positions of the batch, sampled inside the scan (so a layer never keeps
more than R rows): with ``rows=None`` all B * T positions, padding rows zeroed; with ``rows=R``
R positions drawn without replacement among the real tokens, topped up with zeroed padding
rows when the batch has fewer real tokens. Zero rows carry no energy, so
`matrix_basis_from_activations` ignores them; ``row_valid`` says which rows are real.

Example:
    >>> from ogpsa_jax.models import init_random, tiny_config
    >>> model = init_random(tiny_config(), dtype=jnp.float32)
    >>> ids = jnp.ones((2, 7), jnp.int32)
    >>> cap = capture_inputs(model.params(), model.config, ids, rows=5)
    >>> cap.inputs["layers"]["o_proj"].shape  # (num_layers, rows, num_heads * head_dim)
    (3, 5, 64)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.decoder import layer_param_shapes
from ogpsa_jax.models.functional import head_logits, hidden_states_with_taps
from ogpsa_jax.models.lora import LoRAWeights
from ogpsa_jax.models.sharding import batch_axes

_F32 = jnp.float32
# Stacked layer weight -> the block tap (`ogpsa_jax.models.layers.BLOCK_TAPS`) holding its input.
SITES: dict[str, str] = {
    "q_proj": "attn_in",
    "k_proj": "attn_in",
    "v_proj": "attn_in",
    "o_proj": "o_in",
    "gate_proj": "mlp_in",
    "up_proj": "mlp_in",
    "down_proj": "down_in",
}


class CapturedInputs(NamedTuple):
    """What `capture_inputs` returns.

    Attributes:
        inputs: dict with the structure of `Decoder.params()`: ``layers/<w>`` for the seven
            projections -> float32 (num_layers, R, d_in); ``lm_head`` (untied) -> (R, D);
            ``None`` for embed_tokens, norms and biases. q/k/v (and gate/up) share one array.
            A LoRA adapter ``layers/<w>_lora`` gets a `LoRAWeights` whose ``a`` is ``<w>``'s
            input array and whose ``b`` is None.
        row_valid: bool (R,): True where the row is a real token (False: zeroed padding).
        logits: float32 [B, T, V] of the same forward when ``with_logits``, else None.
    """

    inputs: dict[str, Any]
    row_valid: jax.Array
    logits: jax.Array | None


def sample_rows(attention_mask: jax.Array, rows: int | None, key: jax.Array) -> tuple:
    """Flat token positions to capture and whether each is a real token.

    Args:
        attention_mask: [B, T], 1 for real tokens.
        rows: number of positions R (None or >= B*T: all positions, in order).
        key: PRNG key of the draw.

    Returns:
        (idx int32 [R], valid bool [R]); real tokens are drawn first (uniformly, without
        replacement), padding positions only when there are fewer than R real tokens.

    Example:
        >>> idx, ok = sample_rows(jnp.array([[1, 1, 0]]), 2, jax.random.key(0))
        >>> bool(ok.all())
        True
    """
    valid_N = attention_mask.reshape(-1).astype(bool)
    n = valid_N.shape[0]
    if rows is None or rows >= n:
        return jnp.arange(n, dtype=jnp.int32), valid_N
    priority_N = jax.random.uniform(key, (n,)) + valid_N.astype(_F32)  # real tokens rank first
    idx = jax.lax.top_k(priority_N, rows)[1].astype(jnp.int32)
    return idx, valid_N[idx]


def _capture(
    params: dict[str, Any],
    config: DecoderConfig,
    dtype: Any,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    idx_R: jax.Array,
    valid_R: jax.Array,
    with_logits: bool,
) -> dict[str, jax.Array]:
    keep_Rx1 = valid_R[:, None].astype(_F32)
    pick = lambda x_NxI: x_NxI[idx_R].astype(_F32) * keep_Rx1  # noqa: E731

    def tap(taps: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {name: pick(x) for name, x in taps.items()}

    hn, out = hidden_states_with_taps(params, config, dtype, input_ids, attention_mask, tap)
    if not config.tie_word_embeddings:
        out["head_in"] = pick(hn.reshape(-1, hn.shape[-1]))
    if with_logits:
        out["logits"] = head_logits(params, config, dtype, hn)
    return out


def capture_inputs(
    params: dict[str, Any],
    config: DecoderConfig,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    dtype: Any = jnp.float32,
    rows: int | None = None,
    key: jax.Array | None = None,
    with_logits: bool = False,
) -> CapturedInputs:
    """Runs the decoder on a batch and returns the input rows of every projected linear layer.

    Args:
        params: the parameter dict (`Decoder.params()`; `layers` holds stacked arrays).
        config: the architecture.
        input_ids: int token ids [B, T].
        attention_mask: [B, T], 1 for real tokens (left or right padding); None = all real.
        dtype: compute dtype of the forward (the model's `dtype`); rows are returned float32.
        rows: token positions captured per batch (R, static); None = all B * T.
        key: PRNG key of the row draw (default `jax.random.key(0)`).
        with_logits: also return the forward's float32 logits (e.g. for the reference loss).

    Returns:
        A `CapturedInputs` whose ``inputs`` feed `matrix_basis_from_activations` directly
        (after `ogpsa_jax.train.activation_refresh.inputs_like` when the basis must match another
        tree, e.g. an nnx.State).

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = init_random(tiny_config(), dtype=jnp.float32)
        >>> ids = jnp.ones((2, 7), jnp.int32)
        >>> cap = capture_inputs(model.params(), model.config, ids)
        >>> cap.inputs["layers"]["down_proj"].shape  # (num_layers, B * T, intermediate_size)
        (3, 14, 176)
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if attention_mask is None:
        attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    elif attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {attention_mask.shape} != input_ids {input_ids.shape}"
        )
    if rows is not None and (not isinstance(rows, int) or isinstance(rows, bool) or rows < 1):
        raise ValueError(f"rows must be None or an integer >= 1, got {rows!r}")
    missing = [k for k in ("embed_tokens", "layers", "final_norm") if k not in params]
    if not config.tie_word_embeddings and "lm_head" not in params:
        missing.append("lm_head")
    if missing:
        raise ValueError(f"params lacks {missing}: pass the decoder's params() dict")
    mesh = jax.sharding.get_abstract_mesh()
    explicit = not mesh.empty and AxisType.Explicit in mesh.axis_types
    sample = lambda m, k: sample_rows(m, rows, k)  # noqa: E731
    if explicit:  # top_k refuses a sharded axis: draw over the whole (replicated) batch
        sample = jax.sharding.auto_axes(sample, out_sharding=(jax.P(), jax.P()))
    idx_R, valid_R = sample(attention_mask, jax.random.key(0) if key is None else key)

    def run(p: dict[str, Any], ids: jax.Array, attn: jax.Array, idx: jax.Array, ok: jax.Array):
        return _capture(p, config, dtype, ids, attn, idx, ok, with_logits)

    if explicit:
        # As `Decoder.__call__`: GSPMD inside; the captured rows come back replicated, the
        # logits split over the batch like the ids.
        names = set(SITES.values())
        names |= set() if config.tie_word_embeddings else {"head_in"}
        out_sharding = {k: jax.P() for k in names}
        if with_logits:
            rows_axes = batch_axes(input_ids.shape[0], dict(mesh.shape))
            out_sharding["logits"] = jax.P(rows_axes, None, None)
        run = jax.sharding.auto_axes(run, out_sharding=out_sharding)
    out = run(params, input_ids, attention_mask, idx_R, valid_R)
    layers: dict[str, Any] = {
        name: (out[SITES[name]] if name in SITES else None) for name in layer_param_shapes(config)
    }
    for name, adapter in params["layers"].items():  # a LoRA adapter's A sees the same rows
        if isinstance(adapter, LoRAWeights):
            base = name.removesuffix("_lora")
            layers[name] = LoRAWeights(a=out[SITES[base]], b=None, scaling=adapter.scaling)
    inputs: dict[str, Any] = {"embed_tokens": None, "layers": layers, "final_norm": None}
    if not config.tie_word_embeddings:
        inputs["lm_head"] = out["head_in"]
    return CapturedInputs(inputs=inputs, row_valid=valid_R, logits=out.get("logits"))


def stack_rows(trees: Iterable[Any]) -> Any:
    """Concatenates captured input trees of several batches along the row axis (-2).

    Args:
        trees: trees of identical structure (None leaves stay None).

    Returns:
        One tree with rows of all batches.

    Example:
        >>> stack_rows([{"x": jnp.ones((3, 2, 5))}, {"x": jnp.ones((3, 4, 5))}])["x"].shape
        (3, 6, 5)
    """
    trees = list(trees)
    if not trees:
        raise ValueError("no captured batches to stack")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-2), *trees)


__all__ = ["CapturedInputs", "SITES", "capture_inputs", "sample_rows", "stack_rows"]
