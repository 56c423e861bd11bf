"""What a llama.cpp GGUF file's metadata holds, in Hugging Face form: the Llama `config.json`
dict and the tokenizer (a GPT-2 style byte-level BPE, with its `tokenizer_config.json` dict and
chat template), rebuilt with the `tokenizers` package so that `transformers.AutoTokenizer`
loads them offline. `ogpsa_jax.models.gguf` writes them into a model folder.

Example:
    >>> reader = gguf.GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
    >>> tokenizer, tokenizer_config = build_tokenizer(reader)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# llama.cpp pre-tokenizer name -> does it split every digit off (HF `Digits(individual_digits)`)
# ahead of the GPT-2 byte-level regex. Only names whose llama.cpp regexes we reproduce exactly.
_PRE_TOKENIZERS = {"gpt-2": False, "smollm": True, "starcoder": True}
_TOKEN_TYPE_CONTROL = int(gguf.TokenType.CONTROL)
_TOKEN_TYPE_USER_DEFINED = int(gguf.TokenType.USER_DEFINED)


def metadata_value(reader: gguf.GGUFReader, key: str, default: Any = ...) -> Any:
    """The value of metadata `key`, or `default`; a missing required key is a ValueError.

    Args:
      reader: an open `gguf.GGUFReader`.
      key: a metadata key, e.g. "llama.block_count".
      default: returned when the key is absent (omit it to make the key required).

    Returns:
      The field's contents (a Python scalar, string or list).

    Example:
      >>> metadata_value(reader, "general.architecture")  # doctest: +SKIP
      'llama'
    """
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise ValueError(f"GGUF metadata has no {key!r}")
        return default
    return field.contents()


def _f32(value: float) -> float:
    """The shortest decimal that rounds to the same float32 (GGUF stores 1e-5 as float32)."""
    return float(str(np.float32(value)))


def llama_config(reader: gguf.GGUFReader, tensor_names: set[str]) -> dict[str, Any]:
    """The Hugging Face `config.json` dict of a Llama model, from GGUF metadata.

    Args:
      reader: an open `gguf.GGUFReader` of a `general.architecture == "llama"` file.
      tensor_names: the file's tensor names (an absent `output.weight` means tied embeddings).

    Returns:
      The config dict (transformers 4 and 5 spellings of the RoPE base).

    Raises:
      ValueError: another architecture, RoPE scaling, partial rotary embeddings, or a head
        count that is not a multiple of the key/value head count.

    Example:
      >>> llama_config(reader, {t.name for t in reader.tensors})["model_type"]  # doctest: +SKIP
      'llama'
    """
    arch = metadata_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only the 'llama' GGUF architecture is supported, got {arch!r}")
    if "rope_freqs.weight" in tensor_names or "llama.rope.scaling.type" in reader.fields:
        raise ValueError("GGUF files with RoPE scaling (rope_freqs / rope.scaling) are unsupported")
    hidden = metadata_value(reader, "llama.embedding_length")
    n_head = metadata_value(reader, "llama.attention.head_count")
    n_kv = metadata_value(reader, "llama.attention.head_count_kv", n_head)
    head_dim = metadata_value(reader, "llama.attention.key_length", hidden // n_head)
    rope_dim = metadata_value(reader, "llama.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ValueError(f"partial rotary embeddings are unsupported: {rope_dim=} {head_dim=}")
    if n_head % n_kv:
        raise ValueError(f"head_count {n_head} is not a multiple of head_count_kv {n_kv}")
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    vocab = metadata_value(reader, "llama.vocab_size", n_tokens)
    rope_theta = _f32(metadata_value(reader, "llama.rope.freq_base", 10000.0))
    special = {
        f"{name}_token_id": metadata_value(reader, f"tokenizer.ggml.{key}_token_id", None)
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": metadata_value(reader, "llama.feed_forward_length"),
        "num_hidden_layers": metadata_value(reader, "llama.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": metadata_value(reader, "llama.context_length"),
        "rms_norm_eps": _f32(metadata_value(reader, "llama.attention.layer_norm_rms_epsilon")),
        # Both spellings: `rope_theta` for transformers 4 readers, `rope_parameters` for 5.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        **special,
    }


def _token_string(reader: gguf.GGUFReader, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return reader.fields["tokenizer.ggml.tokens"].contents(token_id)


def build_tokenizer(reader: gguf.GGUFReader) -> tuple[Tokenizer, dict[str, Any]]:
    """Rebuilds the byte-level BPE tokenizer and its `tokenizer_config.json` dict.

    Args:
      reader: an open `gguf.GGUFReader` with a "gpt2" tokenizer and a supported
        `tokenizer.ggml.pre` (gpt-2, smollm, starcoder).

    Returns:
      (tokenizer, tokenizer_config): control and user-defined tokens are added tokens; BOS/EOS
      are added by the post-processor when the GGUF asks for them; the chat template, when
      present, is in the config dict.

    Raises:
      ValueError: another tokenizer model or pre-tokenizer, duplicate tokens, or add_bos/eos
        without the token id.

    Example:
      >>> tokenizer, tokenizer_config = build_tokenizer(reader)  # doctest: +SKIP
    """
    kind = metadata_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only GPT-2 style BPE tokenizers are supported, got {kind!r}")
    pre = metadata_value(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"unsupported tokenizer.ggml.pre {pre!r}; supported: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens = metadata_value(reader, "tokenizer.ggml.tokens")
    types = metadata_value(reader, "tokenizer.ggml.token_type", [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in metadata_value(reader, "tokenizer.ggml.merges")]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF vocabulary has {len(tokens) - len(vocab)} duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    prefix = bool(metadata_value(reader, "tokenizer.ggml.add_space_prefix", False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=prefix, use_regex=True)
    if _PRE_TOKENIZERS[pre]:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            AddedToken(tokens[i], special=t == _TOKEN_TYPE_CONTROL, normalized=False)
            for i, t in enumerate(types)
            if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
        ]
    )

    ids = {k: metadata_value(reader, f"tokenizer.ggml.{k}_token_id", None) for k in ("bos", "eos")}
    ids["pad"] = metadata_value(reader, "tokenizer.ggml.padding_token_id", None)
    ids["unk"] = metadata_value(reader, "tokenizer.ggml.unknown_token_id", None)
    names = {k: _token_string(reader, v) for k, v in ids.items()}
    add_bos = bool(metadata_value(reader, "tokenizer.ggml.add_bos_token", False))
    add_eos = bool(metadata_value(reader, "tokenizer.ggml.add_eos_token", False))
    for flag, key in ((add_bos, "bos"), (add_eos, "eos")):
        if flag and ids[key] is None:
            raise ValueError(f"GGUF sets add_{key}_token but has no {key}_token_id")
    post = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:

        def template(segment: str, type_id: int) -> str:
            bos = [f"{names['bos']}:{type_id}"] * add_bos
            eos = [f"{names['eos']}:{type_id}"] * add_eos
            return " ".join([*bos, f"{segment}:{type_id}", *eos])

        specials = {names[k]: ids[k] for k, flag in (("bos", add_bos), ("eos", add_eos)) if flag}
        post.append(
            processors.TemplateProcessing(
                single=template("$A", 0),
                pair=f"{template('$A', 0)} {template('$B', 1)}",
                special_tokens=list(specials.items()),
            )
        )
    tok.post_processor = post[0] if len(post) == 1 else processors.Sequence(post)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": names["bos"],
        "eos_token": names["eos"],
        "pad_token": names["pad"],
        "unk_token": names["unk"],
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": metadata_value(reader, "llama.context_length"),
    }
    chat_template = metadata_value(reader, "tokenizer.chat_template", None)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return tok, config


__all__ = ["build_tokenizer", "llama_config", "metadata_value"]
