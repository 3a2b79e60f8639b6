"""Load a typed run configuration from a YAML recipe plus ``key.sub=value`` overrides.

The dataclass tree in :mod:`medfoundry.config.schema` is the single source of truth: a recipe is
one flat YAML document validated against it (no stacking of files), and command-line overrides are
applied on top. Unknown keys and wrong types raise :class:`ConfigError`, whose message names the
source, the dotted key, the offending value and the nearest valid key. After loading, every value is
checked (:mod:`medfoundry.config.checks`: finite numbers, ranges, registered names); whether files exist
is checked when a run starts (:func:`medfoundry.train.input_paths.check_paths`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from medfoundry.config.checks import check_cross_fields, check_names, check_values
from medfoundry.config.schema import RunConfig
from medfoundry.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override does not fit the schema; the message says what to change."""


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build a :class:`RunConfig` from defaults, an optional YAML recipe and dotted overrides.

    Overrides have the form ``a.b.c=value``; the value is parsed as YAML (so ``true``, ``3``,
    ``[0.5, 1.0]`` and ``null`` work) and then coerced to the field's declared type.
    """
    cfg = RunConfig()
    origins: dict[str, str] = {}  # dotted key -> the recipe or override that set it, for error messages
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path} (list bundled recipes with `medfoundry recipes`)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of config sections, got {type(data).__name__}")
        apply_mapping(cfg, data, source=str(path), origins=origins)
    for item in overrides:
        key, value = parse_override(item)
        apply_override(cfg, key, value, source=f"override '{item}'", origins=origins)
    validate(cfg, origins)
    return cfg


def split_override(item: str, kind: str = "override", form: str = "key.sub=value") -> tuple[str, str]:
    """Split ``key.sub=raw`` into the stripped dotted key and the raw text; errors name ``item`` and ``form``."""
    if "=" not in item:
        raise ConfigError(f"{kind} '{item}' must look like {form}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{kind} '{item}' has an empty key")
    return key, raw


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` into the dotted key and its YAML-parsed value."""
    key, raw = split_override(item)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(cfg: Any, dotted: str, value: Any, source: str, origins: dict[str, str] | None = None) -> None:
    """Set one dotted key; an unknown key is reported in full with the nearest valid key."""
    parts = dotted.split(".")
    node = cfg
    for _i, part in enumerate(parts[:-1]):
        child = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if child is None or not dataclasses.is_dataclass(child):
            raise ConfigError(
                f"{source}: unknown key '{dotted}' (value {value!r}); nearest valid key: '{_nearest(dotted)}'"
            )
        node = child
    apply_mapping(node, {parts[-1]: value}, source, prefix=".".join(parts[:-1]) + "." if parts[:-1] else "",
                  origins=origins)


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, leaves and sections, for suggestions and docs."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        ftype = _resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, name + "."))
    return keys


def _nearest(key: str) -> str:
    candidates = all_keys()
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    if close:
        return close[0]
    return ""


def apply_mapping(obj: Any, data: dict, source: str, prefix: str = "", origins: dict[str, str] | None = None) -> None:
    """Set fields of dataclass ``obj`` from ``data`` recursively, strictly typed; ``origins[key] = source``."""
    hints = _resolved_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{dotted}' (value {value!r}); nearest valid key: '{_nearest(dotted)}'"
            )
        ftype = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: '{dotted}' is a section; give a mapping of its keys, not {value!r}"
                )
            apply_mapping(current, value, source, dotted + ".", origins)
        else:
            setattr(obj, key, coerce(value, ftype, dotted, source))
            if origins is not None:
                origins[dotted] = source


def coerce(value: Any, ftype: Any, key: str, source: str) -> Any:
    """Convert ``value`` to the declared field type or raise :class:`ConfigError` naming the key."""
    origin = get_origin(ftype)
    args = get_args(ftype)
    if origin in (Union, types.UnionType):
        is_null = value is None or (isinstance(value, str) and value.lower() in ("null", "none"))
        if is_null and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be {value!r}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{source}: '{key}' = {value!r} is not one of {list(args)}")
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' expects a list, got {value!r}")
        inner = args[0] if args else Any
        return [coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' expects a mapping, got {value!r}")
        return dict(value)
    if ftype is Any:
        return value
    if ftype is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{source}: '{key}' expects true or false, got {value!r}")
    if ftype is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            as_float = None
        if as_float is not None and as_float.is_integer() and not isinstance(value, bool):
            return int(as_float)
        raise ConfigError(f"{source}: '{key}' expects an integer, got {value!r}")
    if ftype is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' expects a number, got {value!r}") from None
    if ftype is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{source}: '{key}' expects a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{source}: '{key}' has an unsupported schema type {ftype!r}")


def validate(cfg: RunConfig, origins: dict[str, str] | None = None) -> None:
    """Every value check that needs no file: ranges and finiteness, cross-field rules, registered names.

    ``origins`` (dotted key -> recipe or override) lets a message say where a bad value came from.
    """
    check_values(cfg, origins)
    check_cross_fields(cfg)
    if cfg.method == "clip":
        from medfoundry.config.clip import check_clip_config

        check_clip_config(cfg.clip)
    if cfg.dino.gram_weight > 0 and cfg.dino.gram_mode == "anchor" and not cfg.dino.gram_anchor:
        raise ConfigError("'dino.gram_mode' = 'anchor' needs 'dino.gram_anchor' (a checkpoint path)")
    check_names(cfg)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON output)."""
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, keys in schema order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomic: temporary file then rename)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(path)


def from_dict(data: dict, source: str = "saved config") -> RunConfig:
    """Rebuild a :class:`RunConfig` from a dict written by :func:`to_dict` (e.g. in a checkpoint)."""
    cfg = RunConfig()
    apply_mapping(cfg, data, source=source)
    return cfg


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def _resolved_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        module = __import__(cls.__module__, fromlist=["_"])
        _HINTS_CACHE[cls] = typing.get_type_hints(cls, globalns=vars(module))
    return _HINTS_CACHE[cls]
