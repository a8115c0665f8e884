"""Typed dataclasses from JSON objects, with errors that name the field (``data.label_names[2]``):
unknown fields get a close match suggested, values are checked against the field's type."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Literal

from medtl.errors import ConfigError


def field_error(name: str, msg: str) -> ConfigError:
    """The error for a bad value of config field ``name`` (a dotted path such as ``train.epochs``)."""
    return ConfigError(f"config field '{name}': {msg}")


def choices(values: typing.Iterable[Any]) -> str:
    return ", ".join(repr(v) for v in values)


def build_dataclass(cls: type, data: Any, prefix: str = "") -> Any:
    """An instance of the dataclass ``cls`` from a JSON object; nested dataclasses from nested
    objects, each value checked against its field's type. ``prefix``: the field path so far."""
    if not isinstance(data, dict):
        raise ConfigError(f"config field '{prefix or '<root>'}': expected an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config field '{where}' is unknown{hint}; allowed fields: {choices(names)}")
        kwargs[key] = _coerce(hints[key], value, where)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where + ".")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config field '{where}': {value!r} is not one of {choices(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config field '{where}': expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field '{where}': expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config field '{where}': expected a whole number, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config field '{where}': expected a number, got {value!r}")
        # Python's JSON reader accepts NaN and Infinity; either would train a NaN network.
        if not math.isfinite(value):
            raise ConfigError(f"config field '{where}': {value!r} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config field '{where}': expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {tp} at {where}")
