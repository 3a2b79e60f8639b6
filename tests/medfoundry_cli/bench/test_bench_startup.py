"""``medfoundry bench --mode startup``: the time to first step of the tiny recipe, measured in fresh processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medfoundry_cli.bench.startup import format_startup
from medfoundry_cli.cli import main


@pytest.mark.slow
def test_startup_mode_prints_and_records_the_time_to_first_step(tmp_path: Path, capsys) -> None:
    out = tmp_path / "startup.json"
    assert main(["bench", "--mode", "startup", "--steps", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["recipe"] == "tiny_dino_cpu" and len(result["seconds"]) == 1
    assert 0.5 < result["median_s"] < 120  # a real process start, import, build and one step
    assert format_startup(result) in capsys.readouterr().out


def test_a_run_that_fails_before_its_first_step_is_reported_with_its_error() -> None:
    from medfoundry_cli.bench.startup import time_to_first_step

    with pytest.raises(RuntimeError, match="before its first step"):
        time_to_first_step("tiny_dino_cpu", ("model.name=not_a_backbone",), repeats=1)
