"""Typed configs: dataclasses <-> YAML, strict validation, dotted overrides, renamed keys.

Why this shape: a config file should read as a short diff from the defaults (a file may name a
``base:`` file it amends), map 1:1 onto dataclasses, and fail on any user error with one line that
names the key and where it came from (a file, or the command line), never a traceback. Each stage
declares its own sections (``train/config.py``, ``tokenizer/config.py``, ``evaluate/config.py``,
sections shared by both trainers in ``core``); this module is the one loader they all use. The
resolved config is a plain dict (``to_dict``) that travels inside every checkpoint and export, so
either alone rebuilds its model.

A root config class may list ``RENAMED = {old dotted key: new dotted key}``: a file or command line
that still uses an old key loads as if it named the new one, with one deprecation line per key;
stored configs (checkpoints, exports written before the rename) load the same way, silently.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import types
import typing
from dataclasses import field
from pathlib import Path
from typing import Any, Literal

import yaml

from mqscale.core.errors import ConfigError
from mqscale.core.storage import absolute

REPO_ROOT = Path(__file__).resolve().parents[2]
CLI = "command line"
log = logging.getLogger("mqscale.config")

__all__ = ["ConfigError", "setting", "load_config", "from_dict", "to_dict", "merged", "absolutize_paths",
           "resolve_path", "REPO_ROOT"]


def setting(default: Any, *, ge: float | None = None, gt: float | None = None,
            le: float | None = None, lt: float | None = None, doc: str = "") -> Any:
    """A config dataclass field: its default, a numeric range, and the one line the docs show."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- typed conversion


def _coerce(value: Any, tp: Any, key: str, err) -> Any:
    """Convert a YAML value to the annotated type, or report the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            err(key, f"must be a mapping of {tp.__name__} fields, got {_show(value)}")
        return _build(tp, value, key, err)
    if origin is Literal:
        if value not in args:
            err(key, f"{_show(value)} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) > 1 and isinstance(value, (list, tuple)):  # e.g. int | tuple[int, int]: the sequence
            seq = [a for a in inner if typing.get_origin(a) in (tuple, list)]
            if seq:
                return _coerce(value, seq[0], key, err)
        return _coerce(value, inner[0], key, err)
    if tp is bool:
        if not isinstance(value, bool):
            err(key, f"must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            err(key, f"must be an integer, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            err(key, f"must be a number, got {_show(value)}")
        if not math.isfinite(value):
            err(key, f"must be finite, got {value}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            err(key, f"must be a string, got {_show(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            err(key, f"must be a list of {len(args)} values, got {_show(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]", err) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            err(key, f"must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]", err) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            err(key, f"must be a mapping, got {_show(value)}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}", err) for k, v in value.items()}
    if tp is Any:
        return value
    raise TypeError(f"config type {tp!r} at {key} is not supported")  # a bug here, not a user error


def _show(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _build(cls: type, data: dict, prefix: str, err, defaults: Any = None) -> Any:
    """``cls`` from ``data``; keys it does not set keep their value in ``defaults`` (a section's
    default as its parent declares it, e.g. a tokenizer run's image-shard ``data``) or the class's."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            key = f"{prefix}.{k}" if prefix else str(k)
            close = difflib.get_close_matches(str(k), names, n=1)
            err(key, "unknown key" + (f" (did you mean {close[0]}?)" if close else ""))
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and isinstance(data[f.name], dict):
            section = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            v = _build(tp, data[f.name], key, err, section)
        else:
            v = _coerce(data[f.name], tp, key, err)
        _check_range(v, f.metadata, key, err)
        kwargs[f.name] = v
    return dataclasses.replace(defaults, **kwargs) if defaults is not None else cls(**kwargs)


def _check_range(v: Any, meta: Any, key: str, err) -> None:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return
    for op, bound, ok in (("ge", ">=", lambda a, b: a >= b), ("gt", ">", lambda a, b: a > b),
                          ("le", "<=", lambda a, b: a <= b), ("lt", "<", lambda a, b: a < b)):
        b = meta.get(op)
        if b is not None and not ok(v, b):
            err(key, f"{v} is out of range (must be {bound} {b})")


# --------------------------------------------------------------------------- loading


class _Reporter:
    """Turns (key, message) into a ConfigError naming the key and where it was set."""

    def __init__(self, origins: dict[str, str], default: str):
        self.origins, self.default = origins, default

    def __call__(self, key: str, msg: str):
        src = self.origins.get(key)
        if src is None:  # a key inside a mapping that was set as a whole, or a nested list item
            parts = key.replace("[", ".").split(".")
            for i in range(len(parts) - 1, 0, -1):
                src = self.origins.get(".".join(parts[:i]))
                if src:
                    break
        raise ConfigError(f"{src or self.default}: {key}: {msg}")


def _record(d: dict, src: str, origins: dict, prefix: str = "") -> None:
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        origins[key] = src
        if isinstance(v, dict):
            _record(v, src, origins, key)


def merged(base: dict, extra: dict, opaque: frozenset[str] | set[str] = frozenset()) -> dict:
    """``base`` updated by ``extra``, nested mappings merged key by key (a new dict; neither input
    changes). Mappings under an ``opaque`` key are user data: replaced whole, not merged."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in opaque:
            out[k] = merged(out[k], v, opaque)
        else:
            out[k] = v
    return out


# mappings whose contents are user data, replaced whole rather than merged key by key
_OPAQUE = frozenset({"storage_options", "resources_per_worker"})


def _nested_pop(data: dict, parts: list[str]) -> tuple[bool, Any]:
    node = data
    for p in parts[:-1]:
        node = node.get(p)
        if not isinstance(node, dict):
            return False, None
    if parts[-1] not in node:
        return False, None
    return True, node.pop(parts[-1])


def _nested_set(data: dict, parts: list[str], value: Any, src: str) -> None:
    node = data
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{src}: {'.'.join(parts)}: {p} is not a section")
        node = nxt
    node[parts[-1]] = value


def _rename(data: dict, renamed: dict[str, str], src: str, warn: bool) -> dict:
    """Old keys of one source (a file, the overrides, a stored config) moved to their new names."""
    for old, new in renamed.items():
        found, value = _nested_pop(data, old.split("."))
        if not found:
            continue
        already, _ = _nested_pop(data, new.split("."))
        if already:
            raise ConfigError(f"{src}: {old}: the old name of {new}, which is set too; keep only {new}")
        _nested_set(data, new.split("."), value, src)
        if warn:
            log.warning("%s: %s is deprecated, read as %s (rename it)", src, old, new)
    return data


def _read_yaml(path: Path, origins: dict, renamed: dict[str, str], seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(f"{path}: base: cycle through {' -> '.join(map(str, seen + (path,)))}")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); is it a YAML file?") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    base = data.pop("base", None)
    inherited: dict = {}
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: must be a path string, got {_show(base)}")
        inherited = _read_yaml((path.parent / base).resolve(), origins, renamed, seen + (path,))
    data = _rename(data, renamed, str(path), warn=True)
    _record(data, str(path), origins)
    return merged(inherited, data, _OPAQUE)


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or else relative to the repository (so configs/... works anywhere)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text or text.startswith("="):
        raise ConfigError(f"{CLI}: {text!r}: overrides look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str], origins: dict, renamed: dict[str, str]) -> dict:
    for text in overrides:
        parts, value = parse_override(text)
        key = ".".join(parts)
        if key in renamed:
            log.warning("%s: %s is deprecated, read as %s (rename it)", CLI, key, renamed[key])
            key = renamed[key]
            parts = key.split(".")
        _nested_set(data, parts, value, CLI)
        _record({key: value}, CLI, origins)
    return data


def _renamed(root: type) -> dict[str, str]:
    return dict(getattr(root, "RENAMED", {}))


def from_dict(data: dict, source: str, root: type, origins: dict[str, str] | None = None) -> Any:
    """Build and validate a config of class ``root`` (a run's top-level dataclass) from a plain
    dict: a stored config (its old key names read silently as the new ones), or the loader's.
    Every user error raises ConfigError naming the key and its source."""
    data = _rename(merged({}, data), _renamed(root), source, warn=False)
    err = _Reporter(origins or {}, source)
    cfg = _build(root, data, "", err)
    for section in [cfg] + [getattr(cfg, f.name) for f in dataclasses.fields(cfg)]:
        if hasattr(section, "check"):
            section.check(err)
    return cfg


def load_config(path: str | Path | None, overrides: list[str] | None, root: type) -> Any:
    """A config of class ``root`` from a YAML file (None: the defaults) and dotted overrides."""
    origins: dict[str, str] = {}
    data: dict = {}
    source = CLI
    renamed = _renamed(root)
    if path is not None:
        p = resolve_path(path)
        source = str(p)
        data = _read_yaml(p.resolve() if p.exists() else p, origins, renamed)
        origins = {k: (source if v == str(p.resolve()) else v) for k, v in origins.items()}
    apply_overrides(data, list(overrides or []), origins, renamed)
    return from_dict(data, source, root, origins)


def to_dict(cfg: Any) -> dict:
    """Plain, YAML/JSON-safe dict of a config (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def absolutize_paths(cfg: Any) -> None:
    """Make the local paths among the root's ``PATHS`` (dotted keys) absolute, in place: Ray
    workers run in directories of their own, where a relative path means something else."""
    for key in getattr(type(cfg), "PATHS", ()):
        *sections, name = key.split(".")
        node = cfg
        for s in sections:
            node = getattr(node, s)
        setattr(node, name, absolute(getattr(node, name)))
