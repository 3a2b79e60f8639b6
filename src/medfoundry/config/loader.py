"""Load a typed run configuration from a YAML recipe plus ``key.sub=value`` overrides.

The dataclass tree in :mod:`medfoundry.config.schema` is the single source of truth: a recipe is
one flat YAML document validated against it (no stacking of files), and command-line overrides are
applied on top. Unknown keys and wrong types raise :class:`ConfigError`, whose message names the
source, the dotted key, the offending value and the nearest valid key. After loading, every value is
checked (:mod:`medfoundry.config.checks`: finite numbers, ranges, registered names); whether files exist
is checked when a run starts (:func:`medfoundry.methods.input_paths.check_paths`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from medfoundry.config.checks import check_names, check_values
from medfoundry.config.names import DEFAULT_METHOD, registered_methods, run_config_class
from medfoundry.config.normalization import resolve_normalization
from medfoundry.config.schema import RunConfig
from medfoundry.errors import UserError


class ConfigError(UserError, ValueError):
    """A recipe or override does not fit the schema; the message says what to change."""


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Build the run config of the recipe's method from defaults, an optional YAML recipe and dotted overrides.

    Overrides have the form ``a.b.c=value``; the value is parsed as YAML (so ``true``, ``3``,
    ``[0.5, 1.0]`` and ``null`` work) and then coerced to the field's declared type. ``method`` (an
    override wins over the recipe, default ``dino``) selects the config class the method package
    registered (:mod:`medfoundry.config.names`): the common sections plus that method's own.
    """
    data: dict = {}
    source = "defaults"
    if recipe is not None:
        path = Path(recipe)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"recipe file not found: {path} (list bundled recipes with `medfoundry recipes`)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of config sections, got {type(data).__name__}")
    parsed = [(item, *parse_override(item)) for item in overrides]
    method, method_source = data.get("method", DEFAULT_METHOD), source
    for item, key, value in parsed:
        if key == "method":
            method, method_source = value, f"override '{item}'"
    cfg = new_run_config(method, method_source)
    origins: dict[str, str] = {}  # dotted key -> the recipe or override that set it, for error messages
    if data:
        apply_mapping(cfg, data, source=source, origins=origins)
    for item, key, value in parsed:
        apply_override(cfg, key, value, source=f"override '{item}'", origins=origins)
    validate(cfg, origins)
    return cfg


def new_run_config(method: Any, source: str = "config") -> RunConfig:
    """A default run config of ``method`` (its registered class); an unknown method lists the registered ones."""
    cls = run_config_class(method) if isinstance(method, str) else None
    if cls is None:
        known = registered_methods()
        hint = (f"one of {known}" if known else
                "no method is registered yet: import medfoundry.methods first (the CLI and train() do)")
        raise ConfigError(f"{source}: 'method' = {method!r} is not a registered method; use {hint}")
    cfg = cls()
    cfg.method = method
    return cfg


def _methods_with_section(section: str) -> list[str]:
    """Registered methods whose run config has the top-level section ``section``."""
    return [m for m in registered_methods() if section in {f.name for f in dataclasses.fields(run_config_class(m))}]


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


def apply_overrides(cfg: Any, items: Iterable[str], label: str = "override") -> None:
    """Apply ``key.sub=value`` strings to an already built config (a checkpoint's, or a section bundle); an
    unknown key is reported naming the item (``<label> 'item'``) and the nearest valid key. A ``crops.normalize``
    preset among them replaces the built config's ``crops.mean`` / ``crops.std``."""
    origins: dict[str, str] = {}
    for item in items:
        key, value = parse_override(item)
        apply_override(cfg, key, value, source=f"{label} '{item}'", origins=origins)
    resolve_normalization(cfg, origins)


def apply_override(cfg: Any, dotted: str, value: Any, source: str, origins: dict[str, str] | None = None) -> None:
    """Set one dotted key; an unknown key is reported in full with the nearest valid key."""
    parts = dotted.split(".")
    node = cfg
    for _i, part in enumerate(parts[:-1]):
        child = getattr(node, part, None) if dataclasses.is_dataclass(node) else None
        if child is None or not dataclasses.is_dataclass(child):
            raise ConfigError(_unknown_key(source, dotted, value, type(cfg)))
        node = child
    apply_mapping(node, {parts[-1]: value}, source, prefix=".".join(parts[:-1]) + "." if parts[:-1] else "",
                  origins=origins, root=type(cfg))


def _unknown_key(source: str, dotted: str, value: Any, root: type) -> str:
    """The message for an unknown key: the method that owns its section, else the nearest valid key."""
    section = dotted.split(".")[0]
    names = {f.name for f in dataclasses.fields(root)}
    owners = _methods_with_section(section) if section not in names else []
    if owners:
        this = getattr(root, "__name__", "this run")
        return (f"{source}: unknown key '{dotted}' (value {value!r}): section '{section}' belongs to method "
                f"{' / '.join(owners)}, not to this run's config ({this}); set method={owners[0]} or drop the key")
    return f"{source}: unknown key '{dotted}' (value {value!r}); nearest valid key: '{_nearest(dotted, root)}'"


def all_keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema, leaves and sections, for suggestions and docs."""
    keys = []
    for f in dataclasses.fields(cls):
        name = prefix + f.name
        keys.append(name)
        ftype = resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(ftype):
            keys.extend(all_keys(ftype, name + "."))
    return keys


def _nearest(key: str, root: type = RunConfig) -> str:
    candidates = all_keys(root)
    close = difflib.get_close_matches(key, candidates, n=1, cutoff=0.0)
    if close:
        return close[0]
    return ""


def apply_mapping(obj: Any, data: dict, source: str, prefix: str = "", origins: dict[str, str] | None = None,
                  root: type | None = None) -> None:
    """Set fields of dataclass ``obj`` from ``data`` recursively, strictly typed; ``origins[key] = source``.

    ``root`` is the class of the whole tree (default: ``obj``'s), for the nearest-key suggestion.
    """
    root = root or type(obj)
    hints = resolved_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            raise ConfigError(_unknown_key(source, dotted, value, root))
        ftype = hints[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(ftype):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{source}: '{dotted}' is a section; give a mapping of its keys, not {value!r}"
                )
            apply_mapping(current, value, source, dotted + ".", origins, root)
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

    ``origins`` (dotted key -> recipe or override) lets a message say where a bad value came from. The
    method's own cross-field rules are its run config's :meth:`~medfoundry.config.schema.RunConfig.check`.
    A named preset (``crops.normalize``) first writes the values it stands for (``crops.mean`` / ``crops.std``).
    """
    resolve_normalization(cfg, origins)
    check_values(cfg, origins)
    cfg.check()
    check_names(cfg)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML/JSON output); a run config's keys in its ``print_order``."""
    out = dataclasses.asdict(cfg)
    order = getattr(type(cfg), "print_order", ())
    if order:
        out = {**{k: out[k] for k in order if k in out}, **{k: v for k, v in out.items() if k not in order}}
    return out


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
    """Rebuild a run config from a dict written by :func:`to_dict` (e.g. in a checkpoint).

    Checkpoints written before the methods owned their sections hold every method's sections; the
    top-level sections that belong only to other registered methods are left out.
    """
    cfg = new_run_config(data.get("method", DEFAULT_METHOD), source)
    names = {f.name for f in dataclasses.fields(cfg)}
    own = {k: v for k, v in data.items() if k in names or not _methods_with_section(k)}
    apply_mapping(cfg, own, source=source)
    return cfg


_HINTS_CACHE: dict[type, dict[str, Any]] = {}


def resolved_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS_CACHE:
        _HINTS_CACHE[cls] = typing.get_type_hints(cls)  # each base's annotations in its own module
    return _HINTS_CACHE[cls]
