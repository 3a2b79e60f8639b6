"""Issue 12: every file a user hands medfoundry loads without running code from it.

Each test builds a real hostile ``.pt``: an otherwise valid-looking checkpoint (the right keys, real weights,
so format detection accepts it) holding one object whose unpickling creates a marker file, the way a
``__reduce__`` returning ``(os.system, ("touch MARKER",))`` would. The file is handed in through the entry
point a user would use (the CLI, or the config key), and the test asserts the marker was never created and
the load was refused with :class:`~medfoundry.errors.UnsafeFileError` (or, once the CLI maps user errors
to exit codes, exit code 2 with the same message).
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from medfoundry.config import load_config
from medfoundry.config.loader import to_dict
from medfoundry.errors import UnsafeFileError
from medfoundry.methods import get_method_entry
from medfoundry.recipes import resolve_recipe
from medfoundry.safe_load import TRUST_ENV
from medfoundry_cli.cli import main

FAST = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
        "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
        "train.batch_size=4", "train.steps=1", "train.progress=false", "train.tensorboard=false"]


class WritesMarker:
    """Unpickling this object creates ``marker``: a stand-in for any code a hostile pickle would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self) -> tuple[Callable, tuple]:
        return (Path.touch, (self.marker,))


@pytest.fixture(autouse=True)
def _no_trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The default a user gets: no opt-in to the unsafe reader; run from ``tmp_path`` (the CLI may write
    ``./medfoundry-error.log`` for an error outside a run folder)."""
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    return tmp_path / "MARKER_code_ran"


def dino_checkpoint_state(extra: dict[str, Any]) -> dict:
    """A medfoundry-train-v1 checkpoint dict of a freshly built tiny DINO run, plus ``extra`` entries."""
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), FAST)
    method = get_method_entry("dino").build(cfg)
    return {"step": 10, "method": method.state_dict(), "optimizer": {}, "config": to_dict(cfg),
            "format": "medfoundry-train-v1", "nonfinite_in_a_row": 0, "bad_files": {}, **extra}


def write_hostile_checkpoint(path: Path, marker: Path) -> Path:
    """A valid-looking training checkpoint whose ``rng`` entry runs code when unpickled."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dino_checkpoint_state({"rng": WritesMarker(marker)}), path)
    return path


def write_hostile_weights(path: Path, marker: Path) -> Path:
    """A Meta-style released-weights file (``{"model": timm state dict, "args": ...}``) with a hostile ``args``."""
    from medfoundry.models.registry import create_backbone

    cfg = load_config(resolve_recipe("tiny_dino_cpu"), FAST)
    torch.save({"model": create_backbone(cfg.model).vit.state_dict(), "epoch": 3, "args": WritesMarker(marker)},
               path)
    return path


def assert_refused(call: Callable[[], Any], marker: Path, source: Path, capsys: pytest.CaptureFixture,
                   what: str | None = None) -> str:
    """Run ``call``; the marker must not exist, and the load must be refused naming ``source`` and the fix."""
    try:
        try:
            rc = call()
        except UnsafeFileError as err:
            message = str(err)
        else:
            message = capsys.readouterr().err
            assert rc == 2, f"exit code {rc}, expected 2 (user error); stderr: {message}"
    finally:
        assert not marker.exists(), "unpickling the hostile file ran code"
    assert "refused to load" in message and str(source) in message, message
    assert "--trust-pickle" in message and "medfoundry convert" in message, message
    if what is not None:
        assert what in message, message
    return message


def test_the_hostile_payload_really_runs_code_when_unpickled_unsafely(tmp_path: Path, marker: Path) -> None:
    """Guards the tests below: the files they build do run code under the unsafe reader."""
    path = write_hostile_checkpoint(tmp_path / "evil.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_model_pretrained_refuses_a_hostile_file(tmp_path: Path, png_folder: Path, marker: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    evil = write_hostile_weights(tmp_path / "dinov2_release.pth", marker)
    assert_refused(lambda: main(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={png_folder}",
                                 f"model.pretrained={evil}", *FAST]), marker, evil, capsys, "model.pretrained")


def test_model_pretrained_hf_folder_refuses_a_hostile_pytorch_model_bin(tmp_path: Path, marker: Path) -> None:
    """An HF ``save_pretrained`` folder with a pickled ``pytorch_model.bin`` goes through the same safe reader."""
    import json

    from medfoundry.models.pretrained import load_pretrained_backbone
    from medfoundry.models.registry import create_backbone

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "dinov2", "hidden_size": 64}))
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 64), "pooler": WritesMarker(marker)},
               folder / "pytorch_model.bin")
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), FAST)
    with pytest.raises(UnsafeFileError, match="model.pretrained .HuggingFace folder.") as err:
        load_pretrained_backbone(create_backbone(cfg.model), folder, verbose=False, what="model.pretrained")
    assert not marker.exists() and str(folder / "pytorch_model.bin") in str(err.value)


def test_resume_refuses_a_hostile_checkpoint_in_the_run_folder(tmp_path: Path, png_folder: Path, marker: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    evil = write_hostile_checkpoint(run / "checkpoints" / "step_00000010.pt", marker)
    assert_refused(lambda: main(["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={png_folder}",
                                 *FAST, "train.steps=12"]), marker, evil, capsys)


def test_distill_teacher_checkpoint_refuses_a_hostile_file(tmp_path: Path, png_folder: Path, marker: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    evil = write_hostile_checkpoint(tmp_path / "teacher" / "checkpoints" / "step_00000010.pt", marker)
    assert_refused(lambda: main(["train", "distill_tiny_cpu", f"output_dir={tmp_path / 'run'}",
                                 f"data.root={png_folder}", f"distill.teacher_checkpoint={evil}",
                                 "distill.teacher_name=vit_tiny_patch8", *FAST]),
                   marker, evil, capsys, "distill.teacher_checkpoint")


def test_dino_gram_anchor_refuses_a_hostile_file(tmp_path: Path, png_folder: Path, marker: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    evil = write_hostile_checkpoint(tmp_path / "anchor.pt", marker)
    assert_refused(lambda: main(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={png_folder}",
                                 "dino.gram_weight=1.0", "dino.gram_mode=anchor", f"dino.gram_anchor={evil}", *FAST]),
                   marker, evil, capsys, "dino.gram_anchor")


@pytest.mark.parametrize("layout", ["checkpoint_file", "run_folder_best"])
def test_eval_refuses_a_hostile_checkpoint(tmp_path: Path, png_folder: Path, marker: Path, layout: str,
                                           capsys: pytest.CaptureFixture) -> None:
    if layout == "checkpoint_file":
        evil = write_hostile_checkpoint(tmp_path / "step_00000010.pt", marker)
        argv = ["eval", str(evil), "--task", "knn", "--data", str(png_folder)]
    else:  # RUN/best.pt, chosen with --best
        evil = write_hostile_checkpoint(tmp_path / "run" / "best.pt", marker)
        argv = ["eval", str(tmp_path / "run"), "--best", "--task", "knn", "--data", str(png_folder)]
    assert_refused(lambda: main(argv), marker, evil, capsys)


def test_export_refuses_a_hostile_checkpoint(tmp_path: Path, marker: Path, capsys: pytest.CaptureFixture) -> None:
    evil = write_hostile_checkpoint(tmp_path / "step_00000010.pt", marker)
    assert_refused(lambda: main(["export", str(evil), "--to", "safetensors", "--out", str(tmp_path / "out"),
                                 "--no-check"]), marker, evil, capsys, "weights to export")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_attention_refuses_a_hostile_checkpoint(tmp_path: Path, png_folder: Path, marker: Path,
                                                capsys: pytest.CaptureFixture) -> None:
    evil = write_hostile_checkpoint(tmp_path / "step_00000010.pt", marker)
    image = next(png_folder.rglob("*.png"))
    assert_refused(lambda: main(["attention", str(evil), str(image), "--out", str(tmp_path / "maps")]),
                   marker, evil, capsys)


def test_trust_opt_in_loads_a_trusted_legacy_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A colleague's file holding a harmless non-plain object (an ``argparse.Namespace``, as DINO's ``args``):
    refused by default, loaded with ``MEDFOUNDRY_TRUST_PICKLE=1``."""
    from medfoundry.models.pretrained import load_pretrained_backbone
    from medfoundry.models.registry import create_backbone

    cfg = load_config(resolve_recipe("tiny_dino_cpu"), FAST)
    torch.manual_seed(3)
    donor = create_backbone(cfg.model)
    path = tmp_path / "colleague.pth"
    torch.save({"model": donor.vit.state_dict(), "args": argparse.Namespace(arch="vit_tiny", lr=5e-4)}, path)
    target = create_backbone(cfg.model)
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        load_pretrained_backbone(target, path, verbose=False, what="model.pretrained")
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(UserWarning, match="unsafe unpickler"):
        report = load_pretrained_backbone(target, path, verbose=False, what="model.pretrained")
    assert report.format == "timm"
    torch.testing.assert_close(target.vit.blocks[0].attn.qkv.weight, donor.vit.blocks[0].attn.qkv.weight)


def test_old_checkpoint_with_numpy_rng_state_loads_without_trust(tmp_path: Path) -> None:
    """Older checkpoints stored ``np.random.get_state()`` (a tuple with a uint32 array) as is: the allow-list
    covers it, so they load through the safe reader, as a pretrained start and for evaluation."""
    from medfoundry.methods.checkpoint_backbone import load_backbone
    from medfoundry.models.pretrained import load_pretrained_backbone, read_weights
    from medfoundry.models.registry import create_backbone

    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "numpy_scalar": np.float64(0.25)}
    path = tmp_path / "run" / "checkpoints" / "step_00000010.pt"
    path.parent.mkdir(parents=True)
    torch.save(dino_checkpoint_state({"rng": rng}), path)
    obj, _, _ = read_weights(path)
    assert obj["rng"]["numpy"][0] == "MT19937" and obj["rng"]["numpy"][1].dtype == np.uint32
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), FAST)
    report = load_pretrained_backbone(create_backbone(cfg.model), tmp_path / "run", verbose=False)
    assert report.format == "medfoundry" and report.converted
    assert load_backbone(tmp_path / "run").step == 10


class _SetstateWritesFile(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by ``torch.jit.load``) creates the file at ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(2))
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.w

    @torch.jit.export
    def __getstate__(self) -> tuple[torch.Tensor, str, bool]:
        return (self.w, self.path, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, str, bool]) -> None:
        self.w = state[0] + torch.from_file(state[1], shared=True, size=2)  # creates the file
        self.path = state[1]
        self.training = state[2]


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_clip_text_pretrained_torchscript_archive_needs_trust(tmp_path: Path, marker: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenAI-style TorchScript ``.pt`` (``clip.text.pretrained``): ``torch.jit.load`` runs the archive's code,
    so it is refused by default and loaded (running that code) only with the trust opt-in."""
    from medfoundry.models.text.clip_text import load_clip_checkpoint

    path = tmp_path / "ViT-B-32.pt"
    torch.jit.save(torch.jit.script(_SetstateWritesFile(str(marker))), str(path))
    marker.unlink(missing_ok=True)
    with pytest.raises(UnsafeFileError, match="TorchScript") as err:
        load_clip_checkpoint(path)
    assert not marker.exists()
    assert "clip.text.pretrained" in str(err.value) and str(path) in str(err.value) and "safetensors" in str(err.value)
    monkeypatch.setenv(TRUST_ENV, "1")
    with pytest.warns(UserWarning, match="TorchScript"):
        sd = load_clip_checkpoint(path)
    assert set(sd) == {"w"}
    assert marker.exists()  # what the opt-in lets through: the archive's code did run
