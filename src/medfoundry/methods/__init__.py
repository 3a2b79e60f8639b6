"""Training methods: ``batch -> {"loss": ..., metrics}`` plus their config, data pipelines and hooks, by name.

Importing this package registers the built-in methods (``dino``, ``distill``, ``clip``) and their config
classes, so ``load_config`` accepts ``method: NAME`` (see :mod:`medfoundry.methods.registry`).
"""

from __future__ import annotations

from medfoundry.methods.base import Method
from medfoundry.methods.registry import METHODS, MethodEntry, get_method_entry, register_method

__all__ = ["METHODS", "Method", "MethodEntry", "get_method_entry", "register_method"]
