"""Image-report data: sections, manifests (CSV/Parquet), CheXzero's HDF5 layout, preprocessing, exact resume."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from medfoundry.config.clip import ClipDataConfig, ClipPreprocessConfig
from medfoundry.data.pair_loader import PairImageTransform, build_pair_loader, preset_pixel_stats
from medfoundry.data.pairs import CheXzeroPairs, ManifestPairs
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry.data.reports import ManifestWarning, select_text, split_sections
from medfoundry.models.text.tokenize import ClipBPETokenizer

REPORT = ("FINAL REPORT\nEXAMINATION: Chest PA and lateral.\nINDICATION: Cough.\n"
          "FINDINGS: The lungs are clear.  No pleural effusion.\nIMPRESSION: No acute cardiopulmonary process.")


def test_sections_are_split_at_headings():
    s = split_sections(REPORT)
    assert s["findings"] == "The lungs are clear. No pleural effusion."
    assert s["impression"] == "No acute cardiopulmonary process."
    assert s["preamble"] == "FINAL REPORT" and s["indication"] == "Cough."
    assert select_text(REPORT, ["impression"]) == "No acute cardiopulmonary process."
    assert select_text(REPORT, ["impression", "findings"]).startswith("No acute cardiopulmonary process. The lungs")
    assert select_text("Lungs clear.", ["impression"]) == "Lungs clear."  # fallback: the whole report
    assert select_text("Lungs clear.", ["impression"], fallback="skip") is None
    assert select_text(REPORT, ["impression"], {"impression": "From the column."}) == "From the column."


def _write_images(folder: Path, n: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n):
        arr = (np.linspace(0, 1, 40 * 48).reshape(40, 48) * (i + 1) / n * 65535).astype(np.uint16)
        write_stored(folder / f"img_{i}.png", arr, FULL_RANGE_UINT16)
        names.append(f"images/img_{i}.png")
    return names


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_manifest_with_report_or_section_columns(tmp_path: Path, fmt: str):
    names = _write_images(tmp_path / "images", 4)
    df = pd.DataFrame({"image": names, "report": [REPORT, "FINDINGS: only findings.", REPORT, None],
                       "Impression": [None, None, "Column impression.", "Impression only in column."]})
    path = tmp_path / f"pairs.{fmt}"
    df.to_csv(path, index=False) if fmt == "csv" else df.to_parquet(path)
    with pytest.warns(ManifestWarning, match="1 of 4 reports"):
        pairs = ManifestPairs(ClipDataConfig(manifest=str(path), sections=["impression"], section_fallback="skip"))
    assert pairs.texts == ["No acute cardiopulmonary process.", "Column impression.", "Impression only in column."]
    img = pairs.load_image(0)
    assert img.shape == (1, 40, 48) and float(img.min()) >= 0 and float(img.max()) <= 1
    with pytest.warns(ManifestWarning, match="1 of 4 reports are empty"):
        full = ManifestPairs(ClipDataConfig(manifest=str(path), max_pairs=2))
    assert len(full) == 2 and full.texts[1] == "FINDINGS: only findings."


def test_chexzero_hdf5_layout_and_320_to_224_bicubic(tmp_path: Path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(3, 320, 320)).astype(np.float32)
    with h5py.File(tmp_path / "cxr.h5", "w") as fh:
        fh.create_dataset("cxr", data=images)
    pd.DataFrame({"filename": ["a", "b", "c"], "impression": ["No acute process.", "Effusion.", "Edema."]}).to_csv(
        tmp_path / "mimic_impressions.csv", index=False)
    cfg = ClipDataConfig(kind="chexzero", hdf5=str(tmp_path / "cxr.h5"),
                         manifest=str(tmp_path / "mimic_impressions.csv"), text_column="impression")
    pairs = CheXzeroPairs(cfg)
    assert pairs.texts == ["No acute process.", "Effusion.", "Edema."]
    img = pairs.load_image(1)
    torch.testing.assert_close(img[0], torch.from_numpy(images[1] / 255.0))
    pre = ClipPreprocessConfig()  # CheXzero/OpenAI preset: 320 stored, 224 input, bicubic, no flip
    assert (pre.stored_size, pre.size, pre.interpolation, pre.hflip_prob) == (320, 224, "bicubic", 0.0)
    out = PairImageTransform(pre, 3, train=True)(img)
    assert out.shape == (3, 224, 224) and float(out.min()) >= 0 and float(out.max()) <= 1
    ev = PairImageTransform(pre, 3, train=False)(img)
    import torchvision.transforms.v2.functional as TF
    from torchvision.transforms import InterpolationMode

    ref = TF.resize(img.expand(3, -1, -1), [224, 224], interpolation=InterpolationMode.BICUBIC, antialias=True)
    torch.testing.assert_close(ev, ref.clamp(0, 1))
    mean, std = preset_pixel_stats(pre, 3)
    assert [round(m, 3) for m in mean] == [0.481, 0.458, 0.408] and [round(s, 3) for s in std] == [0.269, 0.261, 0.276]


def test_flip_is_off_by_default_and_configurable():
    img = torch.linspace(0, 1, 64).view(1, 1, 64).expand(1, 64, 64).clone()
    pre = ClipPreprocessConfig(stored_size=64, size=64, crop_scale=[1.0, 1.0])
    torch.manual_seed(0)
    outs = [PairImageTransform(pre, 1, train=True)(img) for _ in range(8)]
    assert all(float(o[0, 0, -1] - o[0, 0, 0]) > 0 for o in outs)  # left-right order never swapped
    pre.hflip_prob = 1.0
    flipped = PairImageTransform(pre, 1, train=True)(img)
    assert float(flipped[0, 0, -1] - flipped[0, 0, 0]) < 0


def _batches(pairs, start: int, n: int, rank: int = 0, world: int = 1) -> list[dict]:
    loader = build_pair_loader(pairs, ClipPreprocessConfig(stored_size=40, size=32), 1, ClipBPETokenizer(32),
                               global_batch=4, seed=5, start_step=start, rank=rank, world_size=world)
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_loader_resumes_exactly_and_shards_the_global_batch(tmp_path: Path):
    names = _write_images(tmp_path / "images", 6)
    reports = [f"FINDINGS: finding number {i}. IMPRESSION: impression {i}." for i in range(6)]
    pd.DataFrame({"image": names, "report": reports}).to_csv(tmp_path / "m.csv", index=False)
    pairs = ManifestPairs(ClipDataConfig(manifest=str(tmp_path / "m.csv")))
    run = _batches(pairs, 0, 4)
    resumed = _batches(pairs, 2, 2)
    for a, b in zip(run[2:], resumed):
        torch.testing.assert_close(a["images"], b["images"])
        torch.testing.assert_close(a["input_ids"], b["input_ids"])
    r0, r1 = _batches(pairs, 1, 1, 0, 2)[0], _batches(pairs, 1, 1, 1, 2)[0]
    torch.testing.assert_close(torch.cat([r0["images"], r1["images"]]), run[1]["images"])
    assert torch.equal(torch.cat([r0["index"], r1["index"]]), run[1]["index"])
    b = run[0]
    assert b["images"].shape == (4, 1, 32, 32) and b["attention_mask"].sum(1).max() == b["input_ids"].shape[1]
    assert float(b["n_truncated"]) == 0.0


def test_zero_shot_label_sets_from_manifest_and_hdf5(tmp_path: Path):
    from medfoundry.config.clip import ZeroShotConfig
    from medfoundry.data.pairs import build_labelled_images

    names = _write_images(tmp_path / "images", 4)
    pd.DataFrame({"image": names, "Edema": [1, 0, -1, None], "Pleural Effusion": [0, 1, 1, 0],
                  "view": ["PA", "AP", "pa", "lateral"]}).to_csv(tmp_path / "labels.csv", index=False)
    ls = build_labelled_images(ZeroShotConfig(kind="manifest", labels=str(tmp_path / "labels.csv"),
                                              findings=["edema", "Pleural Effusion"], label_column="view",
                                              class_names=["PA", "AP"]))
    assert ls.binary.tolist() == [[1, 0], [0, 1], [-1, 1], [-1, 0]]  # -1/blank: unknown, left out of the AUC
    assert ls.classes.tolist() == [0, 1, 0, -1] and ls.load_image(3).shape == (1, 40, 48)
    with h5py.File(tmp_path / "test.h5", "w") as fh:
        fh.create_dataset("cxr", data=np.full((2, 320, 320), 255.0, dtype=np.float32))
    pd.DataFrame({"Edema": [0, 1]}).to_csv(tmp_path / "test_labels.csv", index=False)
    ls = build_labelled_images(ZeroShotConfig(kind="hdf5", hdf5=str(tmp_path / "test.h5"),
                                              labels=str(tmp_path / "test_labels.csv"), findings=["Edema"]))
    assert len(ls) == 2 and ls.binary.tolist() == [[0], [1]] and float(ls.load_image(1).min()) == 1.0
