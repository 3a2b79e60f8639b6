"""Behaviour pinned before the architecture change: 5-step traces of the tiny recipes and every recipe's
resolved config must stay as recorded (``golden_runs.py`` explains how the records are made).

Traces are compared to 1e-5 relative by default, because another CPU's kernels may round differently;
``MEDFOUNDRY_GOLDEN_EXACT=1`` demands bit-identical values (use it on the machine that wrote the records).
"""

from __future__ import annotations

import json
import os

import pytest
from golden_runs import HERE, config_snapshots, run_traces

EXACT = os.environ.get("MEDFOUNDRY_GOLDEN_EXACT") == "1"


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_traces(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("recipe", ["tiny_dino_cpu", "tiny_clip_cpu", "distill_tiny_cpu"])
def test_golden_trace_unchanged(traces: dict, recipe: str) -> None:
    want = json.loads((HERE / "traces.json").read_text())[recipe]
    got = traces[recipe]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for key, value in w.items():
            assert key in g, (recipe, g["step"], key)
            if EXACT:
                assert g[key] == value, (recipe, g["step"], key, g[key], value)
            else:
                assert g[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (recipe, g["step"], key)


def _top_level_blocks(text: str) -> dict[str, str]:
    """``{top-level key: its lines}`` of a YAML document written by ``to_yaml`` (keys in order)."""
    blocks: dict[str, str] = {}
    key = ""
    for line in text.splitlines(keepends=True):
        if line[:1] not in (" ", "-") and ":" in line:
            key = line.split(":", 1)[0]
            blocks[key] = ""
        blocks[key] += line
    return blocks


def _section_defaults() -> dict[str, str]:
    """YAML of every registered method's sections at their defaults (``{section: text}``)."""
    import yaml

    from medfoundry.config.loader import to_dict
    from medfoundry.config.names import registered_methods, run_config_class

    out: dict[str, str] = {}
    for method in registered_methods():
        for key, value in to_dict(run_config_class(method)()).items():
            out.setdefault(key, yaml.safe_dump({key: value}, sort_keys=False))
    return out


def test_resolved_config_of_every_recipe_unchanged() -> None:
    """Recorded before methods owned their sections, when every run printed every method's sections.

    Now a run prints the common sections and its own method's: each recipe's resolved config must be its
    recorded text with exactly the other methods' sections cut out (the rest bit-identical, in order), and
    every cut section must have been at its defaults (the recipe set nothing there, so nothing it said is lost).
    """
    snaps = config_snapshots()
    recorded = {p.stem: p.read_text() for p in sorted((HERE / "configs").glob("*.yaml"))}
    assert sorted(snaps) == sorted(recorded)
    defaults = _section_defaults()
    for name, text in snaps.items():
        old, new = _top_level_blocks(recorded[name]), _top_level_blocks(text)
        assert set(new) <= set(old), (name, sorted(set(new) - set(old)))
        kept = "".join(block for key, block in old.items() if key in new)
        assert text == kept, f"resolved config of recipe {name} changed"
        for key in set(old) - set(new):
            assert old[key] == defaults[key], f"recipe {name}: the dropped section '{key}' was not at its defaults"


def test_each_method_prints_only_its_sections() -> None:
    """A CLIP run's config holds the common sections and ``clip``; DINO's no ``clip`` or ``distill``."""
    snaps = config_snapshots()
    common = ["output_dir", "method", "model", "optim", "train", "dist", "adapt"]
    want = {"clip": common + ["clip"], "dino": common + ["data", "crops", "dino", "eval"],
            "distill": common + ["data", "crops", "dino", "distill", "eval"]}
    for name, text in snaps.items():
        keys = list(_top_level_blocks(text))
        method = text.split("method: ", 1)[1].split()[0]
        assert sorted(keys) == sorted(want[method]), (name, keys)
