"""The reader interface: what one file format tells the rest of medfoundry about its files.

A :class:`Reader` recognises its files cheaply (:meth:`Reader.can_read`: suffix and a few magic bytes, never
decoding) and reads them (:meth:`Reader.read`). Its :attr:`Reader.kind` says what a file holds, and so which
code path of the training sources (:mod:`medfoundry.data.medical_sources`) and of ``medfoundry prepare``
(:mod:`medfoundry.data.prepare`) takes it; those paths ask the reader, never compare format names:

* ``volume``: one file is one 3-D volume, decoded whole by ``read(path) -> Volume``; ``depth(path)`` gives
  its number of slices (from the header where possible). NIfTI, NRRD, and what most new formats are.
* ``series``: files grouped into series, read slice by slice (DICOM; ``read(path, series_uid=) -> Volume``).
* ``slice``: a 2-D picture with a recorded value mapping (PNG/TIFF/JPEG; ``read(path, slice_mapping=)`` gives
  a one-slice ``Volume``).
* ``slide``: a whole-slide image read as tiles (``read(path, backend=, mpp=) -> Slide``).
* ``images``: a file holding many 2-D images read row by row (HDF5; ``read(path, dataset=) -> HDF5Images``);
  used directly by its data source, not in manifests nor converted by ``prepare``.

The readers are tried in the order of :data:`medfoundry.data.readers.registry.READERS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Literal

ReaderKind = Literal["volume", "series", "slice", "slide", "images"]
READER_KINDS: tuple[str, ...] = ("volume", "series", "slice", "slide", "images")


def has_suffix(path: str | Path, suffixes: tuple[str, ...]) -> bool:
    """Case-insensitive test of a (possibly double) suffix such as ``.nii.gz``."""
    name = str(path).lower()
    return any(name.endswith(s) for s in suffixes)


class Reader(ABC):
    """One file format (see the module doc). Subclasses set the class attributes and implement :meth:`read`.

    Contract (checked for every registered reader by ``tests/data/test_data_readers_registry.py``):
    a unique :attr:`name`; :meth:`can_read` true on the format's files and false on the other readers';
    :meth:`read` returns an instance of :attr:`returns` with finite values; an unreadable or corrupt file
    raises :class:`~medfoundry.data.readers.base.ReaderError` whose message names the file.
    """

    name: str = ""  # what detect_format() answers, e.g. "nifti"; unique in the registry
    label: str = ""  # what messages call it, e.g. "NIfTI"
    kind: ReaderKind = "volume"  # what a file holds (see the module doc)
    returns: type = object  # what read() returns: Volume, Slide, HDF5Images ...
    suffixes: tuple[str, ...] = ()  # lower-case file suffixes, e.g. (".nii", ".nii.gz")

    def can_read(self, path: str | Path) -> bool:
        """True when ``path`` looks like this format's file; cheap (suffix, magic bytes), never decodes.

        The default: a path that is not a folder and ends in one of :attr:`suffixes` (it need not exist, so
        that a missing file is reported by :meth:`read` as missing rather than as unrecognised).
        """
        path = Path(path)
        return not path.is_dir() and has_suffix(path.name, self.suffixes)

    @abstractmethod
    def read(self, path: str | Path, **options: Any) -> Any:
        """Read ``path`` into an instance of :attr:`returns`.

        ``options`` are keyword arguments some readers take (``series_uid``, ``slice_mapping``, ``frame``,
        ``backend``, ``mpp``, ``dataset``); a reader ignores the ones it does not know, because
        :func:`~medfoundry.data.readers.read_volume` passes the same ones to every volume reader.
        """

    def depth(self, path: str | Path) -> int:
        """Number of slices of the volume at ``path``; readers of kind ``volume`` override this to read it
        from the header (the training sources call it for every file when they are built). The default
        decodes the volume."""
        return int(self.read(path).depth)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} ({self.kind})>"
