"""The reader registry: a contract every registered reader keeps, and a new format added with one line.

Every reader in ``READERS`` (plus the toy ``.npy`` reader below, registered around each test) must have a
unique name, recognise a real file of its format written here (pydicom, nibabel, pynrrd, tifffile, PIL
through ``write_slice``, h5py, numpy) and none of the other readers' files, read it into the type it declares
with finite values and the right shape and spacing, and refuse a corrupt file with a ``ReaderError`` that
names it. A reader added to the registry without a sample here fails ``test_every_reader_has_a_sample``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from medical_testdata import downsample, render_level, write_ct_series, write_pyramid

from medfoundry.config.data import DataConfig
from medfoundry.data.prepare import PrepareOptions, prepare
from medfoundry.data.readers import (
    HU_UINT16,
    READERS,
    HDF5Images,
    Reader,
    ReaderError,
    Slide,
    Volume,
    detect_format,
    get_reader,
    read_volume,
    reader_for,
    register_reader,
    unregister_reader,
    write_slice,
)
from medfoundry.data.readers.base import check_finite
from medfoundry.data.readers.interface import READER_KINDS
from medfoundry.data.readers.medmnist import MedMNISTFile
from medfoundry.data.sources import build_source
from medfoundry_cli.cli import main as cli_main

# ---------------------------------------------------------------- the toy reader: one module's worth of code


class NpyVolumeReader(Reader):
    """A (Z, Y, X) array saved with ``numpy.save`` as a volume of 1 mm voxels in stored units."""

    name = "npy"
    label = "NumPy volume"
    kind = "volume"
    returns = Volume
    suffixes = (".npy",)

    def can_read(self, path: str | Path) -> bool:
        """The ``.npy`` suffix and, for a file that exists, numpy's magic string."""
        path = Path(path)
        if not super().can_read(path):
            return False
        if not path.is_file():
            return True  # a missing file: read() says so
        with open(path, "rb") as fh:
            return fh.read(6) == b"\x93NUMPY"

    def read(self, path: str | Path, **options: Any) -> Volume:
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            raise ReaderError(f"{path}: corrupt or unreadable .npy ({type(err).__name__}: {err})") from err
        if array.ndim != 3:
            raise ReaderError(f"{path}: wrong dimensions {array.shape}; expected a (Z, Y, X) volume")
        array = array.astype(np.float32)
        check_finite(array, str(path))
        return Volume(array=array, spacing=(1.0, 1.0, 1.0), affine=np.eye(4), path=str(path), meta={"format": "npy"})

    def depth(self, path: str | Path) -> int:
        return int(self.read(path).depth)


NPY_READER = NpyVolumeReader()


@contextmanager
def registered(reader: Reader) -> Iterator[Reader]:
    """``reader`` in the registry for the duration of the block (the one line a new format needs)."""
    register_reader(reader)
    try:
        yield reader
    finally:
        unregister_reader(reader.name)


# ---------------------------------------------------------------- one real file per format


@dataclass
class Sample:
    """A file of one format and what reading it must give."""

    path: Path
    shape: tuple[int, ...]  # Volume.array shape, HDF5 (N, H, W), MedMNIST (N all splits, H, W), slide (width, height)
    spacing: tuple[float, ...] | float = ()  # Volume spacing (z, y, x) mm, slide µm/px
    corrupt: Path | None = None  # a damaged file the reader claims
    extra: dict = field(default_factory=dict)


def _dicom(d: Path) -> Sample:
    hu = write_ct_series(d / "ct", spacing=(2.5, 0.7, 0.8))
    bad = d / "bad.dcm"
    bad.write_bytes(b"\x00" * 128 + b"DICM" + _junk(200))
    return Sample(d / "ct", hu.shape, (2.5, 0.7, 0.8), bad, {"values": hu})


def _nifti(d: Path) -> Sample:
    data = np.random.default_rng(0).integers(-100, 100, size=(5, 6, 7)).astype(np.int16)  # (x, y, z)
    nib.save(nib.Nifti1Image(data, np.diag([-1.5, -1.0, 2.0, 1.0])), d / "vol.nii.gz")  # RAS -> LPS diagonal
    bad = d / "bad.nii"
    bad.write_bytes(_junk(400))
    return Sample(d / "vol.nii.gz", (7, 6, 5), (2.0, 1.0, 1.5), bad, {"values": np.swapaxes(data, 0, 2)})


def _nrrd(d: Path) -> Sample:
    nrrd = pytest.importorskip("nrrd")
    data = np.random.default_rng(1).integers(0, 50, size=(4, 5, 6)).astype(np.int16)  # (x, y, z), LPS
    header = {"space": "left-posterior-superior", "space directions": np.diag([0.5, 0.6, 3.0]),
              "space origin": np.zeros(3)}
    nrrd.write(str(d / "vol.nrrd"), data, header)
    bad = d / "bad.nrrd"
    bad.write_bytes(b"not an NRRD header\n" * 20)
    return Sample(d / "vol.nrrd", (6, 5, 4), (3.0, 0.6, 0.5), bad, {"values": np.swapaxes(data, 0, 2)})


def _slide(d: Path) -> Sample:
    level0 = render_level(256.0, 192.0, 0.5)  # 512 x 384 px at 0.5 µm/px
    write_pyramid(d / "slide.tif", [level0, downsample(level0, 2)], mpp=0.5)
    bad = d / "bad.svs"
    bad.write_bytes(b"II*\x00" + _junk(300))
    return Sample(d / "slide.tif", (512, 384), 0.5, bad)


def _slice(d: Path) -> Sample:
    hu = np.random.default_rng(2).integers(-1000, 1500, size=(20, 24)).astype(np.float32)
    write_slice(d / "slice.png", hu, HU_UINT16)
    write_slice(d / "cut.png", hu, HU_UINT16)
    data = (d / "cut.png").read_bytes()
    (d / "cut.png").write_bytes(data[: len(data) // 2])
    return Sample(d / "slice.png", (1, 20, 24), (1.0, 1.0, 1.0), d / "cut.png", {"values": hu[None]})


def _hdf5(d: Path) -> Sample:
    images = np.random.default_rng(3).integers(0, 255, size=(3, 16, 18)).astype(np.uint8)
    with h5py.File(d / "cxr.h5", "w") as f:
        f.create_dataset("cxr", data=images)
    bad = d / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + _junk(300))
    return Sample(d / "cxr.h5", (3, 16, 18), corrupt=bad, extra={"values": images})


def _medmnist(d: Path) -> Sample:
    images = np.random.default_rng(6).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    arrays = {f"{split}_{part}": (images if part == "images" else np.array([[0], [1], [2]], np.uint8))
              for split in ("train", "val", "test") for part in ("images", "labels")}
    np.savez_compressed(d / "pathmnist.npz", **arrays)
    bad = d / "bad.npz"
    bad.write_bytes(b"PK\x03\x04" + _junk(300))
    return Sample(d / "pathmnist.npz", (9, 28, 28), corrupt=bad, extra={"values": images})


def _npy(d: Path) -> Sample:
    data = np.random.default_rng(4).standard_normal((4, 9, 10)).astype(np.float32)
    np.save(d / "vol.npy", data)
    bad = d / "bad.npy"
    bad.write_bytes(b"\x93NUMPY\x01\x00" + _junk(50))
    return Sample(d / "vol.npy", (4, 9, 10), (1.0, 1.0, 1.0), bad, {"values": data})


def _junk(n: int, seed: int = 0) -> bytes:
    """``n`` fixed pseudo-random bytes (a damaged file's body)."""
    return np.random.default_rng(seed).integers(0, 256, size=n, dtype=np.uint8).tobytes()


WRITERS: dict[str, Callable[[Path], Sample]] = {
    "dicom": _dicom, "nifti": _nifti, "nrrd": _nrrd, "slide": _slide, "slice": _slice, "hdf5": _hdf5, "npy": _npy,
    "medmnist": _medmnist,
}
NAMES = [r.name for r in READERS] + [NPY_READER.name]


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    """One file (and one corrupt file) per format; formats whose writer is not installed are left out."""
    out = {}
    for name, write in WRITERS.items():
        d = tmp_path_factory.mktemp(name)
        try:
            out[name] = write(d)
        except pytest.skip.Exception:
            continue
    return out


@pytest.fixture()
def toy() -> Iterator[Reader]:
    with registered(NPY_READER) as reader:
        yield reader


def _sample(samples: dict[str, Sample], name: str) -> Sample:
    if name not in samples:
        pytest.skip(f"the writer of '{name}' files is not installed")
    return samples[name]


# ---------------------------------------------------------------- the contract


def test_names_are_unique_and_described(toy) -> None:
    names = [r.name for r in READERS]
    assert len(names) == len(set(names)) and all(names)
    for reader in READERS:
        assert reader.label and reader.kind in READER_KINDS and isinstance(reader.returns, type), reader
        assert all(s.startswith(".") and s == s.lower() for s in reader.suffixes), reader
    with pytest.raises(ValueError, match="already registered"):
        register_reader(NpyVolumeReader())


def test_every_reader_has_a_sample() -> None:
    missing = [r.name for r in READERS if r.name not in WRITERS]
    assert not missing, f"readers without a sample file in {Path(__file__).name}: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_can_read_its_files_and_no_others(name: str, samples, toy) -> None:
    reader = get_reader(name)
    own = _sample(samples, name)
    assert reader.can_read(own.path)
    assert detect_format(own.path) == name and reader_for(own.path) is reader
    for other, sample in samples.items():
        if other != name:
            assert not reader.can_read(sample.path), f"{name} claims the {other} file {sample.path.name}"


@pytest.mark.parametrize("name", NAMES)
def test_read_gives_declared_type(name: str, samples, toy) -> None:
    reader, sample = get_reader(name), _sample(samples, name)
    result = reader.read(sample.path)
    assert isinstance(result, reader.returns)
    if isinstance(result, Volume):
        assert result.array.dtype == np.float32 and np.isfinite(result.array).all()
        assert result.array.shape == sample.shape
        assert result.spacing == pytest.approx(sample.spacing)
        assert reader.depth(sample.path) == result.depth
        if "values" in sample.extra:
            np.testing.assert_allclose(result.array, sample.extra["values"], rtol=1e-6)
    elif isinstance(result, Slide):
        with result:
            assert result.dimensions == sample.shape and result.mpp == pytest.approx(sample.spacing)
            tile = result.read_tile(0, 0, 64, 1.0)
            assert tile.shape == (64, 64, 3) and tile.dtype == np.uint8
    elif isinstance(result, HDF5Images):
        assert result.shape == sample.shape
        row = result.read(1)
        assert row.dtype == np.float32 and np.isfinite(row).all()
        np.testing.assert_array_equal(row, sample.extra["values"][1])
        result.close()
    elif isinstance(result, MedMNISTFile):
        assert len(result) == sample.shape[0] and result.image_shape == sample.shape[1:]
        row = result.image("val", 1)
        assert row.dtype == np.float32 and np.isfinite(row).all()
        np.testing.assert_array_equal(row, sample.extra["values"][1] / np.float32(255))
    else:
        pytest.fail(f"no check for the type {reader.returns.__name__} that '{name}' reads")


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_file_raises_reader_error_naming_it(name: str, samples, toy) -> None:
    reader, sample = get_reader(name), _sample(samples, name)
    assert sample.corrupt is not None and reader.can_read(sample.corrupt)
    with pytest.raises(ReaderError, match=sample.corrupt.name):
        reader.read(sample.corrupt)
    if reader.kind == "volume":
        with pytest.raises(ReaderError, match=sample.corrupt.name):
            reader.depth(sample.corrupt)


# ---------------------------------------------------------------- a new format with one registry line


def test_registering_a_reader_makes_every_entry_point_accept_it(tmp_path: Path, samples) -> None:
    src = tmp_path / "raw"
    src.mkdir()
    data = np.random.default_rng(5).integers(-500, 500, size=(5, 8, 9)).astype(np.float32)
    np.save(src / "scan.npy", data)
    assert detect_format(src / "scan.npy") is None
    with pytest.raises(ReaderError, match="not a recognised image"):
        read_volume(src / "scan.npy")
    before = prepare(src, tmp_path / "before", PrepareOptions(progress=False))
    assert not before.written and "not an image file" in dict(before.failed)["scan.npy"]

    with registered(NpyVolumeReader()):
        assert detect_format(src / "scan.npy") == "npy"
        np.testing.assert_array_equal(read_volume(src / "scan.npy").array, data)

        out = tmp_path / "out"
        assert cli_main(["prepare", str(src), "--out", str(out), "--no-progress"]) == 0
        rows = pd.read_csv(out / "manifest.csv")
        assert list(rows["source"]) == ["scan.npy"] and list(rows["depth"]) == [5]
        prepared = build_source(DataConfig(kind="prepared", root=str(out), split="", slices=3))
        _check_stacks(prepared, data)

        pd.DataFrame({"path": [str(src / "scan.npy")], "patient_id": ["P"]}).to_csv(tmp_path / "m.csv", index=False)
        _check_stacks(build_source(DataConfig(kind="manifest", root=str(tmp_path / "m.csv"), split="", slices=3)), data)
        _check_stacks(build_source(DataConfig(kind="nifti", root=str(src), slices=3)), data)

    assert detect_format(src / "scan.npy") is None  # unregistered again


def _check_stacks(source, data: np.ndarray) -> None:
    """Every slice of the one volume is an item: slices z-1, z, z+1 (edges replicated) in stored units."""
    assert len(source) == data.shape[0]
    for z in range(data.shape[0]):
        sample = source[z]
        assert sample.meta["position"] == z
        lo, hi = max(z - 1, 0), min(z + 1, data.shape[0] - 1)
        np.testing.assert_array_equal(sample.image.numpy(), data[[lo, z, hi]])
