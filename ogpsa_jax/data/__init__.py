"""Data for OGPSA training: chat rendering, sources, tokenisation, batching, shipped assets.

Example:
  >>> from transformers import AutoTokenizer
  >>> from ogpsa_jax import data
  >>> tok = AutoTokenizer.from_pretrained(data.assets_path("tiny_tokenizer"))
  >>> rows = data.load_sft(data.assets_path("general.jsonl"))
  >>> enc = data.tokenize_sft(tok, rows, max_length=64, truncation="right")
  >>> batches = data.Batches(enc, batch_size=4, pad_id=data.pad_token_id(tok), seed=0)
  >>> step = batches.next_step(accum_steps=2)  # {"input_ids": [2, 4, L], ...}
"""

from ogpsa_jax.data.batching import Batch, Batches, bucket_lengths, pad_batch, reference_batches
from ogpsa_jax.data.chat import left_pad, pad_token_id, prompt_ids, render_chat, with_system_prompt
from ogpsa_jax.data.encode import TRUNCATION_POLICIES, tokenize_preferences, tokenize_sft, truncate
from ogpsa_jax.data.examples import Encoded, EncodedPair, PreferencePair, SFTExample
from ogpsa_jax.data.files import looks_like_hub_id, source_kind
from ogpsa_jax.data.schemas import SCHEMAS
from ogpsa_jax.data.sources import assets_path, load_preferences, load_sft

# Aliases: one class serves both kinds (pairs are detected from the examples).
SFTBatches = Batches
PreferenceBatches = Batches

__all__ = [
    "SCHEMAS",
    "TRUNCATION_POLICIES",
    "Batch",
    "Batches",
    "Encoded",
    "EncodedPair",
    "PreferenceBatches",
    "PreferencePair",
    "SFTBatches",
    "SFTExample",
    "assets_path",
    "bucket_lengths",
    "left_pad",
    "load_preferences",
    "load_sft",
    "looks_like_hub_id",
    "pad_batch",
    "pad_token_id",
    "prompt_ids",
    "reference_batches",
    "render_chat",
    "source_kind",
    "tokenize_preferences",
    "tokenize_sft",
    "truncate",
    "with_system_prompt",
]
