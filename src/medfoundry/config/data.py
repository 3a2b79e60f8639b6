"""Configuration of the training data source."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class DataConfig:
    """Where training images come from and how they are turned into tensors."""

    kind: str = "image_folder"  # data source: image_folder, dicom, nifti, slices, hdf5, wsi, manifest, prepared
    root: str = ""  # folder, file, manifest (CSV/Parquet) or `medfoundry prepare` output folder
    extensions: list[str] = field(
        default_factory=lambda: [".png", ".jpg", ".jpeg", ".tif", ".tiff"]
    )  # file suffixes picked up by image_folder
    channels: int = 3  # channels delivered to the model: grey images are repeated, RGB averaged for 1
    num_workers: int = 0  # DataLoader worker processes
    max_bad_fraction: float = 0.01  # share of unreadable samples tolerated before training stops
    split: str = ""  # manifest split to use (train, val, test); "" = every row
    modalities: list[str] = field(default_factory=list)  # DICOM Modality tags kept, e.g. [CT]; [] = every modality
    text_column: str = "report"  # manifest / report-CSV column holding report text (goes to Sample.meta)
    slices: int = 1  # slices stacked as channels around the sampled one (3 = 2.5D: z-s, z, z+s)
    slice_stride: int = 1  # distance in slices between stacked neighbours
    slice_edge: Literal["replicate", "reflect", "skip"] = "replicate"  # neighbours beyond the volume's ends
    slice_sampling: Literal["all", "one_per_volume"] = "all"  # every slice an item, or one random slice per volume
    volume_cache: int = 2  # decoded NIfTI/NRRD volumes kept in memory per worker
    slice_slope: Optional[float] = None  # PNG/TIFF slices without a recorded mapping: value = stored*slope+intercept
    slice_intercept: Optional[float] = None  # see slice_slope (e.g. -32768 with slope 1 for PNGs storing HU+32768)
    # >8-bit pictures with no recorded or configured mapping: refuse, or full_range (a [0, 1] picture over 0..65535)
    unmapped_16bit: Literal["refuse", "full_range"] = "refuse"
    hdf5_dataset: str = "cxr"  # dataset inside the HDF5 file holding the (N, H, W) images
    hdf5_reports: str = ""  # CSV whose rows align with the HDF5 images (report text in text_column)
    tile_mpp: float = 0.5  # whole-slide tiles: microns per pixel (0.5 ~ 20x, 0.25 ~ 40x)
    tile_size: int = 224  # whole-slide tile side in pixels at tile_mpp
    min_tissue: float = 0.25  # smallest tissue fraction (Otsu on a thumbnail) for a tile to be used
    slide_mpp: Optional[float] = None  # level-0 µm/px for slides whose metadata lack it
    wsi_backend: Literal["auto", "openslide", "tifffile"] = "auto"  # slide reader (auto: openslide if installed)
    intensity: Literal["identity", "range", "window"] = "identity"  # source units -> [0, 1]: as is, range, HU window
    value_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # [low, high] -> [0, 1] for intensity=range
    windows: list[str] = field(default_factory=lambda: ["lung"])  # HU windows (preset or 'centre:width'), channels each
    random_window_prob: float = 0.0  # chance per sample (or view) and window of a random HU window instead (DINO-X)
    random_window_per_view: bool = False  # a fresh random window for every crop, as DINO-X (else per sample)
    window_center_range: list[float] = field(default_factory=lambda: [-600.0, 400.0])  # random window centre (HU)
    window_width_range: list[float] = field(default_factory=lambda: [300.0, 2000.0])  # random window width (HU)
