"""A failure that is not the user's input still leaves ``error.log`` in the run folder once that folder exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from labelled_images import write_grey_pngs

from medfoundry.train import hooks
from medfoundry_cli.cli import FALLBACK_LOG, main

ROOT = Path(__file__).resolve().parents[2]


def _failing_builder(cfg) -> list:
    raise RuntimeError("boom from a hook builder")


@pytest.fixture
def failing_hook_builder():
    hooks.HOOK_BUILDERS.append(_failing_builder)
    yield
    hooks.HOOK_BUILDERS.remove(_failing_builder)


def test_a_bug_after_the_run_folder_exists_is_logged_there(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture,
                                                            failing_hook_builder: None) -> None:
    images = write_grey_pngs(tmp_path / "images")
    run = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match="boom from a hook builder"):  # a bug keeps its traceback
        main(["train", str(ROOT / "recipes" / "tiny_dino_cpu.yaml"), f"output_dir={run}", f"data.root={images}",
              "train.steps=2", "train.progress=false"])
    log = (run / "error.log").read_text()
    assert "Traceback" in log and "boom from a hook builder" in log and "_failing_builder" in log
    assert f"traceback also written to {run / 'error.log'}" in capsys.readouterr().err
    assert not (tmp_path / FALLBACK_LOG).exists()


def test_a_bug_before_any_run_folder_writes_no_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No folder yet (``medfoundry config`` never makes one): the traceback on the terminal is the record."""
    monkeypatch.chdir(tmp_path)
    from medfoundry_cli import cli

    monkeypatch.setattr(cli, "register_name_catalogs", lambda: (_ for _ in ()).throw(RuntimeError("early bug")))
    with pytest.raises(RuntimeError, match="early bug"):
        main(["config", "tiny_dino_cpu"])
    assert not list(tmp_path.iterdir())
