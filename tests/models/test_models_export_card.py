"""Exports of tiny real runs carry what a user needs to feed the model: transformers' ``AutoImageProcessor`` loads
the HF export's ``preprocessor_config.json`` and, with ``AutoModel``, gives the features of medfoundry's own
evaluation path; ``medfoundry_preprocessing.json`` records the intensity settings; the model card (README.md) of
every format names the recipe, intensity settings, data path and metrics, and its loading lines run as written."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from labelled_images import make_labelled_pngs
from PIL import Image
from tiny_runs import train_tiny_run, write_pictures

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoImageProcessor, AutoModel  # noqa: E402

from medfoundry.eval.eval_images import eval_transform_from_config, read_eval_image  # noqa: E402
from medfoundry.eval.labelled_set import LabelledItem  # noqa: E402
from medfoundry.methods.checkpoint_backbone import load_backbone  # noqa: E402
from medfoundry.models.preprocessing import read_preprocessing  # noqa: E402
from medfoundry_cli.cli import main  # noqa: E402

#: Native size, larger square, non-square (both orientations, whole-pixel long sides) and a 3:2 picture.
SHAPES = [(32, 32), (64, 64), (40, 50), (50, 40), (96, 64)]
WINDOWS = ["0.4:0.8"]  # an "HU" window over [0, 1] pictures (centre 0.4, width 0.8)


def _export(run: Path, to: str, out: Path) -> Path:
    assert main(["export", str(run), "--to", to, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def picture_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 1-channel identity-intensity vit_tiny_patch8 run with in-training kNN evaluation, exported three ways."""
    tmp = tmp_path_factory.mktemp("export_card")
    data = tmp / "train"
    write_pictures(data, [(40, 40)] * 8)
    labelled = make_labelled_pngs(tmp / "labelled", n=12, size=40)
    run = train_tiny_run(tmp / "run", data, "eval.every_steps=2", f"eval.data={labelled}", "eval.tasks=[knn]",
                         "eval.n_bootstrap=5", "eval.knn_k=[3]", "eval.best_metric=val_knn_top1_k3")
    exports = {to: _export(run, to, tmp / to) for to in ("hf", "timm", "safetensors")}
    return {"run": run, "data": data, "tmp": tmp, **exports}


@pytest.fixture(scope="module")
def window_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A windowed 3-channel RoPE run, exported to hf: the intensity mapping happens before the processor."""
    tmp = tmp_path_factory.mktemp("export_window")
    data = tmp / "train"
    write_pictures(data, [(40, 40)] * 8)
    run = train_tiny_run(tmp / "run", data, "model.name=vit_tiny_patch8_rope", "model.in_chans=3",
                         "data.channels=3", "data.intensity=window", f"data.windows=[{','.join(WINDOWS)}]",
                         "crops.mean=[0.45,0.35,0.3]", "crops.std=[0.3,0.2,0.25]")
    return {"run": run, "tmp": tmp, "hf": _export(run, "hf", tmp / "hf")}


def _tokens(out) -> torch.Tensor:
    return torch.cat([out.cls[:, None], out.reg, out.patch], dim=1)


def _medfoundry_eval(run: Path, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """medfoundry's evaluation path: the run's backbone and evaluation transform (pixels, tokens)."""
    loaded = load_backbone(run)
    pixels = eval_transform_from_config(loaded.sections).load(LabelledItem(str(path), "x"))
    with torch.no_grad():
        return pixels, _tokens(loaded.backbone.forward_features(pixels[None]))


def test_hf_processor_and_model_give_medfoundry_eval_features(picture_run: dict) -> None:
    hf = picture_run["hf"]
    processor = AutoImageProcessor.from_pretrained(hf)
    model = AutoModel.from_pretrained(hf).eval()
    assert processor.size["shortest_edge"] == 32 and processor.crop_size["height"] == 32
    assert list(processor.image_mean) == [0.5] and list(processor.image_std) == [0.25]
    worst_px, worst_feat = 0.0, 0.0
    for path in write_pictures(picture_run["tmp"] / "query", SHAPES, seed=1):
        ours_px, ours = _medfoundry_eval(picture_run["run"], path)
        theirs_px = processor(images=Image.open(path), return_tensors="pt")["pixel_values"]
        assert theirs_px.shape == (1, 1, 32, 32), path
        with torch.no_grad():
            theirs = model(pixel_values=theirs_px).last_hidden_state
        worst_px = max(worst_px, float((theirs_px[0] - ours_px).abs().max()))
        worst_feat = max(worst_feat, float((theirs - ours).abs().max()))
    print(f"HF processor vs medfoundry eval transform: pixels {worst_px:.2e}, tokens {worst_feat:.2e}")
    assert worst_px < 1e-5 and worst_feat < 1e-5


def test_window_run_processor_after_the_cards_intensity_mapping(window_run: dict) -> None:
    """For HU windows the processor takes [0, 1] channels (do_rescale off); the card's NumPy mapping makes them."""
    hf = window_run["hf"]
    prep = read_preprocessing(hf)
    assert prep.intensity == "window" and prep.windows == WINDOWS and prep.channels == 3
    assert prep.mean == [0.45, 0.35, 0.3] and prep.std == [0.3, 0.2, 0.25]
    config = json.loads((hf / "preprocessor_config.json").read_text())
    assert config["do_rescale"] is False and config["do_convert_rgb"] is True  # one window: grey repeated
    card = (hf / "README.md").read_text()
    assert "data.intensity: window" in card and "centre 0.4, width 0.8 HU" in card
    mapping = re.search(r"The intensity mapping in NumPy.*?```python\n(.*?)```", card, re.S).group(1)
    processor = AutoImageProcessor.from_pretrained(hf)
    model = AutoModel.from_pretrained(hf).eval()
    assert model.config.model_type == "dinov3_vit"
    for path in write_pictures(window_run["tmp"] / "query", SHAPES, seed=2):
        scope = {"image": read_eval_image(LabelledItem(str(path), "x")).numpy()}
        exec(mapping, scope)  # the card's lines, as written
        inputs = processor(images=scope["unit"], input_data_format="channels_first", return_tensors="pt")
        with torch.no_grad():
            theirs = model(**inputs).last_hidden_state
        _, ours = _medfoundry_eval(window_run["run"], path)
        assert float((theirs - ours).abs().max()) < 1e-5, path


def _code_blocks(card: str) -> dict[str, str]:
    return dict(re.findall(r"^(transformers|timm|medfoundry):\n\n```python\n(.*?)```", card, re.S | re.M))


@pytest.mark.parametrize("to", ["hf", "timm", "safetensors"])
def test_model_card_names_recipe_preprocessing_data_metrics_and_loads_as_written(picture_run: dict, to: str,
                                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                                 tmp_path: Path) -> None:
    folder = picture_run[to]
    card = (folder / "README.md").read_text()
    library = {"hf": "transformers", "timm": "timm", "safetensors": "medfoundry"}[to]
    assert card.startswith(f"---\nlibrary_name: {library}\n")
    for text in ("medfoundry `dino`, step 2", "| `train.steps` | 2 |", "| `crops.global_size` | 32 |",
                 "| `crops.n_local` | 2 |", "| `optim.lr` | 0.0005 |", "data.intensity: identity",
                 "Resize the shorter side to 32 px (bilinear", "mean `[0.5]`, std `[0.25]`",
                 f"`data.root`: `{picture_run['data']}`", "Best checkpoint: `val_knn_top1_k3`",
                 "| `val_knn_top1_k3` |", "Last in-training evaluation (step 2)", "medfoundry_preprocessing.json"):
        assert text in card, text
    best = json.loads((picture_run["run"] / "best.json").read_text())
    assert f"= {best['value']:.4g} at step {best['step']}" in card
    blocks = _code_blocks(card)
    assert set(blocks) == {library, "medfoundry"}
    scan = write_pictures(tmp_path, [(32, 32)], seed=3)[0]
    scan.rename(tmp_path / "scan.png")
    monkeypatch.chdir(tmp_path)
    _, ours = _medfoundry_eval(picture_run["run"], tmp_path / "scan.png")
    for name, code in blocks.items():
        scope = {"image": read_eval_image(LabelledItem(str(tmp_path / "scan.png"), "x"))}
        with torch.no_grad():
            exec(code, scope)  # the card's loading lines, as written
        assert float((scope["cls"] - ours[:, 0]).abs().max()) < 1e-5, name


def test_timm_pretrained_cfg_and_records(picture_run: dict) -> None:
    import timm

    folder = picture_run["timm"]
    cfg = json.loads((folder / "config.json").read_text())["pretrained_cfg"]
    assert cfg["input_size"] == [1, 32, 32] and cfg["interpolation"] == "bilinear" and cfg["mean"] == [0.5]
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    data_cfg = timm.data.resolve_model_data_config(model)
    assert tuple(data_cfg["input_size"]) == (1, 32, 32) and tuple(data_cfg["std"]) == (0.25,)
    record = json.loads((folder / "medfoundry_export.json").read_text())
    assert record["method"] == "dino" and record["step"] == 2 and record["tower"] == "teacher"
    assert record["metrics"]["best"]["metric"] == "val_knn_top1_k3"
    prep = read_preprocessing(folder)
    assert prep.sections["data"]["root"] == str(picture_run["data"]) and prep.img_size == 32
    assert (folder / "medfoundry_run_config.yaml").is_file()


def test_export_outside_a_run_has_a_plain_card(tmp_path: Path) -> None:
    """A backbone exported from Python (no run): default preprocessing, a card saying no recipe was recorded."""
    from medfoundry.config.schema import ModelConfig
    from medfoundry.models.export import export_backbone
    from medfoundry.models.registry import create_backbone

    backbone = create_backbone(ModelConfig(name="vit_tiny_patch8_reg2", img_size=32, in_chans=3))
    export_backbone(backbone, "hf", tmp_path / "hf", mean=[0.4, 0.5, 0.6], std=[0.2] * 3)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "no recipe recorded" in card and "No training data path recorded" in card
    assert "mean_patch = tokens[:, 3:].mean(1)" in card  # class + 2 registers
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    assert processor.do_convert_rgb and list(processor.image_mean) == [0.4, 0.5, 0.6]
    grey = Image.fromarray(np.full((40, 40), 128, dtype=np.uint8))
    assert processor(images=grey, return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)


@pytest.mark.parametrize("data", [{"intensity": "window", "windows": ["lung", "bone", "-50:350"], "channels": 3},
                                  {"intensity": "range", "value_range": [-1000.0, 400.0], "channels": 1}])
def test_cards_intensity_code_is_medfoundrys_intensity_transform(data: dict, tmp_path: Path) -> None:
    """The NumPy lines of the card equal :mod:`medfoundry.data.intensity` on CT-like values (HU)."""
    from medfoundry.config.data import DataConfig
    from medfoundry.config.evaluation import EvalConfig
    from medfoundry.config.schema import CropsConfig
    from medfoundry.data.intensity import build_intensity_transform
    from medfoundry.models.model_card import ModelCard, render_model_card
    from medfoundry.models.preprocessing import preprocessing_from_sections

    cfg = DataConfig(**data)
    prep = preprocessing_from_sections(cfg, CropsConfig(global_size=32, mean=[0.5], std=[0.25]), EvalConfig())
    card = render_model_card(ModelCard("vit_tiny_patch8", "hf", tmp_path, prep, {"registers": 0}))
    mapping = re.search(r"The intensity mapping in NumPy.*?```python\n(.*?)```", card, re.S).group(1)
    hu = np.random.default_rng(0).uniform(-1200, 1500, (1, 16, 16)).astype(np.float32)
    scope = {"image": hu}
    exec(mapping, scope)
    expected = build_intensity_transform(cfg)(torch.from_numpy(hu)).numpy()
    assert scope["unit"].shape == expected.shape and np.abs(scope["unit"] - expected).max() < 1e-6
