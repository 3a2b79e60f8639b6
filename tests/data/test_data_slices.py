"""PNG/TIFF slices with a recorded value mapping; HDF5 image arrays."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from PIL import Image

from medfoundry.config.data import DataConfig
from medfoundry.data.intensity import build_intensity_transform
from medfoundry.data.readers import HU_UINT16, MappingMismatchError, ReaderError, ValueMapping, read_slice, write_slice
from medfoundry.data.readers.slices import UnmappedImageError, read_mapping, sidecar_path, window_mapping
from medfoundry.data.sources import build_source

HU = np.array([[-1024, -1000, -600, -100], [0, 40, 400, 1200], [3071, -50, 60, 2000]], dtype=np.float32)


@pytest.mark.parametrize("name", ["s.png", "s.tif"])
def test_hu_round_trip_through_16_bit_file(tmp_path: Path, name: str) -> None:
    write_slice(tmp_path / name, HU, HU_UINT16, "uint16")
    values, mapping = read_slice(tmp_path / name)
    np.testing.assert_array_equal(values, HU)
    assert mapping == HU_UINT16 and read_mapping(tmp_path / name) == HU_UINT16
    stored = tifffile.imread(tmp_path / name) if name.endswith("tif") else np.asarray(Image.open(tmp_path / name))
    assert stored.dtype == np.uint16 and int(stored[0, 0]) == -1024 + 32768  # stored = HU + 32768


def test_scale_mismatch_bug_is_caught(tmp_path: Path) -> None:
    """Stored as HU + 32768, read as (x - 32768) * 0.1: the known lung-CT pipeline bug."""
    write_slice(tmp_path / "s.png", HU, HU_UINT16, "uint16")
    buggy = ValueMapping(slope=0.1, intercept=-3276.8)
    # what the bug does silently: air at -1000 HU becomes -100 HU, a plausible but wrong number
    stored = np.asarray(Image.open(tmp_path / "s.png")).astype(np.float32)
    assert buggy.to_units(stored)[0, 1] == pytest.approx(-100.0, abs=0.01)
    # the reader refuses a mapping that contradicts the recorded one ...
    with pytest.raises(MappingMismatchError, match="contradicts the one recorded"):
        read_slice(tmp_path / "s.png", buggy)
    # ... also through the config, and the matching mapping is accepted
    cfg = DataConfig(kind="slices", root=str(tmp_path), slice_slope=0.1, slice_intercept=-3276.8, channels=1)
    with pytest.raises(MappingMismatchError):
        build_source(cfg)[0]
    cfg = DataConfig(kind="slices", root=str(tmp_path), slice_slope=1.0, slice_intercept=-32768.0, channels=1)
    np.testing.assert_array_equal(build_source(cfg)[0].image[0].numpy(), HU)


def test_unrecorded_mapping_needs_config_and_sidecar_works(tmp_path: Path) -> None:
    Image.fromarray((HU + 32768).astype(np.uint16)).save(tmp_path / "plain.png")  # no mapping recorded
    with pytest.raises(ReaderError, match="no value mapping recorded"):
        read_slice(tmp_path / "plain.png")
    values, _ = read_slice(tmp_path / "plain.png", HU_UINT16)
    np.testing.assert_array_equal(values, HU)
    with pytest.raises(UnmappedImageError, match="16-bit pixels .* data.unmapped_16bit=full_range"):
        read_slice(tmp_path / "plain.png", require_mapping=False)  # a 16-bit "plain picture" is not taken on trust
    values, used = read_slice(tmp_path / "plain.png", require_mapping=False, unmapped_16bit="full_range")
    assert used is None and values.max() <= 1.0  # the explicit opt-in: scaled by its type
    sidecar_path(tmp_path / "plain.png").write_text('{"medfoundry.value_mapping": {"slope": 1, "intercept": -32768}}')
    np.testing.assert_array_equal(read_slice(tmp_path / "plain.png")[0], HU)


def test_8_bit_window_mapping_and_overflow(tmp_path: Path) -> None:
    m = window_mapping(-600, 1500, "uint8")  # lung window over 0..255
    write_slice(tmp_path / "lung.png", HU, m, "uint8", clip=True)
    values, used = read_slice(tmp_path / "lung.png")
    inside = (HU >= -1350) & (HU <= 150)
    assert np.all(np.abs(values - HU)[inside] <= m.slope / 2 + 1e-3)
    with pytest.raises(ValueError, match="do not fit uint8"):
        write_slice(tmp_path / "x.png", HU, m, "uint8")


def test_truncated_png_is_a_reader_error(tmp_path: Path) -> None:
    write_slice(tmp_path / "s.png", np.zeros((64, 64)), HU_UINT16)
    data = (tmp_path / "s.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ReaderError, match="t.png"):
        read_slice(tmp_path / "t.png")


def test_hdf5_chexzero_layout_with_reports(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = (rng.random((5, 32, 32)) * 255).astype(np.float32)  # CheXzero: float32 in 0..255
    with h5py.File(tmp_path / "cxr.h5", "w") as f:
        f.create_dataset("cxr", data=images)
    pd.DataFrame({"filename": [f"{i}.jpg" for i in range(5)],
                  "impression": [f"report {i}" for i in range(5)]}).to_csv(tmp_path / "r.csv", index=False)
    cfg = DataConfig(kind="hdf5", root=str(tmp_path / "cxr.h5"), hdf5_reports=str(tmp_path / "r.csv"),
                     text_column="impression", intensity="range", value_range=[0.0, 255.0], channels=3)
    src = build_source(cfg)
    assert len(src) == 5
    s = src[3]
    assert s.image.shape == (1, 32, 32) and s.meta["report"] == "report 3"
    np.testing.assert_allclose(s.image[0].numpy(), images[3])
    out = build_intensity_transform(cfg)(s.image)
    assert out.shape == (3, 32, 32)
    torch.testing.assert_close(out[0], torch.from_numpy(images[3] / 255.0))
    with pytest.raises(ReaderError, match="no dataset 'images'"):
        build_source(DataConfig(kind="hdf5", root=str(tmp_path / "cxr.h5"), hdf5_dataset="images"))
