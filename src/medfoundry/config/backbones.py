"""Config-time check that backbone names (``model.name``, ``distill.teacher_name``) are registered.

An unknown name would otherwise only fail when the run builds its model, with a ``KeyError``; here it
becomes a :class:`~medfoundry.config.loader.ConfigError` (CLI exit code 2) naming the key, the value and
the nearest registered name. The registry lives in :mod:`medfoundry.models.registry`, which registers
its catalog of names (:mod:`medfoundry.config.names`) when it is imported; config never imports it.
"""

from __future__ import annotations

import difflib

from medfoundry.config.names import registered_names


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


def check_backbone_names(given: list[tuple[str, str]]) -> None:
    """Raise :class:`ConfigError` when a ``(key, backbone name)`` pair names an unregistered backbone.

    Skipped before :mod:`medfoundry.models.registry` is imported (it registers its catalog then; train()
    checks again).
    """
    from medfoundry.config.loader import ConfigError

    names = registered_backbone_names()
    if names is None:  # the registry registers its catalog on import; train() checks again then
        return
    for key, value in given:
        if value not in names:
            raise ConfigError(unknown_backbone_message(key, value, names))
