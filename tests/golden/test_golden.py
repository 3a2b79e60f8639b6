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


def test_resolved_config_of_every_recipe_unchanged() -> None:
    snaps = config_snapshots()
    recorded = {p.stem: p.read_text() for p in sorted((HERE / "configs").glob("*.yaml"))}
    assert sorted(snaps) == sorted(recorded)
    for name, text in snaps.items():
        assert text == recorded[name], f"resolved config of recipe {name} changed"
