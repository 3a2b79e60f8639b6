"""``load_backbone`` and ``medfoundry eval`` read every export ``medfoundry export`` writes (hf folder, timm folder
or its model.safetensors, safetensors folder or file) with the features and evaluation sections of the checkpoint
it came from; anything else is refused with a message naming the path and the accepted inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from labelled_images import make_labelled_pngs
from tiny_runs import train_tiny_run, write_pictures

from medfoundry.errors import UnsafeFileError
from medfoundry.methods.checkpoint_backbone import export_provenance, load_backbone
from medfoundry_cli.cli import main

FORMATS = {"hf": "hf", "timm": "timm", "timm_file": "timm/model.safetensors", "safetensors": "safetensors",
           "safetensors_file": "safetensors/model.safetensors"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny register-token run (vit_tiny_patch8_reg2, 1 channel) exported to hf, timm and safetensors."""
    tmp = tmp_path_factory.mktemp("load_exports")
    data = tmp / "train"
    write_pictures(data, [(40, 40)] * 8)
    run = train_tiny_run(tmp / "run", data, "model.name=vit_tiny_patch8_reg2", "crops.mean=[0.45]", "crops.std=[0.2]")
    for to in ("hf", "timm", "safetensors"):
        assert main(["export", str(run), "--to", to, "--out", str(tmp / to)]) == 0
    return {"run": run, "tmp": tmp, "labelled": make_labelled_pngs(tmp / "labelled", n=12, size=40)}


def _tokens(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = backbone.forward_features(x)
    return torch.cat([out.cls[:, None], out.reg, out.patch], dim=1)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_load_backbone_reads_each_export_with_the_checkpoints_features(exported: dict, fmt: str) -> None:
    original = load_backbone(exported["run"])
    loaded = load_backbone(exported["tmp"] / FORMATS[fmt])
    assert loaded.backbone.name == "vit_tiny_patch8_reg2" and loaded.backbone.num_reg_tokens == 2
    assert (loaded.method, loaded.step, loaded.random_init) == ("dino", 2, False)
    assert loaded.checkpoint == exported["tmp"] / FORMATS[fmt].split("/")[0]
    assert loaded.sections == original.sections  # data, crops, eval: the run's own
    assert not any(p.requires_grad for p in loaded.backbone.parameters()) and not loaded.backbone.training
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    diff = float((_tokens(loaded.backbone, x) - _tokens(original.backbone, x)).abs().max())
    assert diff < 1e-5, diff


def test_eval_command_on_an_export_gives_the_runs_results(exported: dict) -> None:
    results = {}
    for name, path in (("run", exported["run"]), ("hf", exported["tmp"] / "hf")):
        out = exported["tmp"] / f"knn_{name}.json"
        assert main(["eval", str(path), "--task", "knn", "--data", str(exported["labelled"]), "--k", "3",
                     "--n-bootstrap", "5", "--no-cache", "--json", str(out)]) == 0
        results[name] = json.loads(out.read_text())["pretrained"]
    assert results["hf"] == pytest.approx(results["run"]) and "knn_top1_k3" in results["hf"]


def test_random_init_of_an_export_is_the_runs_step0_backbone(exported: dict) -> None:
    ours = load_backbone(exported["tmp"] / "timm", random_init=True)
    theirs = load_backbone(exported["run"], random_init=True)
    assert ours.random_init and ours.identity == theirs.identity
    for key, value in theirs.backbone.state_dict().items():
        assert torch.equal(ours.backbone.state_dict()[key], value), key


def test_export_of_another_tower_refuses_random_init(exported: dict) -> None:
    out = exported["tmp"] / "student"
    assert main(["export", str(exported["run"]), "--to", "safetensors", "--which", "student", "--out", str(out)]) == 0
    assert load_backbone(out).backbone is not None
    with pytest.raises(ValueError, match="'student' tower, not the evaluated one"):
        load_backbone(out, random_init=True)


def test_a_folder_that_is_no_export_is_named_with_the_accepted_inputs(exported: dict, tmp_path: Path) -> None:
    plain_hf = tmp_path / "facebook_dinov2"  # an HF model folder medfoundry did not write
    shutil.copytree(exported["tmp"] / "hf", plain_hf)
    (plain_hf / "medfoundry_backbone.json").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    for folder in (plain_hf, empty):
        with pytest.raises(FileNotFoundError) as err:
            load_backbone(folder)
        message = str(err.value)
        assert str(folder) in message and "medfoundry export" in message and "hf, timm or safetensors" in message
        assert "\n" not in message
    loose = tmp_path / "loose.safetensors"
    shutil.copy(exported["tmp"] / "safetensors" / "model.safetensors", loose)
    with pytest.raises(FileNotFoundError, match="loose.safetensors: not a medfoundry export.*accepted: a run folder"):
        load_backbone(loose)
    state_dict = tmp_path / "weights.pt"
    torch.save({"vit.cls_token": torch.zeros(1, 1, 4)}, state_dict)
    with pytest.raises(ValueError, match="not a medfoundry training checkpoint.*accepted: a run folder"):
        load_backbone(state_dict)


def test_an_export_outlives_a_dropped_config_key(exported: dict, tmp_path: Path) -> None:
    """A preprocessing record written by an older schema (a key since removed) still loads, its other keys kept."""
    folder = tmp_path / "old_export"
    shutil.copytree(exported["tmp"] / "safetensors", folder)
    record = json.loads((folder / "medfoundry_preprocessing.json").read_text())
    record["sections"]["data"]["key_removed_since"] = 1
    record["sections"]["eval"]["entropy_wall"]["also_removed"] = True
    (folder / "medfoundry_preprocessing.json").write_text(json.dumps(record))
    assert load_backbone(folder).sections == load_backbone(exported["run"]).sections


def test_an_old_safetensors_export_without_records_loads_at_its_native_size(exported: dict, tmp_path: Path) -> None:
    folder = tmp_path / "old_safetensors"
    shutil.copytree(exported["tmp"] / "safetensors", folder)
    for name in ("medfoundry_preprocessing.json", "medfoundry_export.json", "medfoundry_run_config.yaml", "README.md"):
        (folder / name).unlink()
    loaded = load_backbone(folder)
    assert loaded.sections.crops.global_size == 32 and loaded.sections.data.channels == 1
    assert loaded.method == "dino"  # medfoundry_backbone.json's provenance


def test_re_exporting_an_export_keeps_its_records(exported: dict, tmp_path: Path) -> None:
    out = tmp_path / "timm_again"
    assert main(["export", str(exported["tmp"] / "hf"), "--to", "timm", "--out", str(out)]) == 0
    assert "medfoundry `dino`, step 2" in (out / "README.md").read_text()
    for name in ("medfoundry_preprocessing.json", "medfoundry_run_config.yaml"):
        assert (out / name).read_text() == (exported["tmp"] / "hf" / name).read_text(), name
    assert load_backbone(out).sections == load_backbone(exported["run"]).sections


class _RunsCode:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_an_export_with_a_code_running_pickle_is_refused(exported: dict, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """An HF export whose weights are a ``pytorch_model.bin`` is read only through the restricted unpickler."""
    folder = tmp_path / "hf_bin"
    shutil.copytree(exported["tmp"] / "hf", folder)
    (folder / "model.safetensors").unlink()
    torch.save({"embeddings.cls_token": _RunsCode()}, folder / "pytorch_model.bin")
    with pytest.raises(UnsafeFileError):
        load_backbone(folder)
    assert "this must not run" not in capsys.readouterr().out


def test_clip_export_records_clip_preprocess_and_pixel_statistics() -> None:
    """A CLIP checkpoint's export preprocessing: ``clip.preprocess.size`` and the tower's measured statistics."""
    from medfoundry.config import load_config
    from medfoundry.config.loader import to_dict

    cfg = load_config(None, ["method=clip", "model.in_chans=1", "clip.preprocess.size=48"])
    weights = {"image.backbone.vit.cls_token": torch.zeros(1, 1, 8), "pixel_mean": torch.tensor([[[0.41]]]),
               "pixel_std": torch.tensor([[[0.23]]])}
    state = {"config": to_dict(cfg), "step": 7, "eval_tower": "image", "format": "medfoundry-train-v1",
             "method": weights}
    prep, provenance = export_provenance(state, "RUN/checkpoints/step_00000007.pt")
    assert prep.img_size == 48 and prep.channels == 1
    assert prep.mean == pytest.approx([0.41]) and prep.std == pytest.approx([0.23])
    assert (provenance.method, provenance.step, provenance.tower) == ("clip", 7, "image")
    assert provenance.run_config["clip"]["preprocess"]["size"] == 48
