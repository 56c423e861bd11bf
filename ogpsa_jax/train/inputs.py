"""Everything a run reads before it writes anything: tokenizer, model folder, data, references.

`load_inputs` resolves ``assets:NAME`` sources, checks the model folder (``config.json`` and
the safetensors headers, no weights), loads the tokenizer, tokenises every stage's data and
builds the reference batches of every stage with OGPSA on. It checks the tokenizer against the
model (`check_tokenizer`) and that every data path exists (`check_sources`) first. Any problem is
a ValueError naming the folder, file, row or config field, raised before any compute.

Example:
    >>> from ogpsa_jax.train.presets import preset
    >>> inputs = load_inputs("sft", preset("tiny"))
    >>> len(inputs.encoded["sft"]), len(inputs.ref_groups["sft"])  # rows; one reference set
    (64, 1)
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open

from ogpsa_jax import data, logs, models
from ogpsa_jax.models import DecoderConfig
from ogpsa_jax.models.gguf import smollm2_cache_dir, smollm2_path
from ogpsa_jax.models.hf import hf_tensor_names
from ogpsa_jax.models.peft import check_peft, is_peft_folder, peft_base_folder
from ogpsa_jax.train.lora import adapter_tokenizer_folder, architecture, check_lora
from ogpsa_jax.train.schema import DPOConfig, SFTConfig, StageConfig, TrainConfig, stages_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What `load_inputs` read: the same for every stage of a run."""

    tokenizer: Any  # a transformers tokenizer
    pad_id: int  # its padding token id
    model_path: str | None  # the HF folder to start from (None: random init)
    encoded: dict[str, list]  # stage -> encoded examples (SFT) or pairs (DPO)
    ref_groups: dict[str, list]  # stage -> reference sets, each a list of host batches


# Files of which a folder holding a transformers tokenizer has at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def resolve_assets(source: str) -> str:
    """``assets:NAME`` -> the shipped file's path; anything else unchanged.

    Example:
        >>> resolve_assets("assets:general.jsonl").endswith("general.jsonl")
        True
    """
    if source.startswith("assets:"):
        return str(data.assets_path(source.removeprefix("assets:")))
    return source


def model_path(config: TrainConfig) -> str | None:
    """The checked HF folder of ``model.path`` (None: a random init of ``model.arch``).

    ``smollm2`` is converted on first use into the cache folder (`smollm2_cache_dir`).

    A PEFT adapter folder is accepted too: the model is then its base with the adapter merged
    (`ogpsa_jax.train.lora.load_start`); its base folder and the adapter are checked here.

    Raises:
        ValueError: the folder is missing or malformed (see `check_model_folder`), or an
            adapter folder does not fit its base.
    """
    path = config.model.path
    if not path:
        return None
    if path == "smollm2":
        cache = smollm2_cache_dir()
        if not cache.is_dir():
            logger.info(
                "model.path=smollm2: converting the GGUF once into %s (about 540 MB; set "
                "OGPSA_CACHE to put it elsewhere)",
                cache,
            )
        return str(smollm2_path())
    path = os.path.expanduser(path)
    if is_peft_folder(path):
        check_model_folder(peft_base_folder(path))
        check_peft(path, architecture(config, path))
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        what = "has no config.json" if os.path.isdir(path) else "not found"
        raise ValueError(
            f"model folder {path!r} {what} (config field model.path: a local Hugging Face "
            "folder; fetch one with `huggingface-cli download ORG/NAME --local-dir DIR`)"
        )
    check_model_folder(path)
    return path


def model_config(config: TrainConfig, path: str | None, tokenizer: Any) -> DecoderConfig:
    """The decoder config a run will build: ``path``'s config.json, or ``model.arch`` (the
    tiny architecture takes the tokenizer's size)."""
    if path is not None:
        folder = peft_base_folder(path) if is_peft_folder(path) else path
        with open(os.path.join(folder, "config.json")) as f:
            return DecoderConfig.from_hf(json.load(f))
    if config.model.arch == "tiny":
        return models.tiny_config(vocab_size=len(tokenizer))
    return getattr(models, f"{config.model.arch}_config")()


def check_model_folder(path: str) -> None:
    """Reads config.json and the safetensors headers (no weights).

    Raises:
        ValueError: naming the folder: config.json malformed or of an unsupported
            architecture, weight files unreadable, or tensors missing.
    """
    try:
        with open(os.path.join(path, "config.json")) as f:
            raw = json.load(f)
        model_cfg = DecoderConfig.from_hf(raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"model folder {path!r}: config.json is malformed: {e}") from None
    index, single = os.path.join(path, "model.safetensors.index.json"), "model.safetensors"
    try:
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [single]
        names = set()
        for name in files:
            with safe_open(os.path.join(path, name), framework="numpy") as f:
                names |= set(f.keys())
    except Exception as e:  # missing file, bad JSON, or safetensors' own error for a bad header
        raise ValueError(f"model folder {path!r}: cannot read the weights: {e}") from None
    missing = sorted(set(hf_tensor_names(model_cfg)) - names)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ValueError(f"model folder {path!r}: missing tensors {missing[:5]}{more}")


def tokenizer_folder(config: TrainConfig, model_path: str | None) -> str:
    """The folder `load_tokenizer` reads: ``model.tokenizer``, else the model folder, else (a
    random init) the shipped tiny tokenizer.

    Example:
        >>> from ogpsa_jax.train.schema import TrainConfig
        >>> tokenizer_folder(TrainConfig(), None).endswith("tiny_tokenizer")
        True
    """
    name = config.model.tokenizer or adapter_tokenizer_folder(model_path) or "tiny"
    if name == "tiny":
        return resolve_assets("assets:tiny_tokenizer")
    return os.path.expanduser(name)


def load_tokenizer(config: TrainConfig, model_path: str | None) -> Any:
    """The tokenizer of `tokenizer_folder`.

    Raises:
        ValueError: the folder does not exist, holds no tokenizer files, or does not load.
    """
    # function-local: transformers takes seconds to import
    from transformers import AutoTokenizer

    name = tokenizer_folder(config, model_path)
    field = "model.tokenizer" if config.model.tokenizer else "model.path"
    if not os.path.isdir(name):
        raise ValueError(f"tokenizer folder {name!r} not found (config field {field})")
    if not any(os.path.isfile(os.path.join(name, f)) for f in TOKENIZER_FILES):
        raise ValueError(
            f"folder {name!r} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "copy the tokenizer files into it or point model.tokenizer at a folder that has them"
        )
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the tokenizer from {name!r}: {e}") from e


def check_tokenizer(tokenizer: Any, model_cfg: DecoderConfig, where: str) -> None:
    """The tokenizer fits the model: every token id has an embedding row, the special tokens
    are in range, and a chat template renders the conversations.

    Args:
        tokenizer: the run's tokenizer.
        model_cfg: the decoder config of the model it feeds.
        where: the tokenizer's folder, for messages.

    Raises:
        ValueError: naming the mismatch, before any compute.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from ogpsa_jax.models import tiny_config
        >>> tok = AutoTokenizer.from_pretrained(resolve_assets("assets:tiny_tokenizer"))
        >>> check_tokenizer(tok, tiny_config(vocab_size=len(tok)), "tiny")
        >>> check_tokenizer(tok, tiny_config(vocab_size=10), "tiny")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: tokenizer 'tiny' has ... tokens but the model's embedding has 10 rows ...
    """
    rows, n = model_cfg.vocab_size, len(tokenizer)
    if n > rows:
        raise ValueError(
            f"tokenizer {where!r} has {n} tokens but the model's embedding has {rows} rows "
            "(vocab_size): ids beyond it have no embedding and every step would be non-finite; "
            'use the model\'s own tokenizer (model.tokenizer="") or a matching one'
        )
    for name in ("pad_token", "eos_token", "bos_token"):
        token_id = getattr(tokenizer, f"{name}_id", None)
        if isinstance(token_id, int) and not 0 <= token_id < rows:
            raise ValueError(
                f"tokenizer {where!r}: {name} id {token_id} is outside the model's "
                f"embedding (vocab_size {rows})"
            )
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise ValueError(f"tokenizer {where!r} has no eos token (the end of an assistant turn)")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {where!r} has no chat template (chat_template in tokenizer_config.json "
            "or chat_template.jinja): every example is rendered with it"
        )


def reference_source(source: str, stage: str, rows: int) -> Any:
    """DPO stage: preference sources give NLL on chosen and rejected; SFT files are used as is."""
    path = resolve_assets(source)
    if stage != "dpo":
        return path
    try:
        return data.load_preferences(path, limit=rows)
    except ValueError as e:
        logger.info("reference %s has no preference pairs (%s); using it as SFT data", path, e)
        return path


def check_sources(command: str, config: TrainConfig) -> None:
    """Every data and reference source names an existing local path or a hub id (read only).

    Raises:
        ValueError: naming the config field and the missing file.
    """
    for stage in stages_of(command):
        st: StageConfig = getattr(config, stage)
        named = [(f"{stage}.data", st.data)]
        if st.ogpsa.enabled:
            named += [(f"{stage}.ogpsa.reference", s) for s in st.ogpsa.reference]
        for field, source in named:
            try:
                data.source_kind(resolve_assets(source))
            except ValueError as e:
                raise ValueError(f"config field {field!r}: {e}") from None


def _encode_stage(tok: Any, stage: str, st: StageConfig, system: str | None) -> list:
    src = resolve_assets(st.data)
    limit = st.limit or None
    common = dict(max_length=st.max_length, truncation=st.truncation, system_prompt=system)
    if isinstance(st, SFTConfig):
        examples = data.load_sft(src, split=st.split, limit=limit)
        return data.tokenize_sft(tok, examples, train_turns=st.train_turns, **common)
    assert isinstance(st, DPOConfig)
    pairs = data.load_preferences(
        src, split=st.split, limit=limit, safe_pairs_only=st.safe_pairs_only
    )
    return data.tokenize_preferences(tok, pairs, **common)


def _reference_groups(tok: Any, stage: str, st: StageConfig, system: str | None) -> list:
    og = st.ogpsa
    return data.reference_batches(
        [reference_source(s, stage, og.reference_rows) for s in og.reference],
        tokenizer=tok,
        batch_size=og.reference_batch_size,
        max_length=st.max_length,
        n=og.reference_rows,
        system_prompt=system,
        buckets=(st.max_length,),
    )


def load_inputs(command: str, config: TrainConfig) -> Inputs:
    """Loads and checks everything the stages of ``command`` read.

    Args:
        command: "sft", "dpo" or "sft-dpo".
        config: the validated run config.

    Returns:
        The `Inputs`.

    Raises:
        ValueError: naming the bad model folder, tokenizer, data source, row or field.
    """
    check_sources(command, config)
    path = model_path(config)
    check_lora(config, path)
    tok = load_tokenizer(config, path)
    check_tokenizer(tok, model_config(config, path, tok), tokenizer_folder(config, path))
    pad_id = data.pad_token_id(tok)
    system = config.model.system_prompt or None
    encoded, refs = {}, {}
    for stage in stages_of(command):
        st: StageConfig = getattr(config, stage)
        with logs.stage(stage):
            encoded[stage] = _encode_stage(tok, stage, st, system)
            if st.ogpsa.enabled:
                refs[stage] = _reference_groups(tok, stage, st, system)
    return Inputs(
        tokenizer=tok,
        pad_id=pad_id,
        model_path=path,
        encoded=encoded,
        ref_groups=refs,
    )
