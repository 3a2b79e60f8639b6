"""Name catalogs: the registered names a config value must be one of, supplied by the packages that own them.

The config package sits below every component, so it cannot import the backbone registry, the data
sources or the evaluation tasks to check ``model.name``, ``data.kind`` or ``eval.tasks``. Instead each of
those registries registers a provider here when it is imported (:func:`register_names`), and
:func:`medfoundry.config.checks.check_names` checks a value against every catalog that is registered.
The command line imports the registries before it loads a config, and ``train()`` checks again once the
method's packages are imported, so a wrong name is still refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: Formats ``model.pretrained_format`` / ``distill.teacher_format`` accept (the converters in
#: :mod:`medfoundry.models.convert`).
PRETRAINED_FORMATS = ("auto", "dinov2", "dinov3", "hf", "timm", "medfoundry", "medfoundry:teacher",
                      "medfoundry:student", "medfoundry:image")

_CATALOGS: dict[str, Callable[[], Iterable[str]]] = {}


def register_names(kind: str, provider: Callable[[], Iterable[str]]) -> None:
    """Make ``provider()`` the catalog of ``kind`` (``"backbone"``, ``"data.kind"``, ``"eval.task"``)."""
    _CATALOGS[kind] = provider


def registered_names(kind: str) -> list[str] | None:
    """The names of ``kind`` sorted, or None when no package has registered that catalog yet."""
    provider = _CATALOGS.get(kind)
    return None if provider is None else sorted(provider())


#: The method a recipe without ``method:`` runs.
DEFAULT_METHOD = "dino"

_RUN_CONFIGS: dict[str, type] = {}


def register_run_config(method: str, cls: type) -> None:
    """Make ``cls`` (a :class:`~medfoundry.config.schema.RunConfig` subclass) the config tree of ``method``.

    Called by a method package when it is imported (:mod:`medfoundry.methods.registry`), so the config
    package loads a recipe of that method without importing the method.
    """
    _RUN_CONFIGS[method] = cls


def run_config_class(method: str) -> type | None:
    """The run config class registered for ``method``, or None."""
    return _RUN_CONFIGS.get(method)


def registered_methods() -> list[str]:
    """Every method name with a registered run config, sorted."""
    return sorted(_RUN_CONFIGS)
