"""The inputs of every linear layer of the decoder, for GPM-style activation bases.

`capture_inputs` runs the decoder's full-sequence forward with the scanned block's capture
path switched on (`_block(..., taps=)`: a trace-time branch, so the normal forward's program is
unchanged) and returns, per projected weight, the rows ``x`` that multiply it (``y = x @ W``):

| weight | its input | captured shape |
| --- | --- | --- |
| q_proj, k_proj, v_proj | RMSNorm(h) before attention | (L, R, hidden_size) |
| o_proj | attention output (heads concatenated) | (L, R, num_heads * head_dim) |
| gate_proj, up_proj | RMSNorm(h) before the MLP | (L, R, hidden_size) |
| down_proj | silu(gate) * up | (L, R, intermediate_size) |
| lm_head (untied only) | final RMSNorm(h) | (R, hidden_size) |

The rows are R token positions of the batch, sampled inside the scan (so a layer never keeps
more than R rows): with ``rows=None`` all B * T positions, padding rows zeroed; with ``rows=R``
R positions drawn without replacement among the real tokens, topped up with zeroed padding
rows when the batch has fewer real tokens. Zero rows carry no energy, so
`matrix_basis_from_activations` ignores them; ``row_valid`` says which rows are real.

Example:
    >>> cap = capture_inputs(model.params(), model.config, ids, mask, rows=64)  # doctest: +SKIP
    >>> basis = matrix_basis_from_activations(cap.inputs, k=16)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.decoder import (
    _block,
    _logits,
    _rms_norm,
    attention_chunk_rows,
    layer_param_shapes,
    rope_tables,
)
from ogpsa_jax.projection import resolve_dims

logger = logging.getLogger(__name__)

_F32 = jnp.float32
# Stacked layer weight -> the tap (see `_block`) holding its input.
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
    valid_BxL = attention_mask.astype(bool)
    positions = jnp.maximum(jnp.cumsum(valid_BxL.astype(jnp.int32), axis=-1) - 1, 0)
    cos, sin = rope_tables(config, positions)
    n = input_ids.shape[1]
    mask_BxLxL = jnp.tril(jnp.ones((n, n), bool))[None] & valid_BxL[:, None, :]
    keep_Rx1 = valid_R[:, None].astype(_F32)
    pick = lambda x_NxI: x_NxI[idx_R].astype(_F32) * keep_Rx1
    chunk = attention_chunk_rows(n)

    def body(h: jax.Array, p: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        taps: dict[str, jax.Array] = {}
        h, _ = _block(p, h, cos, sin, mask_BxLxL, config, dtype, None, 0, taps=taps, chunk=chunk)
        return h, {name: pick(x) for name, x in taps.items()}

    h = params["embed_tokens"].astype(dtype)[input_ids]
    h, out = jax.lax.scan(body, h, params["layers"])
    if not config.tie_word_embeddings:
        hn = _rms_norm(h, params["final_norm"], config.rms_norm_eps, dtype)
        out["head_in"] = pick(hn.reshape(-1, hn.shape[-1]))
    if with_logits:
        out["logits"] = _logits(params, h, config, dtype)
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
        (after `inputs_like` when the basis must match another tree, e.g. an nnx.State).

    Example:
        >>> cap = capture_inputs(model.params(), model.config, ids, mask)  # doctest: +SKIP
        >>> cap.inputs["layers"]["down_proj"].shape  # (L, B*T, intermediate_size)
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
        # As `Decoder.__call__`: GSPMD inside; the captured rows come back replicated.
        names = set(SITES.values())
        names |= set() if config.tie_word_embeddings else {"head_in"}
        names |= {"logits"} if with_logits else set()
        run = jax.sharding.auto_axes(run, out_sharding={k: jax.P() for k in names})
    out = run(params, input_ids, attention_mask, idx_R, valid_R)
    layers = {
        name: (out[SITES[name]] if name in SITES else None) for name in layer_param_shapes(config)
    }
    inputs: dict[str, Any] = {"embed_tokens": None, "layers": layers, "final_norm": None}
    if not config.tie_word_embeddings:
        inputs["lm_head"] = out["head_in"]
    return CapturedInputs(inputs=inputs, row_valid=valid_R, logits=out.get("logits"))


def _path_name(path: tuple[Any, ...]) -> str:
    """A key path as "layers/q_proj" (dict keys and attributes; an nnx trailing "value" dropped)."""
    parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(parts[:-1] if parts and parts[-1] == "value" else parts)


def inputs_like(params: Any, inputs: dict[str, Any], *, dims: Any = None, mask: Any = None) -> Any:
    """Arranges captured inputs like ``params`` (e.g. an nnx.State), for a given basis layout.

    Args:
        params: the parameter tree the basis is for (leaf paths "layers/q_proj", "lm_head", ...
            as in `Decoder.params()`; nnx Variables are fine).
        inputs: `CapturedInputs.inputs` (or rows stacked over batches, same structure).
        dims: input axis per leaf as given to `ogpsa_matrix` (None = its default).
        mask: as given to `ogpsa_matrix`; leaves it skips get None.

    Returns:
        A tree with the structure of ``params``: the captured rows for every leaf that
        `ogpsa_matrix(dims=dims, mask=mask)` projects, None elsewhere.

    Raises:
        ValueError: a projected leaf has no captured input, or its input width is not the
            width of the leaf's input axis.

    Example:
        >>> acts = inputs_like(state_params, cap.inputs, mask=mask)  # doctest: +SKIP
    """
    flat: dict[str, Any] = {}
    for path, x in jax.tree_util.tree_flatten_with_path(inputs)[0]:
        flat[_path_name(path)] = x
    leaves, treedef = jax.tree_util.tree_flatten_with_path(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
    )
    axes = resolve_dims(params, dims, mask)
    out = []
    for (path, leaf), axis in zip(leaves, axes, strict=True):
        if axis is None:
            out.append(None)
            continue
        name = _path_name(path)
        if name not in flat:
            raise ValueError(f"parameter {name!r} is projected but the decoder has no input for it")
        x, width = flat[name], jnp.shape(leaf)[axis]
        if jnp.shape(x)[-1] != width:
            raise ValueError(
                f"captured input of {name!r} has width {jnp.shape(x)[-1]} but the leaf's input "
                f"axis {axis} has size {width} (shape {jnp.shape(leaf)}): use the default dims"
            )
        out.append(x)
    return jax.tree.unflatten(treedef, out)


def stack_rows(trees: Iterable[Any]) -> Any:
    """Concatenates captured input trees of several batches along the row axis (-2).

    Args:
        trees: trees of identical structure (None leaves stay None).

    Returns:
        One tree with rows of all batches.

    Example:
        >>> acts = stack_rows(capture_inputs(p, cfg, b["input_ids"]).inputs for b in bs)
    """
    trees = list(trees)
    if not trees:
        raise ValueError("no captured batches to stack")
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=-2), *trees)


__all__ = ["CapturedInputs", "capture_inputs", "inputs_like", "sample_rows", "stack_rows"]
