"""Resuming a run folder with a different configuration is refused before anything in it is overwritten."""

from __future__ import annotations

from pathlib import Path

import pytest
from reliability_testutil import FAST, RECIPE

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.config import load_config
from medfoundry.train.loop import train
from medfoundry.train.resume import ConfigMismatchError, config_differences
from medfoundry_cli.cli import main


def _cfg(out: Path, root: Path, *extra: str):
    return load_config(RECIPE, [*FAST, f"output_dir={out}", f"data.root={root}", "train.steps=2", *extra])


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_different_config_is_refused_naming_the_keys_and_nothing_changes(tmp_path: Path, png_folder: Path,
                                                                         capsys) -> None:
    run = train(_cfg(tmp_path / "run", png_folder))
    before = _snapshot(run)
    code = main(["train", str(RECIPE), *FAST, f"output_dir={run}", f"data.root={png_folder}", "train.steps=2",
                 "model.name=vit_small_patch16", "optim.lr=0.01"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.name" in err and "optim.lr" in err and "output_dir" in err and "allow_config_change" in err
    after = _snapshot(run)
    after.pop("medfoundry-error.log", None)
    after.pop("error.log", None)
    assert after == before  # config.yaml, metrics and checkpoints untouched


def test_benign_changes_resume_and_the_override_flag_allows_a_deliberate_change(tmp_path: Path,
                                                                                png_folder: Path) -> None:
    run = train(_cfg(tmp_path / "run", png_folder))
    train(_cfg(run, png_folder, "train.steps=3", "train.log_every=2", "eval.every_steps=0"))  # longer: allowed
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000003.pt"
    with pytest.raises(ConfigMismatchError, match="optim.lr"):
        train(_cfg(run, png_folder, "train.steps=4", "optim.lr=0.01"))
    train(_cfg(run, png_folder, "train.steps=4", "optim.lr=0.01", "train.allow_config_change=true"))
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000004.pt"
    assert "lr: 0.01" in (run / "config.yaml").read_text()


def test_config_differences_ignores_only_the_listed_keys() -> None:
    saved = {"output_dir": "a", "train": {"steps": 1, "seed": 0}, "eval": {"every_steps": 5}, "optim": {"lr": 1}}
    now = {"output_dir": "b", "train": {"steps": 9, "seed": 1}, "eval": {"every_steps": 0}, "optim": {"lr": 1}}
    assert config_differences(saved, now) == [("train.seed", 0, 1)]


def test_a_key_added_to_the_schema_since_the_folder_was_written_resumes_at_its_default(
        tmp_path: Path, png_folder: Path) -> None:
    """An older folder's config.yaml lacks keys added later: at their defaults they are no change, set they are."""
    run = train(_cfg(tmp_path / "run", png_folder))
    text = (run / "config.yaml").read_text()
    older = "\n".join(line for line in text.splitlines() if not line.strip().startswith("unmapped_16bit:"))
    assert older != text, "the recorded config should hold data.unmapped_16bit"
    (run / "config.yaml").write_text(older + "\n")
    train(_cfg(run, png_folder, "train.steps=3"))  # the new key at its default: resumes
    assert [p.name for p in list_checkpoints(run)][-1] == "step_00000003.pt"
    (run / "config.yaml").write_text(older + "\n")
    with pytest.raises(ConfigMismatchError, match="data.unmapped_16bit"):
        train(_cfg(run, png_folder, "train.steps=4", "data.unmapped_16bit=full_range"))
