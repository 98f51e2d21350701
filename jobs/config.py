"""Strict loading of typed, frozen dataclass configs from YAML, with `--set a.b=c` overrides.

An unknown key, a wrong type or a missing file is one ConfigError line that names the key and
the file. YAML is always safe-loaded. Supported field types: bool, int, float, str, None
unions (`X | None`), Literal, tuple[X, ...], dict[str, X] and nested dataclasses.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar

import yaml

from shards.format import ShardError

T = TypeVar("T")


class ConfigError(ShardError):
    """A user-fixable config problem; subclasses ShardError so the CLI prints it as one line."""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return build(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        vt = args[1] if args else Any
        return {str(k): _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def build(cls: type[T], data: Mapping[str, Any], where: str = "") -> T:
    """Construct dataclass `cls` from a mapping, strictly (unknown keys and bad types fail)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{prefix}{key}: unknown key; {cls.__name__} has {sorted(fields)}")
        kwargs[key] = _convert(value, hints[key], f"{prefix}{key}")
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: required key missing")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # __post_init__ checks of the config itself
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """A dataclass config as plain YAML-able data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(cls: type, data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each `a.b=c` in a copy of `data`, checking every path segment against the dataclasses."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        path, value = parse_override(item)
        node, tp = data, cls
        for i, part in enumerate(path):
            names = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else None
            if names is not None and part not in names:
                raise ConfigError(f"--set {'.'.join(path[:i + 1])}: unknown key; {tp.__name__} has {sorted(names)}")
            last = i == len(path) - 1
            if last:
                node[part] = value
                break
            tp = typing.get_type_hints(tp)[part] if names is not None else Any
            tp = next((a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)), tp)
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {'.'.join(path[:i + 1])}: is a value, not a section")
    return data


def read_yaml(path: Path) -> Any:
    """Safe-load a YAML file; a syntax error is one ConfigError naming the file and line."""
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); give a YAML file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory; give a YAML file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML ({getattr(e, 'problem', e)})") from None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys ({'a': {'b': 1}} -> {'a.b': 1})."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def load(cls: type[T], path: Path | None = None, overrides: list[str] | None = None,
         base: Mapping[str, Any] | None = None) -> T:
    """Load `cls` from YAML `path` (optional) on top of `base`, then apply overrides."""
    data: dict[str, Any] = dict(base or {})
    where = "--set"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        loaded = read_yaml(path)
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        data = _merge(data, loaded)
        where = str(path)
    data = apply_overrides(cls, data, overrides or [])
    try:
        return build(cls, data)
    except ConfigError as e:
        msg = str(e)
        blamed = [o for o in overrides or [] if _names(msg, o.partition("=")[0])]
        if blamed:  # the bad value came from the command line, not the file
            where = "command line (" + ", ".join(blamed) + ")"
        raise ConfigError(f"{where}: {msg}") from None


def _names(msg: str, key: str) -> bool:
    """Does a build error name the override's key? Field errors start with the dotted key; a
    section's own check (__post_init__) starts with the section and names the field in its text."""
    if any(msg.startswith(key + c) for c in ":.["):
        return True
    section, _, text = msg.partition(":")
    field = key.rsplit(".", 1)[-1]
    return key.startswith(section + ".") and re.search(rf"(?<!\w){re.escape(field)}(?!\w)", text) is not None


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, Mapping) and isinstance(out.get(k), Mapping) else v
    return out


def dump(cfg: Any, path: Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
