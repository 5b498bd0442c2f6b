"""Typed dataclass configs from TOML with command-line overrides.

Precedence: command line > TOML file > dataclass defaults. Unknown keys and values of the wrong
type are errors that name the key and the file, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from data_shards.config import ConfigError  # defined in the lowest layer; `trainer` users import it from here

T = TypeVar("T")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Build `cls` from a TOML file (optional) and `section.key=value` overrides."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from err
        source = str(path)
    for item in overrides or []:
        _apply_override(data, item)
    if overrides:
        source += " + command line"
    return from_dict(cls, data, source=source)


def _apply_override(data: dict[str, Any], item: str) -> None:
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {key!r} is a value, not a section")
    node[keys[-1]] = _parse_value(raw.strip())


def _parse_value(raw: str) -> Any:
    """Parse an override value as a TOML value; a bare word stays a string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config", prefix: str = "") -> T:
    """Recursively build dataclass `cls` from a plain dict, checking keys and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: [{prefix.rstrip('.')}] must be a table, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(prefix + k for k in unknown)
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{source}: unknown config key(s) {names}; known keys here: {known}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, source=source, key=prefix + name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: [{prefix.rstrip('.') or 'top level'}] {err}") from err


def _coerce(tp: Any, value: Any, *, source: str, key: str) -> Any:
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key + ".")
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, source=source, key=key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{source}: {key}={value!r} fits none of {tp}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{source}: {key}={value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        args = get_args(tp) or (Any,)
        if origin is tuple and Ellipsis not in args:  # tuple[float, float]: a fixed number of values
            if len(value) != len(args):
                raise ConfigError(f"{source}: {key} must hold {len(args)} values, got {value!r}")
            pairs = enumerate(zip(args, value, strict=True))
            return tuple(_coerce(a, v, source=source, key=f"{key}[{i}]") for i, (a, v) in pairs)
        items = [_coerce(args[0], v, source=source, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} must be a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key} has unsupported config type {tp}")


def to_dict(config: Any) -> dict[str, Any]:
    """The resolved config as plain JSON-able data."""
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as JSON (what actually ran, defaults included)."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n", encoding="utf-8")
