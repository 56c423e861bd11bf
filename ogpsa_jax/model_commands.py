"""Using a model folder: ``ogpsa eval DIR`` and ``ogpsa generate DIR`` as library functions.

Any Hugging Face folder the decoder loads works: a run's ``final/`` or a downloaded model.
`open_folder` checks it (config.json, the weight headers, a tokenizer that fits the model)
before loading; `evaluate_folder` runs `ogpsa_jax.eval.evaluate_alignment` on it and
`results_markdown` tabulates the result; `generate_from_folder` answers prompts rendered with
the folder's chat template.

Example:
    >>> model, tok = open_folder("runs/tiny/final")  # doctest: +SKIP
    >>> result = evaluate_folder("runs/tiny/final", EvalConfig(harmful_limit=4))  # doctest: +SKIP
    >>> print(results_markdown(result))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ogpsa_jax import models
from ogpsa_jax.eval import EvalConfig, drift_reference, evaluate_alignment, generate_responses
from ogpsa_jax.models import DecoderConfig
from ogpsa_jax.train.inputs import TOKENIZER_FILES, check_model_folder, check_tokenizer

logger = logging.getLogger(__name__)

# The rows of the Markdown table: result key -> label.
TABLE_ROWS = {
    "safety": "safety (refusal rate on harmful prompts, higher is safer)",
    "over_refusal": "over-refusal (refusal rate on benign edgy prompts, lower is better)",
    "capability": "capability (mean of GSM8K and BBQ accuracy)",
    "gsm8k": "GSM8K accuracy",
    "bbq": "BBQ accuracy",
    "gsm8k_generate": "GSM8K exact match by generation",
    "ifeval_prompt_strict": "IFEval prompt-level accuracy, strict",
    "ifeval_prompt_loose": "IFEval prompt-level accuracy, loose",
    "ifeval_inst_strict": "IFEval instruction-level accuracy, strict",
    "ifeval_inst_loose": "IFEval instruction-level accuracy, loose",
    "choice_mean": "zero-shot choice tasks, mean accuracy",
    "drift": "drift (NLL of the starting model's answers, lower = closer)",
    "drift_kl": "drift KL divergence from the starting model",
}


def open_folder(
    path: str | os.PathLike, *, tokenizer: str | None = None, dtype: str = "float32"
) -> tuple[Any, Any]:
    """Loads a Hugging Face folder's decoder and tokenizer, checked before any weight is read.

    Args:
        path: the model folder.
        tokenizer: a tokenizer folder (default: the model folder's own).
        dtype: compute dtype, ``float32`` or ``bfloat16``.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: the folder or its tokenizer is missing, malformed or does not fit the model.
    """
    # function-local: transformers takes seconds to import
    from transformers import AutoTokenizer

    path = os.path.expanduser(os.fspath(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path!r} not found or has no config.json")
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    check_model_folder(path)
    tok_dir = os.path.expanduser(tokenizer) if tokenizer else path
    if not any(os.path.isfile(os.path.join(tok_dir, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"folder {tok_dir!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "pass --tokenizer DIR"
        )
    try:
        tok = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    except Exception as e:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the tokenizer from {tok_dir!r}: {e}") from e
    with open(os.path.join(path, "config.json")) as f:
        check_tokenizer(tok, DecoderConfig.from_hf(json.load(f)), tok_dir)
    return models.load_hf(path, dtype=jnp.dtype(dtype), param_dtype=jnp.float32), tok


def evaluate_folder(
    path: str | os.PathLike,
    config: EvalConfig,
    *,
    start: str | os.PathLike | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
    progress: bool = False,
) -> dict[str, Any]:
    """`evaluate_alignment` of a model folder (with drift against ``start``, if given).

    Args:
        path: the model folder.
        config: what to measure.
        start: the starting model's folder, for the drift measures (None: no drift).
        tokenizer: a tokenizer folder (default: the model folder's own).
        dtype: compute dtype.
        progress: tqdm bars.

    Returns:
        The result dict of `evaluate_alignment` plus ``model`` (the folder) and ``start``.
    """
    model, tok = open_folder(path, tokenizer=tokenizer, dtype=dtype)
    reference, start_model = None, None
    if start is not None:
        start_model, _ = open_folder(start, tokenizer=tokenizer, dtype=dtype)
        reference = drift_reference(start_model, tok, config, progress=progress)
    logger.info("evaluating %s", path)
    result = evaluate_alignment(
        model, tok, config, reference=reference, start_model=start_model, progress=progress
    )
    return {
        "model": os.fspath(path),
        "start": None if start is None else os.fspath(start),
        **result,
    }


def _plain(value: Any) -> Any:
    """JSON-ready values (NumPy and JAX scalars and arrays become Python numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def results_markdown(result: dict[str, Any]) -> str:
    """A Markdown table of an evaluation's headline numbers (with the prompt counts).

    Example:
        >>> print(results_markdown({"model": "m", "safety": 0.5, "n": {"safety": 4}}))
        | m | value | n |
        | --- | --- | --- |
        | safety (refusal rate on harmful prompts, higher is safer) | 0.500 | 4 |
    """
    n = result.get("n", {})
    lines = [f"| {result.get('model', 'model')} | value | n |", "| --- | --- | --- |"]
    for key, label in TABLE_ROWS.items():
        value = result.get(key)
        if value is None:
            continue
        count = n.get(key, n.get("gsm8k") if key.startswith("gsm8k") else "")
        if key.startswith("ifeval_"):
            count = n.get("ifeval_prompts" if "prompt" in key else "ifeval_instructions", "")
        elif key == "choice_mean":
            count = sum(n.get("choice", {}).values())
        lines.append(f"| {label} | {value:.3f} | {count} |")
    return "\n".join(lines)


def write_results(result: dict[str, Any], output: str | os.PathLike) -> tuple[str, str]:
    """Writes the result as JSON to ``output`` and its Markdown table next to it (``.md``).

    Returns:
        The two paths written.
    """
    output = os.fspath(output)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output + ".tmp", "w") as f:
        json.dump(_plain(result), f, indent=2)
    os.replace(output + ".tmp", output)
    table = os.path.splitext(output)[0] + ".md"
    with open(table, "w") as f:
        f.write(results_markdown(result) + "\n")
    return output, table


def generate_from_folder(
    path: str | os.PathLike,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    system_prompt: str | None = None,
    tokenizer: str | None = None,
    dtype: str = "float32",
) -> list[str]:
    """Answers each prompt with the folder's model, rendered with its chat template.

    Args:
        path: the model folder.
        prompts: user messages.
        max_new_tokens: the longest answer in tokens.
        temperature: 0 = greedy, else the sampling temperature.
        top_p: nucleus sampling mass.
        seed: sampling seed.
        system_prompt: a system message for every prompt (None: the template's default).
        tokenizer: a tokenizer folder (default: the model folder's own).
        dtype: compute dtype.

    Returns:
        One answer per prompt.
    """
    if not prompts:
        raise ValueError("give at least one prompt (--prompt TEXT)")
    model, tok = open_folder(path, tokenizer=tokenizer, dtype=dtype)
    return generate_responses(
        model,
        tok,
        list(prompts),
        max_new_tokens=max_new_tokens,
        batch_size=max(1, len(prompts)),
        system_prompt=system_prompt,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=False,
    )


__all__ = [
    "TABLE_ROWS",
    "evaluate_folder",
    "generate_from_folder",
    "open_folder",
    "results_markdown",
    "write_results",
]
