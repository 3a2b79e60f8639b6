"""Writers of small real-format medical files for the data tests (DICOM, NIfTI, pyramidal TIFF, HDF5).

Not a test module: imported by the ``test_data_*`` files (pytest puts this folder on ``sys.path``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

RNG_SEED = 1234


def ct_phantom(depth: int = 6, rows: int = 24, cols: int = 28, seed: int = 0) -> np.ndarray:
    """Stored int16 values of a CT-like phantom (Z, Y, X): air around a body with a dense disc; slices differ."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols]
    out = np.empty((depth, rows, cols), dtype=np.int16)
    for z in range(depth):
        body = ((yy - rows / 2) / (rows * 0.42)) ** 2 + ((xx - cols / 2) / (cols * 0.42)) ** 2 < 1
        disc = (yy - rows / 2 - 2) ** 2 + (xx - cols / 3 - z) ** 2 < (rows / 6) ** 2
        img = np.where(body, 2000 + 40 * z, 0) + np.where(disc, 1500, 0)
        out[z] = img + rng.integers(0, 20, size=img.shape)
    return out


def axial_slice(sop_class: str, modality: str, patient_id: str, study_uid: str, series_uid: str, instance: int,
                position: list[float]):
    """The header every single-slice test file shares: SOP/file meta, modality, ids, axial orientation, position."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = position
    return ds


def write_ct_series(
    folder: str | Path,
    stored: np.ndarray | None = None,
    slope: float = 0.5,
    intercept: float = -1000.0,
    spacing: tuple[float, float, float] = (2.5, 0.7, 0.8),
    origin: tuple[float, float, float] = (-10.0, -20.0, 30.0),
    patient_id: str = "PAT-1",
    series_uid: str | None = None,
    shuffle: bool = True,
    seed: int = 0,
) -> np.ndarray:
    """Write an axial CT series, one file per slice, files and instance numbers in shuffled order.

    Returns the expected HU volume (Z, Y, X) in ascending slice position.
    """
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stored = ct_phantom(seed=seed) if stored is None else stored
    depth, rows, cols = stored.shape
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    order = np.random.default_rng(seed + 7).permutation(depth) if shuffle else np.arange(depth)
    for z in range(depth):
        ds = axial_slice(CTImageStorage, "CT", patient_id, study_uid, series_uid, int(order[z]) + 1,
                         [origin[0], origin[1], origin[2] + z * spacing[0]])  # instance deliberately not spatial
        ds.PixelSpacing = [spacing[1], spacing[2]]
        ds.SliceThickness = spacing[0]
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        ds.RescaleType = "HU"
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(stored[z], dtype="<i2").tobytes()
        pydicom.dcmwrite(folder / f"im{int(order[z]):04d}_{(z * 7919) % 1000:03d}.dcm", ds, enforce_file_format=True)
    return stored.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def write_multiframe(path: str | Path, stored: np.ndarray, slopes: list[float], intercepts: list[float],
                     spacing_z: float = 3.0) -> None:
    """A multi-frame CT file with per-frame positions and rescale, frames stored in *descending* position."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    depth, rows, cols = stored.shape
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "MF-1"
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = depth
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    ori = Dataset()
    ori.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures = Dataset()
    measures.PixelSpacing = [0.5, 0.5]
    measures.SliceThickness = spacing_z
    shared.PlaneOrientationSequence = Sequence([ori])
    shared.PixelMeasuresSequence = Sequence([measures])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for f in range(depth):
        item = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, (depth - 1 - f) * spacing_z]  # frame 0 is the top slice
        item.PlanePositionSequence = Sequence([pos])
        pvt = Dataset()
        pvt.RescaleSlope = slopes[f]
        pvt.RescaleIntercept = intercepts[f]
        pvt.RescaleType = "HU"
        item.PixelValueTransformationSequence = Sequence([pvt])
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    pydicom.dcmwrite(path, ds, enforce_file_format=True)


def physical_pattern(x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
    """A smooth RGB uint8 pattern defined in microns, so slides at any resolution show the same thing."""
    r = 128 + 100 * np.sin(2 * np.pi * x_um / 90.0)
    g = 128 + 100 * np.cos(2 * np.pi * y_um / 70.0)
    b = 128 + 80 * np.sin(2 * np.pi * (x_um + y_um) / 130.0)
    return np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)


def render_level(width_um: float, height_um: float, mpp: float) -> np.ndarray:
    """The pattern sampled at pixel centres at ``mpp`` µm/px."""
    w, h = int(round(width_um / mpp)), int(round(height_um / mpp))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return physical_pattern((xs + 0.5) * mpp, (ys + 0.5) * mpp)


def write_pyramid(path: str | Path, levels: list[np.ndarray], mpp: float, unit: str = "CENTIMETER",
                  subifds: bool = True, compression: str = "zlib", tile: int = 128) -> None:
    """A tiled pyramidal TIFF with level-0 resolution tags; levels as SubIFDs or as separate reduced pages."""
    import tifffile

    per_unit = {"CENTIMETER": 1e4, "INCH": 25400.0}[unit]
    common = dict(tile=(tile, tile), photometric="rgb", compression=compression, resolutionunit=unit)
    with tifffile.TiffWriter(path) as tw:
        res0 = (per_unit / mpp, per_unit / mpp)
        tw.write(levels[0], resolution=res0, subifds=len(levels) - 1 if subifds else 0, metadata=None, **common)
        for lvl in levels[1:]:
            ds = levels[0].shape[1] / lvl.shape[1]
            res = (per_unit / (mpp * ds), per_unit / (mpp * ds))
            tw.write(lvl, resolution=res, subfiletype=1, metadata=None, **common)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Box-average an (H, W, 3) uint8 image by an integer factor."""
    h, w = img.shape[0] // factor * factor, img.shape[1] // factor * factor
    blocks = img[:h, :w].reshape(h // factor, factor, w // factor, factor, -1).astype(np.float32)
    return blocks.mean(axis=(1, 3)).round().astype(np.uint8)
