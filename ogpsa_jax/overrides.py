"""Dataclass configs from the command line: dotted ``field=value`` overrides, a JSON round trip
and type checks, for any frozen dataclass config (training runs and experiments alike).

Values are parsed by the field annotations (``bool``, ``int``, ``float``, ``str``, optional
types, fixed and variable-length tuples such as ``mesh=2,4,1`` or ``reference=a.jsonl,b.jsonl``;
a string may be JSON-quoted, ``path=""``); an unknown field names the closest matches.

Example:
    >>> import dataclasses
    >>> @dataclasses.dataclass(frozen=True, kw_only=True)
    ... class Cfg:
    ...     steps: int = 1
    ...     tags: tuple[str, ...] = ()
    >>> apply_overrides(Cfg(), ["steps=3", "tags=a,b"])
    Cfg(steps=3, tags=('a', 'b'))
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Sequence
from typing import Any


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_names(cls: type, prefix: str = "") -> list[str]:
    """All dotted field names of a config dataclass (leaves and sub-configs).

    Example:
        >>> @dataclasses.dataclass
        ... class A:
        ...     x: int = 0
        >>> field_names(A)
        ['x']
    """
    names = []
    for name, tp in _field_types(cls).items():
        names.append(prefix + name)
        if dataclasses.is_dataclass(tp):
            names += field_names(tp, prefix + name + ".")
    return names


def _parse_scalar(text: str, tp: Any, name: str) -> Any:
    if tp is bool:
        low = text.strip().lower()
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{name}: expected an int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"{name}: expected a float, got {text!r}") from None
    if tp is str:  # a JSON-quoted string ("" = empty, as `ogpsa config show` prints it)
        if len(text) >= 2 and text[0] == text[-1] == '"':
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                raise ValueError(f"{name}: malformed quoted string {text!r}") from None
        return text
    raise ValueError(f"{name}: cannot parse a value of type {tp}")


def parse_value(text: str, tp: Any, name: str) -> Any:
    """Parses ``text`` as a value of the annotation ``tp`` (``name`` is used in errors).

    Example:
        >>> parse_value("2,4,1", tuple[int, int, int], "mesh")
        (2, 4, 1)
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if text.strip().lower() in ("none", "null"):
            return None
        return parse_value(text, args[0], name)
    if origin is tuple:
        args = typing.get_args(tp)
        text = text.strip()
        if text.startswith("["):
            items = [str(x) for x in json.loads(text)]
        else:
            items = [s.strip() for s in text.strip("()").split(",") if s.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_parse_scalar(s, args[0], name) for s in items)
        if len(items) != len(args):
            raise ValueError(f"{name}: expected {len(args)} comma-separated values, got {text!r}")
        return tuple(_parse_scalar(s, a, name) for s, a in zip(items, args, strict=True))
    return _parse_scalar(text, tp, name)


def _set_path(obj: Any, path: list[str], text: str, full: str, root: type) -> Any:
    hints = _field_types(type(obj))
    head = path[0]
    if head not in hints:
        known = field_names(type(obj))
        leaf = full.rsplit(".", 1)[-1]  # the same field elsewhere first (sft.beta -> dpo.beta)
        close = [n for n in field_names(root) if n.rsplit(".", 1)[-1] == leaf]
        close += difflib.get_close_matches(full, field_names(root), n=3) or (
            difflib.get_close_matches(head, known, n=3)
        )
        close = list(dict.fromkeys(close))[:3]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown config field {full!r}{hint}")
    tp = hints[head]
    if len(path) == 1:
        if dataclasses.is_dataclass(tp):
            raise ValueError(f"{full!r} is a group of fields; set one of its fields instead")
        return dataclasses.replace(obj, **{head: parse_value(text, tp, full)})
    if not dataclasses.is_dataclass(tp):
        raise ValueError(f"unknown config field {full!r}: {head!r} has no sub-fields")
    sub = _set_path(getattr(obj, head), path[1:], text, full, root)
    return dataclasses.replace(obj, **{head: sub})


def apply_overrides(config: Any, overrides: Sequence[str]) -> Any:
    """Applies ``dotted.field=value`` strings, parsing values by the field annotations.

    Args:
        config: a dataclass config (frozen or not; nested dataclasses are reached by dots).
        overrides: strings like ``"sft.ogpsa.k=4"``, ``"mesh=2,4,1"``, ``"model.dtype=bfloat16"``.

    Returns:
        The new config (not validated: that is the config's own business).

    Raises:
        ValueError: a malformed item, an unknown field (with the closest matches) or a value
            that does not parse as the field's type.

    Example:
        >>> @dataclasses.dataclass(frozen=True)
        ... class C:
        ...     lr: float = 1e-3
        >>> apply_overrides(C(), ["lr=3e-4"]).lr
        0.0003
    """
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects field=value, got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip()
        config = _set_path(config, key.split("."), text, key, type(config))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """JSON-ready dict of a dataclass config (tuples become lists).

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     t: tuple[int, ...] = (1, 2)
        >>> to_dict(C())
        {'t': [1, 2]}
    """
    return json.loads(json.dumps(dataclasses.asdict(config)))


def from_dict(data: dict[str, Any], cls: type) -> Any:
    """Inverse of `to_dict`; unknown keys are a ValueError.

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     t: tuple[int, ...] = ()
        >>> from_dict({"t": [1, 2]}, C)
        C(t=(1, 2))
    """
    hints = _field_types(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise ValueError(f"unknown config field {key!r} for {cls.__name__}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(value, tp)
        elif isinstance(value, list):
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def check_types(obj: Any, prefix: str = "") -> None:
    """Raises a ValueError naming the first field whose value does not match its annotation.

    Example:
        >>> @dataclasses.dataclass
        ... class C:
        ...     n: int = 0
        >>> check_types(C(n="3"))
        Traceback (most recent call last):
        ...
        ValueError: config field 'n': expected <class 'int'>, got '3'
    """
    for name, tp in _field_types(type(obj)).items():
        value = getattr(obj, name)
        full = prefix + name
        if dataclasses.is_dataclass(tp):
            check_types(value, full + ".")
            continue
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            if value is None:
                continue
            tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
            origin = typing.get_origin(tp)
        if origin is tuple:
            args = typing.get_args(tp)
            elem = args[0]
            ok = isinstance(value, tuple) and all(
                isinstance(v, elem) and not (elem is int and isinstance(v, bool)) for v in value
            )
            if ok and not (len(args) == 2 and args[1] is Ellipsis):
                ok = len(value) == len(args)
        elif tp is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, tp)
        if not ok:
            raise ValueError(f"config field {full!r}: expected {tp}, got {value!r}")
