"""16-bit pictures are read by their recorded value mapping, the configured one, or an explicit opt-in; never guessed.

Real files only: PNGs written with PIL (through ``write_stored``/``write_slice`` or bare ``Image.save``), TIFFs
with tifffile, sidecars as JSON text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from medfoundry.config.data import DataConfig
from medfoundry.data.image_folder import read_image_file, read_picture
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.pairs import read_image
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.data.readers.slices import (
    FULL_RANGE_UINT8,
    FULL_RANGE_UINT16,
    HU_UINT16,
    MAPPING_KEY,
    MappingMismatchError,
    UnmappedImageError,
    read_mapping,
    sidecar_path,
    write_slice,
    write_stored,
)
from medfoundry.data.sources import build_source
from medfoundry.errors import UserError
from medfoundry.eval.eval_images import eval_transform_from_config, read_eval_image
from medfoundry.eval.labelled_set import LabelledItem
from medfoundry.eval.sections import FrozenEvalSections

RNG = np.random.default_rng(7)
PICTURE = (RNG.random((20, 24)) * 65535).astype(np.uint16)  # a [0, 1] picture over 0..65535
HU = np.round(RNG.uniform(-1000, 1500, (20, 24))).astype(np.float32)  # CT values
HU_PLUS_1024 = (HU + 1024).astype(np.uint16)  # how many exporters store CT in a 16-bit PNG


def test_full_range_mapping_reads_bit_identical_to_dividing_by_65535(tmp_path: Path) -> None:
    """What golden traces and measured quality numbers rest on: the recorded full-range mapping is that division."""
    write_stored(tmp_path / "a.png", PICTURE, FULL_RANGE_UINT16)
    write_stored(tmp_path / "b.tif", PICTURE, FULL_RANGE_UINT16)
    want = PICTURE.astype(np.float32) / 65535.0
    for name in ("a.png", "b.tif"):
        values, used = read_picture(tmp_path / name)
        assert used == FULL_RANGE_UINT16 and values.dtype == np.float32
        assert np.array_equal(values, want), name  # bit for bit, not approximately
    assert read_mapping(tmp_path / "a.png") == FULL_RANGE_UINT16  # recorded in the PNG text chunk
    with Image.open(tmp_path / "a.png") as im:
        assert np.array_equal(np.asarray(im), PICTURE)  # the pixels are exactly the stored integers


def test_unmapped_16bit_png_and_tiff_are_refused_naming_file_and_fixes(tmp_path: Path) -> None:
    Image.fromarray(HU_PLUS_1024).save(tmp_path / "ct.png")  # no mapping recorded anywhere
    tifffile.imwrite(tmp_path / "ct.tif", HU_PLUS_1024)
    for name in ("ct.png", "ct.tif"):
        with pytest.raises(UnmappedImageError) as err:
            read_image_file(tmp_path / name)
        message = str(err.value)
        assert "\n" not in message and str(tmp_path / name) in message
        for fix in ("data.slice_slope", "data.slice_intercept", "data.unmapped_16bit=full_range", "write_stored",
                    f"{name}.json"):
            assert fix in message, (fix, message)
    assert issubclass(UnmappedImageError, UserError)  # the CLI reports it in one line, exit code 2


def test_image_folder_source_refuses_when_built(tmp_path: Path) -> None:
    """The first file is read when the source is built, so the refusal comes before any training step."""
    for i in range(3):
        Image.fromarray(HU_PLUS_1024).save(tmp_path / f"s{i}.png")
    with pytest.raises(UnmappedImageError, match="s0.png"):
        build_source(DataConfig(root=str(tmp_path), channels=1))


def test_opt_in_full_range_matches_the_old_reading(tmp_path: Path) -> None:
    Image.fromarray(PICTURE).save(tmp_path / "p.png")
    values = read_image_file(tmp_path / "p.png", unmapped_16bit="full_range")
    assert np.array_equal(values, PICTURE.astype(np.float32) / 65535.0)
    src = build_source(DataConfig(root=str(tmp_path), channels=1, unmapped_16bit="full_range"))
    assert torch.equal(src[0].image[0], torch.from_numpy(PICTURE.astype(np.float32) / 65535.0))


def test_configured_mapping_gives_hu_and_identity_intensity_then_refuses(tmp_path: Path) -> None:
    """HU + 1024 with data.slice_slope=1, data.slice_intercept=-1024 is HU: a window maps it, identity refuses it."""
    Image.fromarray(HU_PLUS_1024).save(tmp_path / "ct.png")
    cfg = DataConfig(root=str(tmp_path), channels=1, slice_slope=1.0, slice_intercept=-1024.0)
    image = build_source(cfg)[0].image
    assert torch.equal(image[0], torch.from_numpy(HU))
    with pytest.raises(ValueError, match="data.intensity=identity expects values in"):
        build_intensity_transform(cfg)(image)
    lung = build_intensity_transform(DataConfig(channels=1, intensity="window", windows=["lung"]))(image)
    want = np.clip((HU - (-600 - 1500 / 2)) / 1500, 0, 1)  # lung window: centre -600, width 1500
    np.testing.assert_allclose(lung[0].numpy(), want, atol=1e-6)


def test_recorded_mapping_wins_and_a_contradicting_config_is_an_error(tmp_path: Path) -> None:
    write_slice(tmp_path / "ct.png", HU, HU_UINT16)  # stored = HU + 32768, recorded
    assert np.array_equal(read_image_file(tmp_path / "ct.png"), HU)
    cfg = DataConfig(root=str(tmp_path), channels=1, slice_slope=1.0, slice_intercept=-1024.0)
    with pytest.raises(MappingMismatchError, match="contradicts the one recorded"):
        build_source(cfg)[0]


def test_sidecar_mapping_is_used(tmp_path: Path) -> None:
    Image.fromarray(HU_PLUS_1024).save(tmp_path / "ct.png")
    sidecar_path(tmp_path / "ct.png").write_text(json.dumps({MAPPING_KEY: {"slope": 1, "intercept": -1024}}))
    assert np.array_equal(read_image_file(tmp_path / "ct.png"), HU)


def test_8_bit_pictures_stay_divided_by_255(tmp_path: Path) -> None:
    grey = (RNG.random((10, 12)) * 255).astype(np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert np.array_equal(read_image_file(tmp_path / "g.png"), grey.astype(np.float32) / 255.0)
    write_stored(tmp_path / "m.png", grey, FULL_RANGE_UINT8)
    assert np.array_equal(read_image_file(tmp_path / "m.png"), grey.astype(np.float32) / 255.0)


def test_evaluation_reads_pictures_with_the_runs_rules(tmp_path: Path) -> None:
    Image.fromarray(HU_PLUS_1024).save(tmp_path / "ct.png")
    item = LabelledItem(str(tmp_path / "ct.png"), "x")
    with pytest.raises(UnmappedImageError):
        read_eval_image(item)
    sections = FrozenEvalSections(data=DataConfig(channels=1, slice_slope=1.0, slice_intercept=-1024.0,
                                                  intensity="window", windows=["lung"]))
    transform = eval_transform_from_config(sections, 16)
    assert torch.equal(transform.read(item)[0], torch.from_numpy(HU))
    assert transform.load(item).shape == (1, 16, 16)
    assert "pictures" in transform.settings()  # feature caches keyed by the mapping


def test_clip_pair_images_refuse_unmapped_16bit_and_hu_mappings(tmp_path: Path) -> None:
    Image.fromarray(PICTURE).save(tmp_path / "plain.png")
    with pytest.raises(UnmappedImageError) as err:
        read_image(tmp_path / "plain.png")
    assert "data.slice_slope" not in str(err.value)  # keys of the image sources do not reach CLIP pairs
    write_slice(tmp_path / "ct.png", HU, HU_UINT16)
    with pytest.raises(UserError, match="pairs take \\[0, 1\\] pictures"):
        read_image(tmp_path / "ct.png")
    write_stored(tmp_path / "ok.png", PICTURE, FULL_RANGE_UINT16)
    assert torch.equal(read_image(tmp_path / "ok.png")[0], torch.from_numpy(PICTURE.astype(np.float32) / 65535.0))


def test_prepare_skips_unmapped_16bit_slices_unless_told(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(HU_PLUS_1024).save(src / "plain.png")
    write_slice(src / "mapped.png", HU, HU_UINT16)
    report = prepare(src, tmp_path / "out", PrepareOptions(progress=False))
    assert [Path(s).name for s in report.written] == ["mapped.png"]
    assert len(report.failed) == 1 and "plain.png" in report.failed[0][0]
    assert "--unmapped-16bit full_range" in report.failed[0][1]
    again = prepare(src, tmp_path / "out", PrepareOptions(progress=False, unmapped_16bit="full_range"))
    assert "plain.png" in {Path(s).name for s in again.written} and not again.failed
