"""The method registry: each training method's config class, builders and evaluated tower, by name.

A method is a package (``methods/dino/``, ``methods/clip/``, ``methods/distill/``) owning its config
sections (``config.py``: its run config class = the common sections + its own), the method module, its
loader and its pipeline (``pipeline.py``: the one place that reads that method's whole config tree and
hands each component its section). The package's ``ENTRY`` is one line in :data:`METHODS`; registering
an entry also registers its config class with :mod:`medfoundry.config.names`, so ``method: NAME`` loads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from medfoundry.config.names import register_run_config
from medfoundry.config.schema import RunConfig
from medfoundry.eval.hooks import Hook
from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.methods.base import Method
from medfoundry.models.backbone import Backbone

Need = tuple[str, str, Callable]  # (config key, path as given, check of that path); see methods/input_paths.py


@dataclass(frozen=True)
class MethodEntry:
    """How to build a method, the loader that feeds it, its hooks and input paths, and which backbone is evaluated.

    Evaluation needs only the evaluated backbone (``Method.eval_backbone()``), not the whole method:
    ``build_eval_backbone`` builds just that backbone from the run config, drawing from the RNG
    exactly as ``build`` does up to that backbone's initialisation (so under the run's seed it *is*
    the run's step-0 backbone) and reading no external weights (``model.pretrained``, teachers, Gram
    anchors); its weights in a checkpoint's ``state["method"]`` are the keys under ``eval_prefix``.
    """

    name: str
    config_class: type[RunConfig]  # the method's run config: common sections + its own
    build: Callable[[RunConfig], Method]
    build_loader: Callable  # (cfg, method, start_step, rank, world_size) -> iterable of batches
    eval_tower: str  # the submodule holding the evaluated backbone: teacher (dino), student (distill), image (clip)
    build_eval_backbone: Callable[[RunConfig], Backbone]
    build_hooks: Callable[[RunConfig], list[Hook]]  # in-training evaluation and monitors of this method
    needed_paths: Callable[[RunConfig], Iterator[Need]]  # input files besides model.pretrained, checked at start
    max_bad_fraction: Callable[[RunConfig], float]  # share of unreadable inputs after which the run stops
    #: (cfg, the checkpoint's method state or None) -> data, crops, eval for frozen evaluation of the backbone
    frozen_eval_sections: Callable[..., FrozenEvalSections]

    @property
    def eval_prefix(self) -> str:
        """State-dict prefix of the evaluated backbone in ``state["method"]``, e.g. ``teacher.backbone.``."""
        return f"{self.eval_tower}.backbone."


METHODS: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry) -> MethodEntry:
    """Add ``entry`` to :data:`METHODS` and its config class to the config catalog (``method: entry.name``)."""
    METHODS[entry.name] = entry
    register_run_config(entry.name, entry.config_class)
    return entry


def get_method_entry(name: str) -> MethodEntry:
    """The entry for ``cfg.method``; the error lists the known methods."""
    if name not in METHODS:
        raise KeyError(f"unknown method '{name}'; known: {sorted(METHODS)}")
    return METHODS[name]


def _register_builtin() -> None:
    from medfoundry.methods.clip.pipeline import ENTRY as CLIP
    from medfoundry.methods.dino.pipeline import ENTRY as DINO
    from medfoundry.methods.distill.pipeline import ENTRY as DISTILL

    for entry in (DINO, DISTILL, CLIP):
        register_method(entry)


_register_builtin()
