"""The real pydicom-data frames exported as 16-bit PNGs record their value mapping (old exports get it added)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medfoundry.data.image_folder import read_image_file
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, read_mapping

pytest.importorskip("data_store", reason="pydicom-data is not installed")


def test_exported_frames_record_full_range_and_stale_exports_are_upgraded(tmp_path: Path) -> None:
    from medfoundry.data.bundled import export_pydicom_samples

    files = export_pydicom_samples(tmp_path, max_side=32)
    assert files and all(read_mapping(f) == FULL_RANGE_UINT16 for f in files)
    first = files[0]
    with Image.open(first) as im:
        pixels = np.asarray(im).copy()
    assert pixels.dtype == np.uint16
    Image.fromarray(pixels).save(first)  # what an export before mappings were recorded looks like
    assert read_mapping(first) is None
    export_pydicom_samples(tmp_path, max_side=32)
    assert read_mapping(first) == FULL_RANGE_UINT16
    assert np.array_equal(read_image_file(first), pixels.astype(np.float32) / 65535.0)  # same pixels
