"""Unit tests of :mod:`medfoundry.safe_load`: what loads, what is refused (and how it says so), the opt-in,
TorchScript archives, and the legacy-file converter."""

from __future__ import annotations

import argparse
import fractions
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.errors import CorruptFileError, UnsafeFileError, UserError
from medfoundry.safe_load import (
    TRUST_ENV,
    convert_legacy_file,
    is_torchscript_archive,
    load_torch_file,
    load_torchscript,
    to_plain_data,
)


class Touch:
    """Unpickling creates ``path`` (stands for any code a hostile pickle runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No opt-in to the unsafe reader (whatever the developer's shell has); write nothing outside tmp_path."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


def test_plain_state_dicts_and_numpy_rng_states_load(tmp_path: Path) -> None:
    state = {"w": torch.arange(4.0), "nested": {"ints": [1, 2], "t": (torch.ones(1), "x")}, "none": None,
             "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                     "np_scalar": np.float32(1.5), "np_int": np.int64(7), "array": np.zeros((2, 3), np.float16)}}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_torch_file(tmp_path / "ok.pt", "checkpoint")
    torch.testing.assert_close(loaded["w"], state["w"])
    assert loaded["rng"]["numpy"][0] == "MT19937"
    np.testing.assert_array_equal(loaded["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert loaded["rng"]["np_int"] == 7 and loaded["rng"]["array"].dtype == np.float16
    np.random.set_state(loaded["rng"]["numpy"])  # usable as an RNG state


def test_a_pickle_that_runs_code_is_refused_naming_file_purpose_globals_and_fix(tmp_path: Path) -> None:
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(1)}, "args": Touch(marker)}, path)
    with pytest.raises(UnsafeFileError) as err:
        load_torch_file(path, "model.pretrained")
    assert not marker.exists()
    text = str(err.value)
    assert isinstance(err.value, UserError)
    assert f"refused to load model.pretrained {path}" in text
    assert "pathlib" in text and "arbitrary code" in text
    assert f"medfoundry convert {path} {tmp_path / 'evil.safe.pt'}" in text
    assert "--trust-pickle" in text and TRUST_ENV in text


def test_legacy_non_zip_format_is_refused_too(tmp_path: Path) -> None:
    """Pre-1.6 ``torch.save`` files cannot be scanned; the refused global comes from the unpickler's message."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "old.pt"
    torch.save({"w": torch.ones(1), "x": Touch(marker)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError, match="would call getattr"):  # the first global it stopped at
        load_torch_file(path, "checkpoint")
    assert not marker.exists()


def test_trust_reads_a_harmless_legacy_file_with_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "colleague.pt"
    torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1), "frac": fractions.Fraction(1, 3)}, path)
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        load_torch_file(path, "checkpoint")
    with pytest.warns(UserWarning, match="unsafe unpickler"):
        assert load_torch_file(path, "checkpoint", trust=True)["args"].lr == 0.1
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(UserWarning, match="unsafe unpickler"):
        assert load_torch_file(path, "checkpoint")["frac"] == fractions.Fraction(1, 3)
    with pytest.raises(UnsafeFileError):  # an explicit trust=False beats the environment
        load_torch_file(path, "checkpoint", trust=False)


@pytest.mark.parametrize("case", ["missing", "empty", "truncated", "garbage"])
def test_unreadable_files_are_corrupt_not_unsafe(tmp_path: Path, case: str) -> None:
    path = tmp_path / "f.pt"
    if case == "empty":
        path.write_bytes(b"")
    elif case == "truncated":
        torch.save({"w": torch.ones(1000)}, path)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "garbage":
        path.write_bytes(b"not a torch file at all" * 10)
    with pytest.raises(CorruptFileError, match="checkpoint"):
        load_torch_file(path, "checkpoint")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_archives_need_trust(tmp_path: Path) -> None:
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 3)), str(path))
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    assert is_torchscript_archive(path) and not is_torchscript_archive(tmp_path / "plain.pt")
    with pytest.raises(UnsafeFileError, match="TorchScript archive") as err:
        load_torch_file(path, "clip.text.pretrained")
    assert "torch.jit.load" in str(err.value) and str(path.with_suffix(".safetensors")) in str(err.value)
    with pytest.raises(UnsafeFileError, match="--trust-pickle"):
        load_torchscript(path, "clip.text.pretrained")
    with pytest.warns(UserWarning, match="TorchScript"):
        module = load_torchscript(path, "clip.text.pretrained", trust=True)
    assert set(module.state_dict()) == {"weight", "bias"}
    with pytest.raises(CorruptFileError, match="not a TorchScript archive"):
        load_torchscript(tmp_path / "plain.pt", "clip.text.pretrained", trust=True)


def test_to_plain_data_names_what_is_not_plain_data(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"\['extra'\]\[0\].*fractions.Fraction"):
        to_plain_data({"extra": [fractions.Fraction(1, 2)]})
    with pytest.raises(CorruptFileError):
        convert_legacy_file(tmp_path / "missing.pt", tmp_path / "o.pt")


@pytest.mark.parametrize("payload", [b"plain text, not a checkpoint\n", b"\x80\x02h\x00.", b"\x80\x02K\x01K"],
                         ids=["text", "memo-get-KeyError", "stack-underflow"])
def test_odd_bytes_are_reported_as_corrupt_not_a_traceback(tmp_path, payload: bytes) -> None:
    """Bytes that make the restricted unpickler raise KeyError/IndexError/... are a named CorruptFileError."""
    path = tmp_path / "odd.pt"
    path.write_bytes(payload)
    with pytest.raises(CorruptFileError, match="odd.pt"):
        load_torch_file(path, "pretrained weights")
