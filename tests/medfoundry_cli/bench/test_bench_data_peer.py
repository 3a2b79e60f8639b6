"""The data benchmark's side by side with dinov2's ``DataAugmentationDINO``: the real CT frames it reads, the
comparison's sides and ratios (tiny crops; when the dinov2 code is cached), and ``bench_data_pipeline.py --peer
dinov2`` (its output, its JSON, and the one-line error when the code is missing)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medfoundry_cli.bench.data import DINOV2_PHOTOMETRIC, compare_augmentation_with_dinov2, real_ct_frames
from medfoundry_cli.bench.peer_code import has_code

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache" / "peers" / "dinov2"
needs_peer = pytest.mark.skipif(not has_code(CACHE), reason=f"dinov2 code not in {CACHE} (see benchmarks/README.md)")
TINY = dict(repeats=2, block_images=2, global_size=32, local_size=16, n_local=2)


def _script():
    spec = importlib.util.spec_from_file_location("bench_data_pipeline", ROOT / "benchmarks" / "bench_data_pipeline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_real_ct_frames_are_windowed_hounsfield_slices() -> None:
    frames = real_ct_frames()
    names = [name for name, _ in frames]
    assert names[0] == "CT_small.dcm[0]"
    for _, frame in frames:
        assert frame.dtype == torch.float32 and frame.ndim == 3 and frame.shape[0] == 1
        assert float(frame.min()) >= 0.0 and float(frame.max()) <= 1.0 and float(frame.std()) > 0.05
    if importlib.util.find_spec("data_store") is not None:  # pydicom-data: the 512 x 512 CT frames too
        assert len(frames) == 4 and frames[1][1].shape == (1, 512, 512)


@needs_peer
def test_photometric_settings_are_dinov2s() -> None:
    """The values of dinov2's ``DataAugmentationDINO``, read from its objects, as medfoundry's crops keys. dinov2's
    ``GaussianBlur(p)`` hands ``1 - p`` to torchvision's ``RandomApply`` (whose ``p`` is the chance to apply), so its
    stated 1.0 / 0.1 / 0.5 blur chances act as 0 / 0.9 / 0.5 (facebookresearch/dinov2 PR #411)."""
    import sys

    sys.path.insert(0, str(CACHE))
    from dinov2.data.augmentations import DataAugmentationDINO

    peer = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8, 224, 96)
    jitter_apply, grey = peer.global_transfo1.transforms[0].transforms
    jitter = jitter_apply.transforms[0]
    strengths = [1.0 - jitter.brightness[0], 1.0 - jitter.contrast[0], 1.0 - jitter.saturation[0], jitter.hue[1]]
    blur1 = peer.global_transfo1.transforms[1]
    blur2, solarize = peer.global_transfo2.transforms[1].transforms
    blur_local = peer.local_transfo.transforms[1]
    stated = {"color_jitter_prob": jitter_apply.p, "color_jitter": [round(v, 6) for v in strengths],
              "grayscale_prob": grey.p, "global1_blur_prob": 1.0 - blur1.p,
              "global2_blur_prob": round(1.0 - blur2.p, 6), "local_blur_prob": 1.0 - blur_local.p,
              "solarize_prob": solarize.p}
    assert stated == DINOV2_PHOTOMETRIC
    assert (blur1.p, blur2.p, blur_local.p) == (0.0, 0.9, 0.5)  # what dinov2 actually applies


@needs_peer
def test_comparison_times_every_side_and_reports_both_ratios() -> None:
    frames = [(name, frame[:, :64, :64]) for name, frame in real_ct_frames()[:1]]
    result = compare_augmentation_with_dinov2(frames, peer_path=str(CACHE), fetch=False, uint8_resize=True, **TINY)
    who = ("medfoundry", "medfoundry_3ch_path", "medfoundry_uint8", "dinov2")
    assert set(result.sides) == {f"{w}_{kind}" for w in who for kind in ("photometric", "geometric")}
    for side in result.sides.values():
        assert len(side.cpu_rates) == len(side.wall_rates) == 2 and min(side.cpu_rates) > 0
    med, lo, hi = result.ratio("medfoundry_geometric", "dinov2_geometric")
    assert lo <= med <= hi and med > 0
    text = result.format()
    assert "with DINOv2's colour/blur augmentations" in text and "geometric only" in text and "dinov2 @" in text
    doc = result.as_dict()
    assert set(doc["ratios"]) == {f"{mf}_{k}/dinov2_{k}" for mf in who[:3] for k in ("photometric", "geometric")}
    assert "medfoundry + uint8_resize / DataAugmentationDINO" in text
    json.dumps(doc)


@needs_peer
def test_bench_data_pipeline_peer_option(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "peer.json"
    code = _script().main(["--peer", "dinov2", "--peer-path", str(CACHE), "--no-fetch", "--repeats", "1",
                           "--block-images", "1", "--global-size", "32", "--local-size", "16", "--n-local", "2",
                           "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "ratio medfoundry / DataAugmentationDINO, geometric only" in text and "load average" in text
    assert json.loads(out.read_text())["ratios"]["medfoundry_photometric/dinov2_photometric"]["median"] > 0


def test_bench_data_pipeline_peer_option_offline_fails_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    code = _script().main(["--peer", "dinov2", "--peer-path", str(tmp_path / "empty"), "--no-fetch"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "empty") in err
