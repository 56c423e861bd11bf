"""Decoder configuration shared by the Llama 3.x and Qwen2/Qwen2.5 families, with presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

# Our architecture name -> the transformers class name written into config.json.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_ROPE_TYPES = ("default", "llama3", "linear")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DecoderConfig:
    """Hyper-parameters of a Llama / Qwen2 style decoder (names follow ours, not HF's).

    Example:
        >>> cfg = tiny_config(vocab_size=97)
        >>> cfg.num_heads * cfg.head_dim
        64
    """

    architecture: str  # "llama" or "qwen2" (HF model_type)
    vocab_size: int  # V: rows of the embedding / columns of the lm_head
    hidden_size: int  # D: residual stream width
    intermediate_size: int  # F: SwiGLU hidden width
    num_layers: int  # number of decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (GQA); divides num_heads
    head_dim: int  # per-head width (need not equal hidden_size / num_heads)
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: Mapping[str, Any] | None = None  # None or HF dict ("llama3" or "linear")
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    tie_word_embeddings: bool = False  # lm_head = embed_tokens.T
    attention_bias: bool = False  # q/k/v biases (Qwen2: True; Llama: False)
    max_position_embeddings: int = 4096  # longest context the checkpoint claims
    bos_token_id: int | None = None  # begin-of-sequence id
    eos_token_id: int | tuple[int, ...] | None = None  # end id(s); a list becomes a tuple
    pad_token_id: int | None = None  # padding id

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; expected one of "
                f"{sorted(ARCHITECTURES)}"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.architecture == "qwen2" and not self.attention_bias:
            raise ValueError("qwen2 always has q/k/v biases: attention_bias must be True")
        if self.architecture == "llama" and self.attention_bias:
            raise ValueError("llama with attention_bias=True (o_proj bias) is not supported")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in _ROPE_TYPES:
                raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.rope_scaling is not None:
            object.__setattr__(self, "rope_scaling", dict(self.rope_scaling))

    def __hash__(self) -> int:  # rope_scaling is a dict: hash a canonical form
        return hash(
            tuple(
                (f.name, tuple(sorted(v.items())) if isinstance(v, dict) else v)
                for f in dataclasses.fields(self)
                for v in [getattr(self, f.name)]
            )
        )

    def replace(self, **changes: Any) -> DecoderConfig:
        """Returns a copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    @property
    def num_params(self) -> int:
        """Number of parameters (embeddings counted once when tied)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * h, self.num_kv_heads * h
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_word_embeddings else d * self.vocab_size
        return self.vocab_size * d + self.num_layers * layer + d + head

    @classmethod
    def from_hf(cls, hf_config: Any) -> DecoderConfig:
        """Builds a config from a transformers config object or a config.json dict.

        Args:
            hf_config: `transformers.PretrainedConfig` or a mapping as found in config.json.

        Returns:
            The matching `DecoderConfig`.

        Example:
            >>> DecoderConfig.from_hf(tiny_config().to_hf_dict()) == tiny_config()
            True
        """
        c = dict(hf_config) if isinstance(hf_config, Mapping) else hf_config.to_dict()
        model_type = c.get("model_type")
        if model_type not in ARCHITECTURES:
            raise ValueError(
                f"unknown model_type {model_type!r}; supported: {sorted(ARCHITECTURES)}"
            )
        if c.get("use_sliding_window"):
            raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
        if c.get("mlp_bias"):
            raise ValueError("mlp_bias=True is not supported")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {c.get('hidden_act')!r} is not supported (only silu)")
        rope = dict(c.get("rope_parameters") or {})
        legacy = c.get("rope_scaling")
        if legacy:
            rope = {**dict(legacy), **rope}
        rope_theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None if rope_type == "default" else rope
        num_heads = int(c["num_attention_heads"])
        head_dim = c.get("head_dim") or c["hidden_size"] // num_heads
        eos = c.get("eos_token_id")
        return cls(
            architecture=model_type,
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_layers=int(c["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(c.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(c.get("attention_bias", False)),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            bos_token_id=c.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list | tuple) else eos,
            pad_token_id=c.get("pad_token_id"),
        )

    def to_hf_dict(self, *, dtype: str = "float32") -> dict[str, Any]:
        """Returns a config.json dict that `transformers.AutoConfig` loads.

        Args:
            dtype: the stored weight dtype name ("float32" or "bfloat16").

        Returns:
            A JSON-serialisable dict.
        """
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {**self.rope_scaling, "rope_theta": self.rope_theta}
            rope["rope_type"] = rope.pop("type", rope.get("rope_type"))
        eos = self.eos_token_id
        d: dict[str, Any] = {
            "architectures": [ARCHITECTURES[self.architecture]],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(eos) if isinstance(eos, tuple) else eos,
            "pad_token_id": self.pad_token_id,
            "initializer_range": 0.02,
            "attention_dropout": 0.0,
            "use_cache": True,
            "dtype": dtype,
            "torch_dtype": dtype,
        }
        if self.architecture == "llama":
            d.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
        else:
            d.update(
                use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers
            )
        if self.rope_scaling is not None:
            d["rope_scaling"] = dict(rope)
        return d


def tiny_config(*, vocab_size: int = 97, architecture: str = "llama") -> DecoderConfig:
    """A ~0.2M-parameter config with odd-ish sizes for tests (hidden 64, 3 layers, GQA 4:2).

    Example:
        >>> tiny_config(vocab_size=97).num_layers
        3
    """
    return DecoderConfig(
        architecture=architecture,
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_layers=3,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=architecture == "llama",
        attention_bias=architecture == "qwen2",
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


def smollm2_135m_config() -> DecoderConfig:
    """HuggingFaceTB/SmolLM2-135M-Instruct (Llama architecture, tied embeddings)."""
    return DecoderConfig(
        architecture="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )


def qwen2_5_7b_config() -> DecoderConfig:
    """Qwen/Qwen2.5-7B-Instruct (build abstractly only: 7.6B parameters)."""
    return DecoderConfig(
        architecture="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rope_theta=1000000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        attention_bias=True,
        max_position_embeddings=32768,
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=None,
    )


def llama3_1_8b_config() -> DecoderConfig:
    """meta-llama/Llama-3.1-8B-Instruct (build abstractly only: 8.0B parameters)."""
    return DecoderConfig(
        architecture="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=(128001, 128008, 128009),
        pad_token_id=None,
    )
