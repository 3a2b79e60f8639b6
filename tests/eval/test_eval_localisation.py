"""Localisation scores (pointing game, IoU, pixel AUC) against hand-computed cases, and the ``localisation`` task
wired end to end: real PNG images, masks drawn by thresholding them, maps from a backbone's attention."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from labelled_images import write_disc_masks
from PIL import Image
from torch import nn

from medfoundry.eval import registry
from medfoundry.eval.localisation import (
    backbone_scores,
    centre_prior,
    map_auc,
    paired_difference,
    pointing_game,
    read_mask_manifest,
    score_map,
    score_maps,
    threshold_iou,
    top_area_iou,
    uniform_map,
    upsample_map,
)
from medfoundry.eval.metrics import auc_roc
from medfoundry.eval.registry import EvalInputs, EvalSettings
from medfoundry.models.backbone import BackboneOutput

MASK = np.zeros((8, 8), dtype=bool)
MASK[2:4, 5:8] = True  # 6 pixels, top right


# -- the metrics on hand-computed cases --------------------------------------------------------------------------
def test_pointing_game_hits_inside_misses_outside_and_honours_the_tolerance() -> None:
    heat = np.zeros((8, 8))
    heat[3, 6] = 1.0
    assert pointing_game(heat, MASK) == 1.0
    heat = np.zeros((8, 8))
    heat[6, 1] = 1.0  # far from the mask
    assert pointing_game(heat, MASK) == 0.0
    heat = np.zeros((8, 8))
    heat[5, 6] = 1.0  # two rows below the mask's last row (row 3): distance 2
    assert pointing_game(heat, MASK) == 0.0
    assert pointing_game(heat, MASK, tolerance_px=1.5) == 0.0
    assert pointing_game(heat, MASK, tolerance_px=2.0) == 1.0
    assert np.isnan(pointing_game(heat, np.zeros((8, 8), bool)))


def test_tied_maxima_score_the_expected_hit_a_uniform_map_scores_the_area_fraction() -> None:
    assert pointing_game(np.ones((8, 8)), MASK) == pytest.approx(6 / 64)
    heat = np.zeros((8, 8))
    heat[3, 6] = heat[6, 1] = 1.0  # one tied maximum inside, one outside
    assert pointing_game(heat, MASK) == 0.5


def test_auc_is_one_for_the_mask_itself_half_for_a_constant_map_zero_for_its_inverse() -> None:
    assert map_auc(MASK.astype(float), MASK) == 1.0
    assert map_auc(np.full((8, 8), 0.3), MASK) == 0.5
    assert map_auc(1.0 - MASK, MASK) == 0.0
    rng = np.random.default_rng(0)
    heat = rng.random((8, 8)) + 0.5 * MASK
    assert map_auc(heat, MASK) == pytest.approx(auc_roc(MASK.ravel().astype(int), heat.ravel()))
    assert np.isnan(map_auc(heat, np.ones((8, 8), bool)))  # no background: undefined


def test_top_area_iou_by_hand() -> None:
    assert top_area_iou(MASK.astype(float), MASK) == 1.0
    heat = np.zeros((8, 8))
    heat[2, 5:8] = 3.0  # 3 of the mask's 6 pixels
    heat[6, 0:3] = 2.0  # 3 outside: the top 6 pixels are these 6
    assert top_area_iou(heat, MASK) == pytest.approx(3 / 9)
    assert top_area_iou(np.ones((8, 8)), MASK) == pytest.approx(6 / 64)  # ties: everything selected


def test_threshold_iou_normalises_each_map() -> None:
    heat = np.zeros((8, 8))
    heat[2:4, 5:8] = 10.0
    heat[0, 0] = 6.0  # 0.6 after min-max: above 0.5
    heat[7, 7] = 4.0  # 0.4: below
    assert threshold_iou(heat, MASK) == pytest.approx(6 / 7)
    assert threshold_iou(heat + 100.0, MASK) == pytest.approx(6 / 7)  # offset-free
    assert threshold_iou(heat, MASK, threshold=0.7) == 1.0
    assert threshold_iou(np.ones((8, 8)), MASK) == 0.0  # a constant map selects nothing


def test_upsampling_is_bilinear_and_keeps_the_peak_in_its_patch() -> None:
    grid = np.zeros((4, 4), np.float32)
    grid[1, 2] = 1.0
    heat = upsample_map(grid, (32, 32))
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    assert 8 <= y < 16 and 16 <= x < 24
    assert len(np.unique(heat)) > 3  # smooth, not patch-sized blocks
    patch_mask = np.zeros((32, 32), bool)
    patch_mask[8:16, 16:24] = True
    scores = score_map(grid, patch_mask)
    assert scores["pointing"] == 1.0 and scores["tolerance_px"] == 8.0
    assert 0.9 < scores["auc"] < 1.0  # bilinear leakage across the patch border
    with pytest.raises(ValueError, match="upsample the map first"):
        pointing_game(np.zeros((4, 4)), patch_mask)


def test_score_maps_skips_empty_masks_and_brackets_the_means() -> None:
    rng = np.random.default_rng(1)
    masks: list[np.ndarray | None] = []
    maps = []
    for i in range(12):
        m = np.zeros((16, 16), bool)
        py, px = rng.integers(0, 4, size=2)
        m[4 * py : 4 * py + 4, 4 * px : 4 * px + 4] = True  # the mask is one patch
        masks.append(m)
        grid = rng.random((4, 4)).astype(np.float32)
        if i % 2 == 0:
            grid[py, px] = 5.0  # peaked on the mask's patch: a hit; the others hit by chance (about 1/16)
        maps.append(grid)
    masks += [np.zeros((16, 16), bool), None]
    maps += [np.ones((4, 4), np.float32)] * 2
    scores = score_maps(maps, masks, n_bootstrap=300)
    s = scores.summary
    assert s["n_images"] == 12 and s["n_skipped_empty"] == 2 and scores.skipped_empty == ["image_12", "image_13"]
    assert 0.5 <= s["pointing"] <= 1.0
    for key in ("pointing", "iou_top_area", "iou_t50", "auc"):
        assert s[f"{key}_ci_low"] <= s[key] <= s[f"{key}_ci_high"], key
    assert s["pointing_ci_low"] < s["pointing_ci_high"]  # hits and misses: a real interval
    assert scores.metrics()["localisation_auc"] == s["auc"]
    same = paired_difference(scores, scores, n_bootstrap=50)
    assert same["auc"] == 0.0 and same["auc_ci_low"] == same["auc_ci_high"] == 0.0
    with pytest.raises(ValueError, match="one mask per map"):
        score_maps(maps, masks[:3])


def test_reference_maps() -> None:
    prior = centre_prior((6, 6))
    assert prior.shape == (6, 6) and np.allclose(prior, prior.T) and np.allclose(prior, prior[::-1, ::-1])
    assert np.unravel_index(np.argmax(prior), prior.shape) in {(2, 2), (2, 3), (3, 2), (3, 3)}
    scores = score_map(uniform_map((4, 4)), MASK)
    assert scores["auc"] == 0.5 and scores["pointing"] == pytest.approx(6 / 64) == scores["mask_fraction"]


# -- the task, end to end --------------------------------------------------------------------------------------
class PatchMeanBackbone(nn.Module):
    """A stand-in backbone whose class-token attention is the softmax of each patch's mean input value (bright
    patches get the attention), with the real token layout: class token first, then the patches in raster order."""

    def __init__(self, patch: int = 8, sharpness: float = 20.0) -> None:
        super().__init__()
        self.patch, self.sharpness = patch, sharpness
        self.dummy = nn.Parameter(torch.zeros(1))

    def _patches(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        pooled = torch.nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), self.patch)  # (B, 1, gh, gw)
        return pooled.flatten(1), (pooled.shape[2], pooled.shape[3])

    def last_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        values, grid = self._patches(x)
        b, n = values.shape
        attn = torch.zeros(b, 2, n + 1, n + 1)
        attn[:, :, 0, 1:] = torch.softmax(self.sharpness * values, dim=1)[:, None]
        return attn, grid

    def forward_features(self, x: torch.Tensor, masks: torch.Tensor | None = None) -> BackboneOutput:
        values, grid = self._patches(x)
        patch = torch.stack([values, values**2, -values], dim=-1)
        return BackboneOutput(patch.mean(dim=1), patch[:, :0], patch, grid)


def mask_inputs(png_folder: Path, out: Path, backbone: nn.Module | None = None) -> EvalInputs:
    """A tiny random-init ViT (or ``backbone``) and sections whose eval.data is a mask manifest of ``png_folder``."""
    from medfoundry.config import load_config
    from medfoundry.methods.dino.pipeline import frozen_eval_sections
    from medfoundry.models.registry import create_backbone
    from medfoundry.recipes import resolve_recipe

    cfg = load_config(resolve_recipe("tiny_dino_cpu"), [f"data.root={png_folder}", "model.img_size=32",
                                                       "crops.global_size=32", "crops.local_size=16"])
    torch.manual_seed(0)
    sections = frozen_eval_sections(cfg)
    manifest = write_disc_masks(png_folder, out)
    sections = dataclasses.replace(sections, eval=dataclasses.replace(sections.eval, data=str(manifest)))
    backbone = backbone if backbone is not None else create_backbone(cfg.model).eval()
    return EvalInputs(EvalSettings(batch_size=5, n_bootstrap=50), backbone=backbone, sections=sections)


def test_task_scores_an_attention_that_follows_the_bright_disc(png_folder: Path, tmp_path: Path) -> None:
    task = registry.get("localisation")
    assert task.needs == "masks" and "localisation" not in registry.task_names()  # asked for by name only
    follows = task.run(mask_inputs(png_folder, tmp_path, PatchMeanBackbone()))
    assert follows["localisation_n_images"] == 12 and follows["localisation_n_skipped_empty"] == 0
    # the brightest 8 px patch always touches the disc; its centre lies on a small disc in 9 of the 12 images
    assert follows["localisation_pointing_tol"] == 1.0 and follows["localisation_pointing"] == 0.75
    assert follows["localisation_auc"] > 0.9 and follows["localisation_iou_top_area"] > 0.4
    assert 0 < follows["localisation_mask_fraction"] < 0.3
    vit = task.run(mask_inputs(png_folder, tmp_path / "vit"))  # a random-init ViT: a valid but unguided map
    assert all(0.0 <= vit[f"localisation_{k}"] <= 1.0 for k in ("pointing", "iou_top_area", "auc"))
    assert vit["localisation_auc"] < follows["localisation_auc"]


def test_mask_alignment_follows_the_images_crop(png_folder: Path, tmp_path: Path) -> None:
    """The images are 80 x 96 and centre-cropped: a mask flipped left-right is scored as misaligned."""
    inputs = mask_inputs(png_folder, tmp_path, PatchMeanBackbone())
    paths, masks, patients = read_mask_manifest(inputs.sections.eval.data)
    assert len(set(patients)) == 3
    good, grid = backbone_scores(inputs.backbone, paths, masks, inputs.sections, n_bootstrap=0)
    for m in masks:
        Image.fromarray(np.asarray(Image.open(m))[:, ::-1].copy()).save(m)
    flipped, _ = backbone_scores(inputs.backbone, paths, masks, inputs.sections, n_bootstrap=0)
    assert grid == (4, 4)
    assert flipped.summary["auc"] < good.summary["auc"] - 0.2


def test_manifest_errors_name_the_file_and_the_fix(tmp_path: Path, png_folder: Path) -> None:
    images = sorted(png_folder.rglob("*.png"))
    pd.DataFrame({"path": [str(images[0])], "label": ["a"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError, match=r"labels.csv: the localisation task needs a 'mask' column"):
        read_mask_manifest(tmp_path / "labels.csv")
    pd.DataFrame({"path": [str(images[0])], "mask": ["nowhere.png"]}).to_csv(tmp_path / "gone.csv", index=False)
    with pytest.raises(FileNotFoundError, match=r"gone.csv: 1 listed file\(s\) do not exist, e.g. .*nowhere.png"):
        read_mask_manifest(tmp_path / "gone.csv")
    with pytest.raises(ValueError, match="needs backbone"):
        registry.get("localisation").run(EvalInputs())
