"""Everything a run reads before it writes anything: tokenizer, model folder, data, references.

`load_inputs` resolves ``assets:NAME`` sources, checks the model folder (``config.json`` and
the safetensors headers, no weights), loads the tokenizer, tokenises every stage's data and
builds the reference batches of every stage with OGPSA on. Any problem is a ValueError naming
the folder, file, row or config field, raised before the output folder is touched.

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

from ogpsa_jax import data
from ogpsa_jax.models import DecoderConfig
from ogpsa_jax.models.gguf import smollm2_path
from ogpsa_jax.models.hf import hf_tensor_names
from ogpsa_jax.models.peft import check_peft, is_peft_folder, peft_base_folder
from ogpsa_jax.train.lora import architecture, check_lora, tokenizer_folder
from ogpsa_jax.train.schema import StageConfig, TrainConfig, stages_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    """What `load_inputs` read: the same for every stage of a run."""

    tokenizer: Any  # a transformers tokenizer
    pad_id: int  # its padding token id
    model_path: str | None  # the HF folder to start from (None: random init)
    encoded: dict[str, list]  # stage -> encoded examples (SFT) or pairs (DPO)
    ref_groups: dict[str, list]  # stage -> reference sets, each a list of host batches


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
    """The checked HF folder of ``model.init="hf"`` (None for a random init).

    A PEFT adapter folder is accepted too: the model is then its base with the adapter merged
    (`ogpsa_jax.train.lora.load_start`); its base folder and the adapter are checked here.

    Raises:
        ValueError: the folder is missing or malformed (see `check_model_folder`), or an
            adapter folder does not fit its base.
    """
    if config.model.init != "hf":
        return None
    if config.model.path == "smollm2":
        return str(smollm2_path())
    path = config.model.path
    if is_peft_folder(path):
        check_model_folder(peft_base_folder(path))
        check_peft(path, architecture(config, path))
        return path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model folder {path!r} not found or has no config.json")
    check_model_folder(path)
    return path


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


def load_tokenizer(config: TrainConfig, model_path: str | None) -> Any:
    """The tokenizer of ``model.tokenizer`` ("" = the model folder, "tiny" = the shipped one).

    Raises:
        ValueError: the folder does not exist or does not hold a tokenizer.
    """
    # function-local: transformers takes seconds to import
    from transformers import AutoTokenizer

    name = config.model.tokenizer or tokenizer_folder(model_path)
    if name == "tiny":
        name = resolve_assets("assets:tiny_tokenizer")
    if not name or not os.path.isdir(name):
        raise ValueError(f"tokenizer folder {name!r} not found (config field model.tokenizer)")
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as e:  # transformers raises many types for a malformed folder
        raise ValueError(f"cannot load the tokenizer from {name!r}: {e}") from e


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


def _encode_stage(tok: Any, stage: str, st: StageConfig, system: str | None) -> list:
    src = resolve_assets(st.data)
    limit = st.limit or None
    common = dict(max_length=st.max_length, truncation=st.truncation, system_prompt=system)
    if stage == "sft":
        return data.tokenize_sft(tok, data.load_sft(src, split=st.split, limit=limit), **common)
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
    path = model_path(config)
    check_lora(config, path)
    tok = load_tokenizer(config, path)
    pad_id = data.pad_token_id(tok)
    system = config.model.system_prompt or None
    encoded, refs = {}, {}
    for stage in stages_of(command):
        st: StageConfig = getattr(config, stage)
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
