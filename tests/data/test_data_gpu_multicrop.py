"""GPU-side multi-crop (run here on CPU): box distributions match the CPU sampler, shapes, resampling
against torchvision's resized_crop, flips, normalisation, seeding and the decode-on-CPU loader."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

import medfoundry.data.multicrop as multicrop
from medfoundry.config import CropsConfig, load_config
from medfoundry.data.gpu_multicrop import (
    CanvasViews,
    CropPlan,
    GPUMultiCrop,
    crop_views,
    fit_to_canvas,
    sample_crop_boxes,
)
from medfoundry.data.multicrop import MultiCropTransform, random_resized_crop_box
from medfoundry.methods.dino.loader import build_gpu_dino_loader
from medfoundry.recipes import resolve_recipe

N = 3000
KS_CRIT = 1.95 * math.sqrt(2 / N)  # two-sample Kolmogorov-Smirnov critical value at alpha = 0.001


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    x = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, x, "right") / len(a) - np.searchsorted(b, x, "right") / len(b))))


def _stats(boxes: np.ndarray, h: int, w: int) -> dict[str, np.ndarray]:
    return {
        "area": boxes[:, 2] * boxes[:, 3] / (h * w),
        "aspect": boxes[:, 3] / boxes[:, 2],
        "top": boxes[:, 0] / (h - boxes[:, 2] + 1),
        "left": boxes[:, 1] / (w - boxes[:, 3] + 1),
    }


@pytest.mark.parametrize("h,w,scale", [(224, 224, (0.32, 1.0)), (200, 300, (0.05, 0.32))])
def test_batched_boxes_follow_the_cpu_samplers_distributions(h: int, w: int, scale: tuple[float, float]) -> None:
    torch.manual_seed(0)
    cpu = np.array([random_resized_crop_box(h, w, scale) for _ in range(N)], dtype=np.float64)
    g = torch.Generator().manual_seed(1)
    batched = sample_crop_boxes(torch.full((N // 10,), h), torch.full((N // 10,), w), 10, scale, g)
    assert batched.shape == (10, N // 10, 4)
    gpu = batched.reshape(-1, 4).numpy()
    assert np.all(gpu == np.round(gpu)) and gpu[:, 2:].min() > 0
    assert np.all(gpu[:, 0] + gpu[:, 2] <= h) and np.all(gpu[:, 1] + gpu[:, 3] <= w) and gpu[:, :2].min() >= 0
    ref, got = _stats(cpu, h, w), _stats(gpu, h, w)
    for key in ref:
        assert _ks(ref[key], got[key]) < KS_CRIT, key
        np.testing.assert_allclose(np.quantile(got[key], [0.1, 0.5, 0.9]), np.quantile(ref[key], [0.1, 0.5, 0.9]),
                                   atol=0.03, err_msg=key)
    assert got["area"].min() >= scale[0] - 0.01 and got["area"].max() <= scale[1] + 0.01
    assert got["aspect"].min() >= 3 / 4 - 0.02 and got["aspect"].max() <= 4 / 3 + 0.02
    # the comparison has power: a slightly different scale range is detected
    other = sample_crop_boxes(torch.full((N // 10,), h), torch.full((N // 10,), w), 10,
                              (scale[0] * 1.25, scale[1]), g).reshape(-1, 4).numpy()
    assert _ks(ref["area"], _stats(other, h, w)["area"]) > KS_CRIT


def test_per_image_sizes_and_centre_square_fallback() -> None:
    sizes = torch.tensor([[100, 50], [40, 60]])
    boxes = sample_crop_boxes(sizes[:, 0], sizes[:, 1], 50, (0.99, 1.0))
    # no 3/4..4/3 crop of 99 % of a 2:1 image fits: the centred square, as torchvision's fallback
    assert torch.equal(boxes[:, 0], torch.tensor([25.0, 0.0, 50.0, 50.0]).expand(50, 4))
    assert torch.all(boxes[:, 1, 0] + boxes[:, 1, 2] <= 40) and torch.all(boxes[:, 1, 1] + boxes[:, 1, 3] <= 60)


def _smooth(c: int, h: int, w: int) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([torch.sin(3 * xx + k) * torch.cos(2 * yy - k) * 0.5 + 0.5 for k in range(c)])


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_known_boxes_reproduce_torchvision_resized_crop(mode: str) -> None:
    img = _smooth(2, 60, 80)
    boxes = [(0, 0, 60, 80), (5, 7, 30, 40), (10, 3, 20, 13), (31, 50, 29, 30)]  # whole, down-, up-scaled, corner
    plan = CropPlan(torch.tensor(boxes, dtype=torch.float64).view(len(boxes), 1, 4),
                    torch.zeros(len(boxes), 1, dtype=torch.bool))
    out = crop_views(img[None], plan, 24, mode)
    assert out.shape == (len(boxes), 1, 2, 24, 24)
    interp = InterpolationMode.BICUBIC if mode == "bicubic" else InterpolationMode.BILINEAR
    for v, (t, l, h, w) in enumerate(boxes):
        ref = TF.resized_crop(img, t, l, h, w, [24, 24], interpolation=interp, antialias=False)
        # resized_crop clamps at the crop's edge, grid_sample reads the true neighbours: equal away from it
        margin = math.ceil(2 * 24 / min(h, w)) + 1
        inner = (slice(None), slice(margin, -margin), slice(margin, -margin))
        torch.testing.assert_close(out[v, 0][inner], ref[inner], atol=1e-4, rtol=0)
        assert (out[v, 0] - ref).abs().max() < 0.03
    whole = TF.resized_crop(img, 0, 0, 60, 80, [24, 24], interpolation=interp, antialias=False)
    torch.testing.assert_close(out[0, 0], whole, atol=1e-4, rtol=0)  # image border: same clamping


def test_roi_align_matches_bilinear_when_upscaling_and_antialiases_when_downscaling() -> None:
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(1, 1, 96, 96, generator=g)
    up = CropPlan(torch.tensor([[[20.0, 30.0, 16.0, 12.0]]]), torch.zeros(1, 1, dtype=torch.bool))
    torch.testing.assert_close(crop_views(noise, up, 32, backend="roi_align"), crop_views(noise, up, 32), atol=1e-5,
                               rtol=0)
    down = CropPlan(torch.tensor([[[0.0, 0.0, 96.0, 96.0]]]), torch.zeros(1, 1, dtype=torch.bool))
    ref = TF.resized_crop(noise[0], 0, 0, 96, 96, [24, 24], interpolation=InterpolationMode.BILINEAR, antialias=True)
    err_roi = (crop_views(noise, down, 24, backend="roi_align")[0, 0] - ref).abs().mean()
    err_grid = (crop_views(noise, down, 24)[0, 0] - ref).abs().mean()
    assert err_roi < 0.5 * err_grid  # box-filtered like torchvision's antialiased resize, unlike plain sampling


@pytest.mark.parametrize("backend", ["grid_sample", "roi_align"])
def test_flips_flip(backend: str) -> None:
    img = torch.rand(2, 3, 40, 50, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[[3.0, 4.0, 30.0, 33.0], [0.0, 10.0, 25.0, 40.0]]])
    plain = crop_views(img, CropPlan(boxes, torch.tensor([[False, False]])), 16, backend=backend)
    flipped = crop_views(img, CropPlan(boxes, torch.tensor([[True, False]])), 16, backend=backend)
    torch.testing.assert_close(flipped[0, 0], plain[0, 0].flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(flipped[0, 1], plain[0, 1])


def test_shapes_view_major_batch_independence_normalisation_and_seeding() -> None:
    cfg = CropsConfig(global_size=32, local_size=16, n_local=3, mean=[0.5], std=[0.25], interpolation="bilinear")
    crops = GPUMultiCrop(cfg, channels=1, seed=7)
    images = torch.rand(4, 1, 40, 50, generator=torch.Generator().manual_seed(0))
    out = crops(images, step=3)
    assert out["global_crops"].shape == (2, 4, 1, 32, 32) and out["local_crops"].shape == (3, 4, 1, 16, 16)
    again = crops(images, step=3)
    assert all(torch.equal(out[k], again[k]) for k in out)  # per-step device generator: reproducible
    assert not torch.equal(crops(images, step=4)["global_crops"], out["global_crops"])
    plans = crops.plan(torch.tensor([[40, 50]] * 4), crops.generator_for(3, "cpu"))
    one = crops(images[2:3], plans={k: CropPlan(p.boxes[:, 2:3], p.flips[:, 2:3]) for k, p in plans.items()})
    torch.testing.assert_close(one["local_crops"][:, 0], out["local_crops"][:, 2])  # view-major, per image
    flat = crops(torch.full((2, 1, 40, 50), 0.5), step=0)
    assert flat["global_crops"].abs().max() < 1e-5 and flat["local_crops"].abs().max() < 1e-5
    with pytest.raises(ValueError, match="crops.local_blur_prob"):
        GPUMultiCrop(CropsConfig(local_blur_prob=0.5), channels=3)


def test_canvas_keeps_small_images_replicate_pads_and_downscales_large_ones() -> None:
    img = torch.rand(1, 30, 20)
    canvas, size = fit_to_canvas(img, 40)
    assert canvas.shape == (1, 40, 40) and size == (30, 20)
    assert torch.equal(canvas[:, :30, :20], img) and torch.equal(canvas[:, 35, 25], img[:, 29, 19])
    canvas, size = fit_to_canvas(torch.rand(3, 100, 50), 40)
    assert canvas.shape == (3, 40, 40) and size == (40, 20)


def test_worker_boxes_are_the_cpu_paths_boxes_for_the_same_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = CropsConfig(global_size=32, local_size=16, n_local=4, mean=[0.5], std=[0.25])
    img = torch.rand(1, 48, 64)
    seen: list[tuple] = []
    real = multicrop.random_resized_crop_box
    monkeypatch.setattr(multicrop, "random_resized_crop_box", lambda *a: seen.append(real(*a)) or seen[-1])
    torch.manual_seed(11)
    MultiCropTransform(cfg, 1)(img)
    torch.manual_seed(11)
    out = CanvasViews(cfg, 1, storage_size=64)(img)
    worker = torch.cat([out["global_boxes"], out["local_boxes"]]).tolist()
    assert worker == [list(map(float, b)) for b in seen]
    assert out["canvas"].shape == (1, 64, 64) and out["canvas"].dtype == torch.float16


def test_gpu_loader_batches_are_seeded_resumable_and_shaped(png_folder) -> None:
    overrides = [f"data.root={png_folder}", "train.batch_size=4", "crops.n_local=3", "crops.global_size=32",
                 "crops.local_size=16"]
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), overrides)
    first = iter(build_gpu_dino_loader(cfg, 8, 0, 0, 1, storage_size=96))
    b0, b1 = next(first), next(first)
    assert b0["global_crops"].shape == (2, 4, 1, 32, 32) and b0["local_crops"].shape == (3, 4, 1, 16, 16)
    assert b0["masks"].shape == (2, 4, 16) and b0["bad"] == []
    resumed = next(iter(build_gpu_dino_loader(cfg, 8, 1, 0, 1, storage_size=96)))
    assert all(torch.equal(b1[k], resumed[k]) for k in ("global_crops", "local_crops", "masks"))
    assert not torch.equal(b0["global_crops"], b1["global_crops"])


def test_training_loop_runs_on_the_gpu_crop_loader(tmp_path, png_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``crops.device=gpu`` wiring does: the dino entry's loader replaced by ``build_gpu_dino_loader``."""
    from medfoundry.methods import METHODS
    from medfoundry.train.loop import train
    from medfoundry.train.run_logger import read_metrics

    def loader(cfg, method, start_step, rank, world_size):
        return build_gpu_dino_loader(cfg, method.eval_backbone().patch_size, start_step, rank, world_size, 96)

    monkeypatch.setitem(METHODS, "dino", dataclasses.replace(METHODS["dino"], build_loader=loader))
    cfg = load_config(resolve_recipe("tiny_dino_cpu"), [
        f"output_dir={tmp_path / 'run'}", f"data.root={png_folder}", "crops.global_size=32", "crops.local_size=16",
        "model.img_size=32", "train.batch_size=4", "train.steps=2", "train.progress=false",
        "train.tensorboard=false"])
    records = read_metrics(train(cfg))
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["ibot_loss"] > 0 for r in records)
