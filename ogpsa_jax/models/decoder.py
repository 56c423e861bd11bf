"""Flax NNX decoder for the Llama 3.x and Qwen2 families: parameters stacked over layers.

Layout (L = layers, D = hidden, Q = heads * head_dim, K = kv_heads * head_dim, F = mlp):
`embed_tokens` (V, D); `layers.{attn_norm (L, D), q_proj (L, D, Q), k_proj (L, D, K),
v_proj (L, D, K), [q_bias (L, Q), k_bias (L, K), v_bias (L, K)], o_proj (L, Q, D),
mlp_norm (L, D), gate_proj (L, D, F), up_proj (L, D, F), down_proj (L, F, D)}`;
`final_norm` (D,); `lm_head` (D, V) unless embeddings are tied. LoRA adapters, when added
(`ogpsa_jax.models.lora`), sit beside their projection as `layers.<w>_lora`.

The module holds the parameters; its call runs `ogpsa_jax.models.functional.forward` on the
plain parameter dict (`Decoder.params()`), where the other entry points (hidden states, KV-cache
prefill and decoding, activation taps) live too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.functional import forward, hidden_states
from ogpsa_jax.models.layers import REMAT_CHOICES
from ogpsa_jax.models.logprobs import chunked_sequence_logprobs
from ogpsa_jax.models.sharding import param_shardings, with_auto_axes

if TYPE_CHECKING:
    from ogpsa_jax.models.lora import LoRAConfig

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


def layer_param_shapes(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the stacked per-layer parameters, by our name.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> layer_param_shapes(tiny_config())["down_proj"]  # (layers, mlp, hidden)
        (3, 176, 64)
    """
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
            `ogpsa_jax.models.layers.attention_chunk_rows`; 0 = one L x L block). Each block
            of queries attends only to the keys up to its last row, so the masked upper
            triangle is (mostly) never computed: same result, ~2x fewer attention FLOPs and a
            smaller working set (`benchmarks/attention.py`: forward + backward of
            SmolLM2-shaped layers at 2048 tokens 1.5x faster on a 2-core CPU). A plain
            attribute too.
        remat: rematerialisation of each block in the backward pass: ``"none"``, ``"block"``
            (keep only the block's input; least memory, about one more forward of compute) or
            ``"dots"`` (also keep the outputs of its linear layers), see
            `ogpsa_jax.models.layers.remat_policy`. Gradients are the same. A plain attribute.
        loss_chunk: positions per chunk of the lm_head and log-softmax in `sequence_logprobs`
            (0 = all at once): the float32 logits of only one chunk exist at a time. A plain
            attribute.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> model = Decoder(tiny_config(), rngs=nnx.Rngs(0))
        >>> model(jnp.ones((2, 7), jnp.int32)).shape  # float32 logits
        (2, 7, 97)
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
        remat: str = "none",
        loss_chunk: int = 0,
    ):
        self.config = config
        self.dtype = dtype
        self.lora: LoRAConfig | None = None  # set by `ogpsa_jax.models.lora.add_lora`
        self.scan_unroll = check_scan_unroll(scan_unroll)
        self.attention_chunk = check_attention_chunk(attention_chunk)
        self.remat = check_remat(remat)
        self.loss_chunk = check_loss_chunk(loss_chunk)
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
        """The parameters as a plain dict of arrays (`layers` is a dict of stacked arrays): the
        input of every entry point in `ogpsa_jax.models.functional`. A LoRA adapter on
        projection `<w>` is `layers["<w>_lora"]`, a `ogpsa_jax.models.lora.LoRAWeights`."""
        layers = {}
        for name in layer_param_shapes(self.config):
            layers[name] = getattr(self.layers, name)[...]
            adapter = getattr(self.layers, f"{name}_lora", None)
            if adapter is not None:
                layers[f"{name}_lora"] = adapter.weights()
        out = {
            "embed_tokens": self.embed_tokens[...],
            "layers": layers,
            "final_norm": self.final_norm[...],
        }
        if not self.config.tie_word_embeddings:
            out["lm_head"] = self.lm_head[...]
        return out

    def _check_inputs(
        self, input_ids: jax.Array, attention_mask: jax.Array | None, frozen_layers: int
    ) -> jax.Array:
        """The attention mask (all ones for None), after checking shapes and `frozen_layers`."""
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        if not 0 <= frozen_layers <= self.config.num_layers:
            raise ValueError(f"frozen_layers={frozen_layers} outside [0, {self.config.num_layers}]")
        if attention_mask is None:
            return jnp.ones(input_ids.shape, jnp.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {attention_mask.shape} != input_ids {input_ids.shape}"
            )
        return attention_mask

    def _run_options(self, frozen_layers: int) -> dict[str, Any]:
        return dict(
            frozen_layers=frozen_layers,
            scan_unroll=check_scan_unroll(self.scan_unroll),
            attention_chunk=check_attention_chunk(self.attention_chunk),
            remat=check_remat(self.remat),
        )

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
        attention_mask = self._check_inputs(input_ids, attention_mask, frozen_layers)
        options = self._run_options(frozen_layers)

        def run(p: dict[str, Any], i: jax.Array, m: jax.Array) -> jax.Array:
            return forward(p, self.config, self.dtype, i, m, **options)

        out_shape = (*input_ids.shape, self.config.vocab_size)
        return with_auto_axes(run, out_shape, input_ids)(self.params(), input_ids, attention_mask)

    def sequence_logprobs(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None,
        loss_mask: jax.Array,
        *,
        frozen_layers: int = 0,
    ) -> tuple[jax.Array, jax.Array]:
        """Per row, the summed log-probs of the target tokens and their count:
        ``ogpsa_jax.models.sequence_logprobs(self(ids, mask), ids, loss_mask)``, with the
        lm_head and log-softmax run over chunks of `loss_chunk` positions
        (`ogpsa_jax.models.logprobs.chunked_sequence_logprobs`; 0 = all at once).

        Args:
            input_ids: int token ids, shape [B, L].
            attention_mask: 1 for real tokens, 0 for padding; None = all real.
            loss_mask: [B, L], 1 where input_ids is a target token.
            frozen_layers: run the first n layers under `stop_gradient`.

        Returns:
            (sum_B, count_B): float32 [B] each.

        Example:
            >>> from ogpsa_jax.models import tiny_config
            >>> model = Decoder(tiny_config(), rngs=nnx.Rngs(0), loss_chunk=4)
            >>> ids = jnp.ones((2, 9), jnp.int32)
            >>> s, n = model.sequence_logprobs(ids, None, jnp.ones_like(ids))
            >>> s.shape, n.tolist()
            ((2,), [8.0, 8.0])
        """
        attention_mask = self._check_inputs(input_ids, attention_mask, frozen_layers)
        if loss_mask.shape != input_ids.shape:
            raise ValueError(f"loss_mask shape {loss_mask.shape} != input_ids {input_ids.shape}")
        options = self._run_options(frozen_layers)
        chunk = check_loss_chunk(self.loss_chunk)
        unroll = options["scan_unroll"] == 0

        def run(p: dict[str, Any], i: jax.Array, m: jax.Array, lm: jax.Array) -> tuple:
            h = hidden_states(p, self.config, self.dtype, i, m, **options)
            return chunked_sequence_logprobs(
                p, self.config, self.dtype, h, i, lm, chunk, unroll=unroll
            )

        rows = (input_ids.shape[0],)
        return with_auto_axes(run, (rows, rows), input_ids)(
            self.params(), input_ids, attention_mask, loss_mask
        )


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


def check_loss_chunk(value: Any) -> int:
    """`value` if it is a valid `loss_chunk` (an int >= 0), else a ValueError naming it."""
    return _check_int("loss_chunk", value, 0, "0 = all positions at once")


def check_remat(value: Any) -> str:
    """`value` if it is a valid `remat` setting (`REMAT_CHOICES`), else a ValueError naming it."""
    if value not in REMAT_CHOICES:
        raise ValueError(f"remat must be one of {list(REMAT_CHOICES)}, got {value!r}")
    return value


def at_compute_dtype(model: Decoder) -> Decoder:
    """A copy of `model` for inference whose floating parameters are stored in its compute
    dtype (``model.dtype``).

    Every parameter is cast to the compute dtype where a forward uses it, so the copy's outputs
    are bit-identical to the model's, while each forward reads half the parameter bytes of
    float32 storage and skips the casts: on a 2-core CPU, greedy generation with
    SmolLM2-135M-Instruct at bfloat16 is about 1.2x faster (``benchmarks/eval_speed.py``). The
    model itself is unchanged (training keeps its float32 master weights); a model already stored
    in its compute dtype is returned as is. The copy costs the parameters once more at the
    compute dtype.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> model = init_random(tiny_config(), seed=0)  # float32 storage, bfloat16 compute
        >>> fast = at_compute_dtype(model)
        >>> fast.params()["layers"]["q_proj"].dtype, model.params()["layers"]["q_proj"].dtype
        (dtype(bfloat16), dtype('float32'))
        >>> ids = jnp.ones((1, 5), jnp.int32)
        >>> bool((fast(ids) == model(ids)).all())
        True
    """
    dtype = jnp.dtype(model.dtype)
    graphdef, state = nnx.split(model)

    def stored_wider(x: Any) -> bool:
        return jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype

    if not any(stored_wider(x) for x in jax.tree.leaves(state)):
        return model
    return nnx.merge(
        graphdef, jax.tree.map(lambda x: x.astype(dtype) if stored_wider(x) else x, state)
    )


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
        >>> from ogpsa_jax.models import tiny_config
        >>> init_random(tiny_config(), seed=0, dtype=jnp.float32).params()["layers"]["q_proj"].shape
        (3, 64, 64)
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
