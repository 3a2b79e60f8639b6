"""The one ordered list of readers, and the functions that pick one for a path.

:data:`READERS` is tried in order; the first reader whose ``can_read`` is true takes the path. The built-in
readers claim disjoint files (a TIFF is a slide only when tiled and pyramidal, and a slice otherwise; DICOM
comes last because it recognises files without a DICOM suffix by their ``DICM`` marker), so their order
only matters for readers added with :func:`register_reader`, which go first: a new reader may take over a
suffix a built-in one claims.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from medfoundry.data.readers.dicom import DICOM_READER
from medfoundry.data.readers.hdf5 import HDF5_READER
from medfoundry.data.readers.interface import READER_KINDS, Reader
from medfoundry.data.readers.medmnist import MEDMNIST_READER
from medfoundry.data.readers.nifti import NIFTI_READER, NRRD_READER
from medfoundry.data.readers.slices import SLICE_READER
from medfoundry.data.readers.wsi import SLIDE_READER

READERS: list[Reader] = [NIFTI_READER, NRRD_READER, HDF5_READER, MEDMNIST_READER, SLIDE_READER, SLICE_READER,
                         DICOM_READER]


def register_reader(reader: Reader, *, first: bool = True) -> Reader:
    """Add ``reader`` to :data:`READERS` (tried before the others, or after them with ``first=False``).

    Returns the reader, so a format module can write ``MY_READER = register_reader(MyReader())``.
    Raises ``ValueError`` for a name that is empty or already registered, or an unknown kind.
    """
    if not isinstance(reader, Reader):
        raise TypeError(f"register_reader takes a medfoundry.data.readers.Reader, not {type(reader).__name__}")
    if not reader.name:
        raise ValueError(f"{reader!r} has no name")
    if reader.kind not in READER_KINDS:
        raise ValueError(f"reader {reader.name!r} has kind {reader.kind!r}; known kinds: {list(READER_KINDS)}")
    for other in READERS:
        if other.name == reader.name:
            raise ValueError(
                f"a reader named {reader.name!r} is already registered ({other!r}); "
                f"unregister_reader({reader.name!r}) first to replace it"
            )
    READERS.insert(0 if first else len(READERS), reader)
    return reader


def unregister_reader(name: str) -> Reader:
    """Remove the reader called ``name`` from :data:`READERS` and return it."""
    reader = get_reader(name)
    READERS.remove(reader)
    return reader


def get_reader(name: str) -> Reader:
    """The registered reader called ``name``; ``KeyError`` lists the registered names."""
    for reader in READERS:
        if reader.name == name:
            return reader
    raise KeyError(f"no reader named {name!r}; registered: {[r.name for r in READERS]}")


def reader_for(path: str | Path, kinds: Collection[str] | None = None) -> Reader | None:
    """The first reader (of one of ``kinds``, if given) that can read ``path``, or None."""
    path = Path(path)
    for reader in READERS:
        if (kinds is None or reader.kind in kinds) and reader.can_read(path):
            return reader
    return None


def reader_labels(kinds: Collection[str] | None = None, returns: type | None = None) -> str:
    """The labels of the registered readers (of ``kinds``, returning ``returns``) for messages, sorted."""
    labels = {
        r.label or r.name
        for r in READERS
        if (kinds is None or r.kind in kinds) and (returns is None or issubclass(r.returns, returns))
    }
    return ", ".join(sorted(labels, key=str.casefold))
