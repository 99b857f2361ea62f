"""The one config engine: YAML mappings and ``--set`` overrides into dataclasses, with one-line
errors naming the dotted key. Training configs (config.py) and search spaces (search_space.py)
both use it."""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from .errors import InputError

NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")  # YAML 1.1 reads 1e-4 as a string


class ConfigError(InputError):
    """A bad configuration value or key; the message names the key."""


def unknown_key(key: str, prefix: str, names: list[str]) -> ConfigError:
    """The one message for a key that does not exist, with the closest existing one."""
    close = difflib.get_close_matches(str(key), names, n=1)
    hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
    return ConfigError(f"unknown key {prefix}{key}{hint}")


def check_keys(raw: dict[str, Any], names: list[str], prefix: str = "") -> None:
    """Raise :func:`unknown_key` for the first key of ``raw`` that is not in ``names``."""
    for key in raw:
        if key not in names:
            raise unknown_key(key, prefix, names)


def coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` as ``kind`` (bool, int, float, str, or a list of one of them). An int is taken for
    a float, an integral float for an int, and a numeric string for a float."""
    if typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        if isinstance(value, (list, tuple)):
            return [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise ConfigError(f"{key}: expected a list of {item.__name__}, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config type {kind}")
    raise ConfigError(f"{key}: expected {kind.__name__}, got {value!r}")


def from_mapping(cls: type, raw: Any, prefix: str = "") -> Any:
    """The dataclass ``cls`` built from a mapping (None: its defaults). Nested dataclass fields
    recurse and scalars are coerced; ``prefix`` is the dotted path of ``raw`` (ending in a dot)."""
    if raw is None:
        return cls()
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    check_keys(raw, names, prefix)
    values = {}
    for name in names:
        if name in raw:
            kind = hints[name]
            values[name] = (from_mapping(kind, raw[name], f"{prefix}{name}.") if dataclasses.is_dataclass(kind)
                            else coerce(raw[name], kind, prefix + name))
    return cls(**values)


def field_type(cls: type, dotted: str, prefix: str = "") -> type:
    """The type of the dotted key ``dotted`` in dataclass ``cls`` (a dataclass for a section);
    errors name the key as ``prefix + dotted``."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        where = prefix + "".join(p + "." for p in parts[:i])
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{prefix}{dotted}: {where[len(prefix):-1]} is not a section")
        names = [f.name for f in dataclasses.fields(cls)]
        if part not in names:
            raise unknown_key(part, where, names)
        cls = typing.get_type_hints(cls)[part]
    return cls


def check(ok: bool, key: str, message: str, value: Any) -> None:
    """The one validation step: unless ``ok``, ConfigError ``key: message, got value``."""
    if not ok:
        raise ConfigError(f"{key}: {message}, got {value!r}")


class Missing:
    """A key's value in ``differences`` where one side lacks the key."""

    def __repr__(self) -> str:
        return "(unset)"


MISSING = Missing()


def differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Every dotted key whose value differs between the nested mappings ``a`` and ``b``, as
    (key, value in a, value in b), MISSING for a side without it; in ``a``'s key order, then the
    keys only ``b`` has. Mappings on both sides are compared key by key, anything else as a value."""
    found = []
    for key in dict.fromkeys([*a, *b]):
        mine, theirs = a.get(key, MISSING), b.get(key, MISSING)
        if isinstance(mine, dict) and isinstance(theirs, dict) and (mine or theirs):
            found += differences(mine, theirs, f"{prefix}{key}.")
        elif (key in a, mine) != (key in b, theirs):
            found.append((f"{prefix}{key}", mine, theirs))
    return found


def first_difference(a: Any, b: Any) -> str | None:
    """The first dotted key in which ``a`` and ``b`` differ (``(top level)`` for unequal
    non-mappings), or None."""
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return None if a == b else "(top level)"
    found = differences(a, b)
    return found[0][0] if found else None


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested mapping as ``{"dotted.key": value}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """``tree[a][b][c] = value`` for ``"a.b.c"``, creating sections as needed."""
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[last] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a raw mapping; returns a copy."""
    raw = dict(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {key}: value {text!r} is not valid YAML ({err.__class__.__name__})") from None
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part} is not a section")
            node[part] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml_mapping(path: str | os.PathLike, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (safe loader); ``what`` names the file in one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {str(path)!r}{where}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{what} {str(path)!r}: expected a mapping at top level")
    return raw
