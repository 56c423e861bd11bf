"""Flax NNX Llama / Qwen2 decoders, Hugging Face checkpoint I/O, generation and log-probs.

Files: `config` (architectures), `layers` (the block's math), `layer_scan` (the preamble and
the scan of the blocks), `functional` (the pure entry points on the parameter dict), `decoder`
(the NNX module), `lora` (low-rank adapters, merge), `peft` (PEFT adapter folders), `logprobs`,
`generate`, `capture` (inputs of the linear layers), `hf` and `gguf` (checkpoint I/O),
`sharding` (meshes).
"""

from ogpsa_jax.models.config import (
    DecoderConfig,
    llama3_1_8b_config,
    qwen2_5_7b_config,
    smollm2_135m_config,
    tiny_config,
)
from ogpsa_jax.models.decoder import Decoder, at_compute_dtype, init_random
from ogpsa_jax.models.generate import generate
from ogpsa_jax.models.hf import load_hf, save_hf
from ogpsa_jax.models.logprobs import sequence_logprobs
from ogpsa_jax.models.lora import LoRAConfig, LoRAParam, add_lora, merge_lora
from ogpsa_jax.models.peft import load_peft, save_peft
from ogpsa_jax.models.sharding import make_mesh, param_shardings

__all__ = [
    "Decoder",
    "DecoderConfig",
    "LoRAConfig",
    "LoRAParam",
    "add_lora",
    "at_compute_dtype",
    "generate",
    "init_random",
    "llama3_1_8b_config",
    "load_hf",
    "load_peft",
    "make_mesh",
    "merge_lora",
    "param_shardings",
    "qwen2_5_7b_config",
    "save_hf",
    "save_peft",
    "sequence_logprobs",
    "smollm2_135m_config",
    "tiny_config",
]
