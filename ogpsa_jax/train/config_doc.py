"""The config reference page, generated from the config dataclasses and their field comments.

Every field of `TrainConfig` and its parts is listed with its ``--set`` name, type, default and
the comment written above it in `ogpsa_jax.train.schema`, so the page cannot drift from the
code: ``ogpsa config reference > docs/config.md`` writes it, and a test regenerates it and
compares. `config_lines` prints a resolved config as ``--set`` lines (``ogpsa config show``).

Example:
    >>> from ogpsa_jax.train.schema import ModelConfig
    >>> field_comments(ModelConfig)["dtype"]
    'Activation / matmul dtype (float32 | bfloat16).'
    >>> config_lines(ModelConfig())[:2]
    ['path = ""', 'arch = "tiny"']
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import typing
from typing import Any

from ogpsa_jax.train.schema import (
    DPOConfig,
    LoRASettings,
    ModelConfig,
    OGPSAConfig,
    SFTConfig,
    StageConfig,
    TrainConfig,
)


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines above it in the class body (a subclass's own comment
    wins over its base's).

    Args:
        cls: a dataclass whose fields have ``#`` comments above them.

    Returns:
        The comments, joined into one line each.
    """
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        source = textwrap.dedent(inspect.getsource(klass))
        lines = source.splitlines()
        body = ast.parse(source).body[0]
        for node in getattr(body, "body", []):
            if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
                continue
            comment, i = [], node.lineno - 2
            while i >= 0 and lines[i].strip().startswith("#"):
                comment.insert(0, lines[i].strip().lstrip("#").strip())
                i -= 1
            if comment:
                out[node.target.id] = " ".join(comment)
    return out


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def format_value(value: Any) -> str:
    """A field value as it is written after ``--set field=``, or a sub-config's constructor.

    Example:
        >>> format_value((1, -1, 1)), format_value(True), format_value("a|b")
        ('1,-1,1', 'true', '"a|b"')
    """
    if dataclasses.is_dataclass(value):
        base = type(value)()
        changed = [
            f"{f.name}={_literal(getattr(value, f.name))}"
            for f in dataclasses.fields(value)
            if getattr(value, f.name) != getattr(base, f.name)
        ]
        return f"{type(value).__name__}({', '.join(changed)})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(format_value(v).strip('"') for v in value)
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _literal(value: Any) -> str:
    return repr(value) if not dataclasses.is_dataclass(value) else format_value(value)


def config_lines(config: Any, prefix: str = "") -> list[str]:
    """``name = value`` for every leaf field of a config, in ``--set`` syntax.

    Args:
        config: a dataclass config.
        prefix: put before every name (used for nesting).

    Returns:
        The lines, in field order.
    """
    out = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out += config_lines(value, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name} = {format_value(value)}")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(cls: type, names: list[str], defaults: list[Any], headers: list[str]) -> list[str]:
    """Rows ``field | type | default... | meaning`` for the fields ``names`` of ``cls``."""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    out = [
        "| field | type | " + " | ".join(headers) + " | meaning |",
        "| --- | --- | " + " | ".join("---" for _ in headers) + " | --- |",
    ]
    for name in names:
        values = " | ".join(f"`{_cell(format_value(getattr(d, name)))}`" for d in defaults)
        kind = _cell(_type_name(hints[name]))
        out.append(f"| `{name}` | `{kind}` | {values} | {_cell(comments.get(name, ''))} |")
    return out


def _names(cls: type, exclude: type | None = None) -> list[str]:
    own = [f.name for f in dataclasses.fields(cls)]
    if exclude is None:
        return own
    base = {f.name for f in dataclasses.fields(exclude)}
    return [n for n in own if n not in base]


INTRO = """\
# Config reference

Every field of a training config, generated from `ogpsa_jax/train/schema.py` (the dataclasses
and the comment above each field) by `ogpsa config reference > docs/config.md`; a test keeps
this page equal to that output. Set a field with `--set NAME=VALUE` (`ogpsa train`) or
`ogpsa_jax.overrides.apply_overrides(config, ["NAME=VALUE"])`; print the resolved config of a
preset with `ogpsa config show --preset NAME [--set ...]`. Values are written as `--set` takes
them: tuples comma-separated (`mesh=2,4,1`), booleans `true`/`false`. The defaults below are
the dataclass defaults; a preset changes some of them ([training.md](training.md#presets)).
"""


def config_reference() -> str:
    """The Markdown reference page of every config field (docs/config.md).

    Returns:
        The page.
    """
    sft, dpo = SFTConfig(), DPOConfig()
    parts = [INTRO]

    def section(title: str, text: str, rows: list[str]) -> None:
        parts.append(f"## {title}\n\n{text}\n\n" + "\n".join(rows) + "\n")

    run_names = _names(TrainConfig)
    section(
        "TrainConfig: the run",
        "Fields without a prefix (`seed=1`, `mesh=1,8,1`).",
        _table(TrainConfig, run_names, [TrainConfig()], ["default"]),
    )
    section(
        "ModelConfig: the model",
        "Fields `model.*`.",
        _table(ModelConfig, _names(ModelConfig), [ModelConfig()], ["default"]),
    )
    section(
        "LoRASettings: low-rank adapters",
        "Fields `model.lora.*` (rank 0: no adapters, every weight trains).",
        _table(LoRASettings, _names(LoRASettings), [LoRASettings()], ["default"]),
    )
    section(
        "StageConfig: both stages",
        "Fields `sft.*` and `dpo.*`; the DPO stage has other defaults for a few.",
        _table(StageConfig, _names(StageConfig), [sft, dpo], ["sft", "dpo"]),
    )
    section(
        "SFTConfig: the SFT stage only",
        "Fields `sft.*` that the DPO stage does not have.",
        _table(SFTConfig, _names(SFTConfig, StageConfig), [sft], ["default"]),
    )
    section(
        "DPOConfig: the DPO stage only",
        "Fields `dpo.*` that the SFT stage does not have.",
        _table(DPOConfig, _names(DPOConfig, StageConfig), [dpo], ["default"]),
    )
    section(
        "OGPSAConfig: the capability subspace",
        "Fields `sft.ogpsa.*` and `dpo.ogpsa.*`.",
        _table(OGPSAConfig, _names(OGPSAConfig), [sft.ogpsa, dpo.ogpsa], ["sft", "dpo"]),
    )
    return "\n".join(parts)


__all__ = ["config_lines", "config_reference", "field_comments", "format_value"]
