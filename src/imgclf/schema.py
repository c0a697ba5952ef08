"""Typed, bounded dataclass fields and the builder that validates raw params against them.

At the bottom of the package (stdlib only), so that data sources, model kinds and records can validate themselves without
importing the whole configuration.

Every rejection is a ConfigError whose message names the dotted key and the offending value.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from typing import Any, Literal


class ConfigError(ValueError):
    """A params file or override that cannot be used; the message names the key."""


def check_plain_name(value: str | None, key: str) -> None:
    """A name that becomes folder names, URIs or search filters (a registered model, a study): letters, digits,
    '.', '_' and '-', at most 128, starting with a letter or digit. Never a path (no '/', no '..' alone), no quote
    that would break MLflow's search filters, no '@' that would make a models:/ URI ambiguous."""
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", value):
        raise ConfigError(f"{key}: letters, digits, '.', '_' and '-' only (at most 128, starting with a letter or "
                          f"digit), got {value[:80]!r}")


def bounded(default=dataclasses.MISSING, *, factory=None, **bounds):
    """A field with numeric bounds (gt, ge, lt, le) or min_len, checked on load."""
    if factory is not None:
        return field(default_factory=factory, metadata=bounds)
    return field(default=default, metadata=bounds)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value is False and "off" in args:  # YAML 1.1 reads an unquoted `off` as false: the documented value
            return "off"
        if value in args and type(value) is type(args[0]):
            return value
        raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}; got {_short(value)}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is dict:
        if isinstance(value, dict):
            return value
    else:  # pragma: no cover - a field type this loader was not taught
        raise TypeError(f"{key}: unsupported field type {tp}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_short(value)}")


_BOUNDS = {
    "gt": (lambda v, b: v > b, ">"),
    "ge": (lambda v, b: v >= b, ">="),
    "lt": (lambda v, b: v < b, "<"),
    "le": (lambda v, b: v <= b, "<="),
}


def build(cls: type, raw: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys, wrong types and bad values."""
    where = key or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_short(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            full = f"{key}.{k}" if key else str(k)
            raise ConfigError(f"{full}: unknown key (allowed under {where}: {', '.join(names)})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in raw:
            continue
        full = f"{key}.{f.name}" if key else f.name
        value = _coerce(hints[f.name], raw[f.name], full)
        for bound, (ok, sym) in _BOUNDS.items():
            if bound in f.metadata and value is not None and not ok(value, f.metadata[bound]):
                raise ConfigError(f"{full}: must be {sym} {f.metadata[bound]}, got {value!r}")
        if "min_len" in f.metadata and value is not None and len(value) < f.metadata["min_len"]:
            raise ConfigError(f"{full}: needs at least {f.metadata['min_len']} item(s), got {value!r}")
        kwargs[f.name] = value
    obj = cls(**kwargs)
    if hasattr(obj, "check"):
        try:
            obj.check(key)
        except ConfigError:
            raise
        except ValueError as exc:  # a model kind's own check (imgclf.models holds no ConfigError)
            raise ConfigError(str(exc)) from None
    return obj
