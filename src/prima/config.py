"""Configuration: dataclass schemas, YAML files with `base:` inheritance, dotted overrides, validation.

A preset is a YAML file; ``base: other.yaml`` (relative to the file) is loaded first and the file's
keys are merged over it, recursively. Overrides such as ``model.cross_image=pooling`` are applied
last, their values parsed as YAML (``train.lr=1e-3`` is a float, as in YAML 1.2). Unknown keys and wrong
types are errors that name the key path and the file. The resolved config is saved (``save_config``) with
every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from prima.errors import PrimaError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(PrimaError):
    pass


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader reading numbers as YAML 1.2 does: ``1e-3`` and ``5E+8`` are floats (YAML 1.1, PyYAML's
    rule, wants a dot, ``1.0e-3``, and reads ``1e-3`` as the string '1e-3', which a float key then rejected)."""


_Loader.add_implicit_resolver(  # on a copy of SafeLoader's table (PyYAML copies it for a subclass)
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    """A YAML document (a config file, an override's value) as plain Python values; ``1e-3`` is a float."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: plain values only


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def resolve_config_path(path: str | Path) -> Path:
    """A config path as given, or a preset name (``tiny``) looked up in the repository's ``configs/``."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (CONFIG_DIR / p, CONFIG_DIR / f"{p}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file not found: {path}")


def load_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """Read a YAML config and everything it inherits through ``base:``, merged into one dict."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'base:' chain loops back to itself")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    merged: dict = {}
    for b in bases:
        merged = _merge(merged, load_yaml_tree(path.parent / b, (*_seen, path)))
    return _merge(merged, data)


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict."""
    tree = _merge({}, tree)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.path=value")
        key, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw)
        except yaml.YAMLError:
            value = raw
        node = tree
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = value
    return tree


def _check_type(value: Any, tp: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check_type(value, arm, key, source)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:  # one arm besides None (an optional section or value): its own error says more
            raise ConfigError(errors[0])
        raise ConfigError(f"{source}: '{key}' = {value!r} has the wrong type (expected {tp})")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, prefix=key)
    if origin in (list, tuple, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_check_type(v, item_tp, f"{key}[{i}]", source) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' expects true or false, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp) or tp is int and isinstance(value, bool):
        raise ConfigError(f"{source}: '{key}' expects {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: Any, *, source: str = "config", prefix: str = "") -> T:
    """Build dataclass ``cls`` from a dict, rejecting unknown keys and wrong types by their key path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: '{prefix or '<root>'}' expects a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{source}: unknown key '{where}{unknown[0]}' (known keys here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _check_type(value, hints[name], f"{prefix}.{name}" if prefix else name, source)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """A config dataclass as plain dicts/lists (what `save_config` writes)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load ``cls`` from a YAML file (with bases) plus dotted overrides; no file means all defaults."""
    tree = load_yaml_tree(path) if path is not None else {}
    tree = apply_overrides(tree, overrides)
    return from_dict(cls, tree, source=str(path) if path else "overrides")


def save_config(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False), encoding="utf-8")
