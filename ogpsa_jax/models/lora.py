"""Low-rank adapters (LoRA) on the decoder's projections, defined as Hugging Face PEFT does.

An adapter on a projection ``W`` [d_in, d_out] (our ``y = x @ W`` layout) adds
``scaling * (x @ A) @ B`` with ``A`` [d_in, r] and ``B`` [r, d_out]; scaling is ``alpha / r``
(``alpha / sqrt(r)`` with rsLoRA). ``A`` starts uniform in ``+-1 / sqrt(d_in)`` (PEFT's default,
torch's ``kaiming_uniform_(a=sqrt(5))``) and ``B`` at zero, so a fresh adapter leaves the
model's output unchanged. PEFT stores the transposes (``lora_A`` [r, d_in], ``lora_B``
[d_out, r]); `ogpsa_jax.models.peft` converts.

Where the adapters live (for ``<w>`` one of q_proj ... down_proj):

- on the module: ``model.layers.<w>_lora``, a `LoRAAdapter` holding ``a`` (L, d_in, r) and
  ``b`` (L, r, d_out) as `LoRAParam` variables and a static ``scaling``;
- in `Decoder.params()`: ``["layers"]["<w>_lora"]``, a `LoRAWeights` pytree with arrays ``a``
  and ``b`` and a static ``scaling``;
- ``model.lora``: the `LoRAConfig` (None without adapters).

Both name the leaves ``layers/<w>_lora/a`` and ``.../b``, stacked over layers like the base
weights. `LoRAParam` is the variable type training selects: ``nnx.split(model, LoRAParam, ...)``
puts the adapters in one state and the (frozen) base weights in the rest.

Example:
    >>> from ogpsa_jax.models import init_random, tiny_config
    >>> base = init_random(tiny_config(), dtype=jnp.float32)
    >>> model = add_lora(base, LoRAConfig(rank=4, alpha=8, targets=("q", "v")))
    >>> model.params()["layers"]["q_proj_lora"].a.shape  # (layers, d_in, rank)
    (3, 64, 4)
    >>> ids = jnp.ones((1, 5), jnp.int32)
    >>> bool(jnp.array_equal(model(ids), base(ids)))  # B = 0: the base model's logits
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from ogpsa_jax._tree import keep_sharding
from ogpsa_jax.models.config import DecoderConfig
from ogpsa_jax.models.decoder import PARAM_AXES, Decoder, layer_param_shapes
from ogpsa_jax.models.sharding import fit_spec

# Target name (as `LoRAConfig.targets` and `model.lora.targets` spell it) -> our projection.
TARGETS: dict[str, str] = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
_BY_NAME = {**{t: t for t in TARGETS}, **{p: t for t, p in TARGETS.items()}}


def adapter_key(target: str) -> str:
    """The key of a target's adapter in ``params()["layers"]`` and on ``model.layers``.

    Example:
        >>> adapter_key("q")
        'q_proj_lora'
    """
    return f"{TARGETS[target]}_lora"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRAConfig:
    """Rank, alpha and targets of LoRA adapters (PEFT's ``r``, ``lora_alpha``,
    ``target_modules`` and ``use_rslora``).

    Example:
        >>> cfg = LoRAConfig(rank=16, alpha=32, targets="q,k,v,o,gate,up,down")
        >>> cfg.targets[:3], cfg.scaling
        (('q', 'k', 'v'), 2.0)
        >>> LoRAConfig(rank=16, alpha=32, targets=("q_proj",), use_rslora=True).scaling
        8.0
    """

    rank: int  # r >= 1: columns of A, rows of B; at most the smaller side of every target
    alpha: float  # > 0: the update is scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)
    targets: tuple[str, ...]  # of q, k, v, o, gate, up, down (or q_proj ...; "q,k" works too)
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(rank)

    def __post_init__(self) -> None:
        rank = self.rank
        if isinstance(rank, bool) or not isinstance(rank, int | np.integer) or rank < 1:
            raise ValueError(f"LoRA rank must be an int >= 1, got {rank!r}")
        alpha = self.alpha
        ok = isinstance(alpha, int | float | np.number) and not isinstance(alpha, bool)
        if not ok or not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise ValueError(f"LoRA alpha must be a finite number > 0, got {alpha!r}")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora must be a bool, got {self.use_rslora!r}")
        names = self.targets
        if isinstance(names, str):
            names = [n.strip() for n in names.split(",") if n.strip()]
        names = list(names)
        unknown = [n for n in names if n not in _BY_NAME]
        if unknown:
            raise ValueError(
                f"unknown LoRA targets {unknown}; expected some of {list(TARGETS)} "
                f"(or {list(TARGETS.values())})"
            )
        short = [_BY_NAME[n] for n in names]
        if len(set(short)) != len(short):
            raise ValueError(f"LoRA targets name a projection twice: {list(self.targets)}")
        if not short:
            raise ValueError(f"LoRA targets name none of the projections {list(TARGETS)}")
        object.__setattr__(self, "rank", int(rank))
        object.__setattr__(self, "alpha", float(alpha))
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in short))

    @property
    def scaling(self) -> float:
        """``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA (PEFT's formula)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    def replace(self, **changes: Any) -> LoRAConfig:
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


class LoRAParam(nnx.Param):
    """An adapter matrix (``A`` or ``B``): the variable type to train with LoRA.

    A subclass of `nnx.Param`, so `param_shardings` and ``nnx.state(model, nnx.Param)``
    include it; ``nnx.state(model, LoRAParam)`` holds the adapters alone.
    """


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=("a", "b"), meta_fields=("scaling",)
)
@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """One target's adapter in a parameter dict (`Decoder.params()`): a pytree whose leaves are
    ``a`` and ``b`` and whose ``scaling`` is static (a constant of the traced program).

    Attributes:
        a: (L, d_in, r) stacked over layers, or (d_in, r) inside the layer scan.
        b: (L, r, d_out), or (r, d_out).
        scaling: the factor of the update ``scaling * (x @ a) @ b``.
    """

    a: Any
    b: Any
    scaling: float


class LoRAAdapter(nnx.Module):
    """The adapter of one target on ``model.layers``: ``a`` and ``b`` (`LoRAParam`, stacked
    over layers) and a static ``scaling``. Made by `add_lora` (or `load_peft`)."""

    def __init__(self, a: jax.Array, b: jax.Array, scaling: float, base: str):
        axes = PARAM_AXES[base]  # (layer, in, out): A keeps the input axis, B the output axis
        self.a = LoRAParam(a, out_sharding=(axes[0], axes[1], None), eager_sharding=False)
        self.b = LoRAParam(b, out_sharding=(axes[0], None, axes[2]), eager_sharding=False)
        self.scaling = float(scaling)

    def weights(self) -> LoRAWeights:
        """The arrays as the `LoRAWeights` of `Decoder.params()`."""
        return LoRAWeights(self.a[...], self.b[...], self.scaling)


def adapters(model: Decoder) -> dict[str, LoRAAdapter]:
    """The model's adapters by target name (empty without adapters).

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = add_lora(init_random(tiny_config()), LoRAConfig(rank=2, alpha=4, targets="o"))
        >>> list(adapters(model))
        ['o']
    """
    found = {t: getattr(model.layers, adapter_key(t), None) for t in TARGETS}
    return {t: a for t, a in found.items() if a is not None}


def lora_shapes(lora: LoRAConfig, config: DecoderConfig) -> dict[str, tuple[tuple, tuple]]:
    """Stacked shapes of each target's (A, B) on a model of `config`, checking the rank.

    Args:
        lora: the adapters.
        config: the decoder's architecture.

    Returns:
        target -> ((L, d_in, r), (L, r, d_out)).

    Raises:
        ValueError: the rank exceeds a target's input or output width.

    Example:
        >>> from ogpsa_jax.models import tiny_config
        >>> lora_shapes(LoRAConfig(rank=2, alpha=4, targets="k"), tiny_config())
        {'k': ((3, 64, 2), (3, 2, 32))}
    """
    shapes = layer_param_shapes(config)
    out = {}
    for t in lora.targets:
        n, d_in, d_out = shapes[TARGETS[t]]
        if lora.rank > min(d_in, d_out):
            raise ValueError(
                f"LoRA rank {lora.rank} exceeds target {t!r} ({TARGETS[t]} is {d_in} x {d_out}): "
                f"the rank must be at most {min(d_in, d_out)}"
            )
        out[t] = ((n, d_in, lora.rank), (n, lora.rank, d_out))
    return out


def _place(value: Any, like: Any, axes: Sequence[str | None], dtype: Any) -> jax.Array:
    """``value`` as a `dtype` array placed on the mesh of the base weight `like` (if any)."""
    arr = jnp.asarray(value, dtype)
    sharding = getattr(like, "sharding", None)
    if isinstance(like, jax.core.Tracer) or not isinstance(sharding, NamedSharding):
        return arr
    mesh = sharding.mesh
    return jax.device_put(arr, NamedSharding(mesh, fit_spec(axes, arr.shape, dict(mesh.shape))))


def add_lora(
    model: Decoder,
    lora: LoRAConfig,
    *,
    seed: int = 0,
    weights: Mapping[str, tuple[Any, Any]] | None = None,
) -> Decoder:
    """A copy of `model` with adapters on `lora.targets` (the input model is unchanged).

    Args:
        model: a decoder without adapters (on a mesh or not).
        lora: rank, alpha and targets.
        seed: PRNG seed of A's initialisation (uniform in +-1 / sqrt(d_in); B = 0).
        weights: instead of the initialisation, target -> (A (L, d_in, r), B (L, r, d_out))
            in our layout (e.g. read from a PEFT folder).

    Returns:
        A `Decoder` sharing the base weights' values, with ``model.lora == lora``; each
        adapter is placed on the mesh of its base weight (A's input axis sharded like the
        weight's input axis, B's output axis like its output axis, the rank replicated).

    Raises:
        ValueError: the model already has adapters, the rank exceeds a target's width, or
            `weights` misses a target or has a wrong shape.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = add_lora(init_random(tiny_config()), LoRAConfig(rank=4, alpha=8, targets="q"))
        >>> float(jnp.abs(model.layers.q_proj_lora.b[...]).max())  # B starts at zero
        0.0
    """
    if getattr(model, "lora", None) is not None or adapters(model):
        raise ValueError("the model already has LoRA adapters: merge_lora(model) first")
    shapes = lora_shapes(lora, model.config)
    if weights is not None:
        wrong = sorted(set(weights) ^ set(lora.targets))
        if wrong:
            raise ValueError(f"weights must have exactly the targets {lora.targets}: {wrong}")
        for t, (shape_a, shape_b) in shapes.items():
            got = (tuple(np.shape(weights[t][0])), tuple(np.shape(weights[t][1])))
            if got != (shape_a, shape_b):
                raise ValueError(f"weights[{t!r}] shapes {got} != expected {(shape_a, shape_b)}")
    out = nnx.clone(model)
    key = jax.random.key(seed)
    for i, (t, (shape_a, shape_b)) in enumerate(shapes.items()):
        base = TARGETS[t]
        w = getattr(out.layers, base)[...]
        axes = PARAM_AXES[base]
        if weights is None:
            bound = 1.0 / math.sqrt(shape_a[1])
            a = jax.random.uniform(jax.random.fold_in(key, i), shape_a, jnp.float32, -bound, bound)
            b = np.zeros(shape_b, np.float32)
        else:
            a, b = weights[t]
        a = _place(a, w, (axes[0], axes[1], None), w.dtype)
        b = _place(b, w, (axes[0], None, axes[2]), w.dtype)
        setattr(out.layers, adapter_key(t), LoRAAdapter(a, b, lora.scaling, base))
    out.lora = lora
    return out


@jax.jit
def merged_weight(w_LxIxO: jax.Array, lora: LoRAWeights) -> jax.Array:
    """``W + scaling * A @ B`` per layer, in float32, returned in W's dtype and sharding.

    Example:
        >>> lw = LoRAWeights(jnp.ones((1, 2, 1)), jnp.full((1, 1, 3), 0.5), 2.0)
        >>> merged_weight(jnp.zeros((1, 2, 3)), lw)[0, 0]
        Array([1., 1., 1.], dtype=float32)
    """
    delta = jnp.einsum(
        "lir,lro->lio",
        lora.a.astype(jnp.float32),
        lora.b.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    merged = w_LxIxO.astype(jnp.float32) + lora.scaling * delta
    return keep_sharding(merged.astype(w_LxIxO.dtype), w_LxIxO)


def merge_lora(model: Decoder) -> Decoder:
    """A copy of `model` with every adapter folded into its base weight, and no adapters.

    Args:
        model: a decoder with adapters.

    Returns:
        A plain `Decoder` (``W + scaling * A @ B`` per target, computed in float32 and stored
        in the weights' dtype and sharding); `save_hf` writes it as a full HF folder.

    Raises:
        ValueError: the model has no adapters.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> model = add_lora(init_random(tiny_config()), LoRAConfig(rank=4, alpha=8, targets="q"))
        >>> merged = merge_lora(model)
        >>> merged.lora is None, hasattr(merged.layers, "q_proj_lora")
        (True, False)
    """
    found = adapters(model)
    if not found:
        raise ValueError("the model has no LoRA adapters to merge")
    out = nnx.clone(model)
    for t, adapter in adapters(out).items():
        w = getattr(out.layers, TARGETS[t])
        w[...] = keep_sharding(merged_weight(w[...], adapter.weights()), w[...])
        delattr(out.layers, adapter_key(t))
    out.lora = None
    return out


def remove_lora(model: Decoder) -> Decoder:
    """A copy of `model` without its adapters: the base model they were added to.

    Example:
        >>> from ogpsa_jax.models import init_random, tiny_config
        >>> base = init_random(tiny_config())
        >>> model = add_lora(base, LoRAConfig(rank=4, alpha=8, targets="q"))
        >>> again = remove_lora(model)
        >>> same = jnp.array_equal(again.layers.q_proj[...], base.layers.q_proj[...])
        >>> again.lora is None, bool(same), hasattr(again.layers, "q_proj_lora")
        (True, True, False)
    """
    out = nnx.clone(model)
    for t in adapters(out):
        delattr(out.layers, adapter_key(t))
    out.lora = None
    return out


__all__ = [
    "LoRAAdapter",
    "LoRAConfig",
    "LoRAParam",
    "LoRAWeights",
    "TARGETS",
    "adapter_key",
    "adapters",
    "add_lora",
    "lora_shapes",
    "merge_lora",
    "merged_weight",
    "remove_lora",
]
