"""Image arrays in HDF5 (e.g. CheXzero's 320x320 chest X-rays: dataset ``cxr`` of shape (N, 320, 320)).

The file is opened lazily in each process (h5py handles do not survive ``fork``), and images are read
one row at a time, so DataLoader workers can share one large file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from medfoundry.data.readers.base import ReaderError
from medfoundry.data.readers.interface import Reader

HDF5_SUFFIXES = (".h5", ".hdf5", ".hdf", ".he5")


class HDF5Images:
    """Row ``i`` of dataset ``dataset`` of an HDF5 file as an (H, W) or (H, W, C) / (C, H, W) array.

    Values are returned as stored (float32); the intensity transform maps them to [0, 1]
    (e.g. ``data.intensity=range`` with ``data.value_range=[0, 255]`` for CheXzero's file).
    """

    def __init__(self, path: str | Path, dataset: str = "cxr") -> None:
        import h5py

        self.path = str(path)
        self.dataset = dataset
        try:
            with h5py.File(self.path, "r") as f:
                if dataset not in f:
                    names = []
                    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
                    raise ReaderError(f"{self.path}: no dataset '{dataset}' (set data.hdf5_dataset); datasets: {names}")
                ds = f[dataset]
                self.shape = tuple(ds.shape)
                self.dtype = ds.dtype
                self.attrs: dict[str, Any] = {k: ds.attrs[k] for k in ds.attrs}
        except ReaderError:
            raise
        except FileNotFoundError as err:
            raise ReaderError(f"{self.path}: no such file") from err
        except Exception as err:
            raise ReaderError(f"{self.path}: corrupt or unreadable HDF5 ({type(err).__name__}: {err})") from err
        if len(self.shape) not in (3, 4):
            raise ReaderError(
                f"{self.path}: dataset '{dataset}' has shape {self.shape}; expected (N, H, W) or (N, H, W, C)"
            )
        self._file = None
        self._pid = -1

    def __len__(self) -> int:
        return int(self.shape[0])

    def _dataset(self):
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file[self.dataset]

    def read(self, index: int) -> np.ndarray:
        """Row ``index`` as float32, as stored."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range for {len(self)} images")
        try:
            return np.asarray(self._dataset()[index], dtype=np.float32)
        except Exception as err:
            raise ReaderError(f"{self.path}[{index}]: unreadable ({type(err).__name__}: {err})") from err

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = None
        state["_pid"] = -1
        return state


class HDF5Reader(Reader):
    """HDF5 files of image rows; read by their data source (``data.kind=hdf5``), not converted by prepare."""

    name = "hdf5"
    label = "HDF5"
    kind = "images"
    returns = HDF5Images
    suffixes = HDF5_SUFFIXES

    def read(self, path: str | Path, dataset: str = "cxr", **options: Any) -> HDF5Images:
        return HDF5Images(path, dataset)


HDF5_READER = HDF5Reader()
