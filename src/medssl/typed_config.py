"""Strict typed dataclasses from nested dicts (YAML), and dotted command-line overrides.

:func:`build_dataclass` builds a dataclass from a mapping, naming the dotted key of any unknown key or value of
the wrong type in a one-line :class:`~medssl.errors.ConfigError`. :mod:`medssl.config` builds its ``Config``
with it; pretraining methods build their option dataclasses with it (``pretrain.<section>``).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Union

import yaml

from medssl.errors import ConfigError

__all__ = ["build_dataclass", "deep_merge", "parse_overrides", "yaml_load"]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``3E5`` as floats (YAML 1.2); PyYAML's 1.1 rules need a dot."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _type_ok(value: Any, tp: Any) -> tuple[bool, Any]:
    """Check (and gently coerce) ``value`` against annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, v = _type_ok(value, arg)
            if ok:
                return True, v
        return False, value
    if tp is type(None):
        return value is None, value
    if origin is list:
        if isinstance(value, (list, tuple)):
            (arg,) = typing.get_args(tp) or (Any,)
            out = []
            for item in value:
                ok, v = _type_ok(item, arg)
                if not ok:
                    return False, value
                out.append(v)
            return True, out
        return False, value
    if origin is dict or tp is dict:
        return isinstance(value, dict), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value  # an int stays an int (e.g. split.val = 2 patients)
        return False, value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """Build dataclass ``cls`` from ``data`` strictly: unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"unknown config key '{prefix}{key}' (known: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp, value, dotted = hints[f.name], data[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build_dataclass(tp, value or {}, dotted + ".")
            continue
        ok, coerced = _type_ok(value, tp)
        if not ok:
            raise ConfigError(f"config key '{dotted}' expects {_type_name(tp)}, got {value!r}")
        kwargs[f.name] = coerced
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: list[str] | None) -> dict:
    """Turn ``["train.lr=1e-3", "data.size=64"]`` into a nested dict (values parsed as YAML)."""
    tree: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        try:
            value = yaml_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads on/off/yes/no as booleans: keep the word (train.amp=off)
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return tree
