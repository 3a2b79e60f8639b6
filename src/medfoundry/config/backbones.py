"""Config-time check that backbone names (``model.name``, ``distill.teacher_name``) are registered.

An unknown name would otherwise only fail when the run builds its model, with a ``KeyError``; here it
becomes a :class:`~medfoundry.config.loader.ConfigError` (CLI exit code 2) naming the key, the value and
the nearest registered name. The registry lives in :mod:`medfoundry.models.registry`, which registers
its catalog of names (:mod:`medfoundry.config.names`) when it is imported; config never imports it.
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from medfoundry.config.names import registered_names

if TYPE_CHECKING:
    from medfoundry.config.schema import RunConfig


def registered_backbone_names() -> list[str] | None:
    """Names of every registered backbone, sorted; None before :mod:`medfoundry.models.registry` is imported."""
    return registered_names("backbone")


def nearest_name(value: str, names: list[str]) -> str:
    """The registered name closest to ``value`` (difflib ratio); ``""`` when there are no names."""
    close = difflib.get_close_matches(value, names, n=1, cutoff=0.0)
    return close[0] if close else ""


def unknown_backbone_message(key: str, value: str, names: list[str]) -> str:
    """The error text for ``key = value`` naming the nearest registered backbone."""
    return (f"'{key}' = {value!r} is not a registered backbone; nearest registered name: "
            f"'{nearest_name(value, names)}' (run `medfoundry models` for the full list)")


def check_backbone_names(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` when ``model.name`` or a set ``distill.teacher_name`` is not registered.

    An empty ``distill.teacher_name`` is left to ``method: distill``, which reports it as missing.
    """
    from medfoundry.config.loader import ConfigError

    given = [("model.name", cfg.model.name)]
    if cfg.distill.teacher_name:
        given.append(("distill.teacher_name", cfg.distill.teacher_name))
    names = registered_backbone_names()
    if names is None:  # the registry registers its catalog on import; train() checks again then
        return
    for key, value in given:
        if value not in names:
            raise ConfigError(unknown_backbone_message(key, value, names))
