"""A registered DINO method whose loss turns non-finite from a given step on (importable from any test module)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

from medfoundry.methods.registry import METHODS


@contextmanager
def nan_dino_method(name: str, from_step: int = 2) -> Iterator[str]:
    """Register ``name``: the real DINO method with its loss multiplied by nan at steps >= ``from_step``; the
    loop's non-finite handling is what is under test, so everything else is the real method. Unregistered after."""
    base = METHODS["dino"]

    def build(cfg):
        method = base.build(cfg)
        forward = method.forward

        def poisoned(batch, step):
            out = forward(batch, step)
            if step >= from_step:
                out["loss"] = out["loss"] * float("nan")
            return out

        method.forward = poisoned
        return method

    METHODS[name] = dataclasses.replace(base, build=build)
    try:
        yield name
    finally:
        del METHODS[name]
