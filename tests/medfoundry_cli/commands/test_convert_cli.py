"""``medfoundry convert IN OUT``: a trusted legacy pickle rewritten as plain data that the safe reader loads."""

from __future__ import annotations

import argparse
import fractions
from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.safe_load import TRUST_ENV, load_torch_file
from medfoundry_cli.cli import main


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)


def test_convert_legacy_file_makes_it_load_safely(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src, dst = tmp_path / "legacy.pth", tmp_path / "legacy.safe.pth"
    torch.save({"teacher": {"w": torch.arange(3.0)}, "args": argparse.Namespace(arch="vit_small", lr=5e-4),
                "rng": np.random.get_state()}, src)
    assert main(["convert", str(src), str(dst)]) == 0
    assert "loads with the safe reader" in capsys.readouterr().out
    out = load_torch_file(dst, "model.pretrained", trust=False)
    assert out["args"] == {"arch": "vit_small", "lr": 5e-4}
    torch.testing.assert_close(out["teacher"]["w"], torch.arange(3.0))


def test_convert_names_what_is_not_plain_data(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the traceback log goes to ./medfoundry-error.log
    src = tmp_path / "odd.pt"
    torch.save({"extra": fractions.Fraction(1, 2)}, src)
    assert main(["convert", str(src), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfoundry convert: error:") and "fractions.Fraction" in err
    assert not (tmp_path / "out.pt").exists()
