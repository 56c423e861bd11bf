"""Flax NNX Llama / Qwen2 decoders, Hugging Face checkpoint I/O and generation."""

from ogpsa_jax.models.config import (
    DecoderConfig,
    llama3_1_8b_config,
    qwen2_5_7b_config,
    smollm2_135m_config,
    tiny_config,
)
from ogpsa_jax.models.decoder import Decoder, init_random
from ogpsa_jax.models.generate import generate, sequence_logprobs, token_logprob_sums
from ogpsa_jax.models.hf import load_hf, save_hf
from ogpsa_jax.models.sharding import make_mesh, param_shardings

__all__ = [
    "Decoder",
    "DecoderConfig",
    "generate",
    "init_random",
    "llama3_1_8b_config",
    "load_hf",
    "make_mesh",
    "param_shardings",
    "qwen2_5_7b_config",
    "save_hf",
    "sequence_logprobs",
    "smollm2_135m_config",
    "tiny_config",
    "token_logprob_sums",
]
