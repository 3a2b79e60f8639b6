"""Input paths of a run, checked once before it starts: :func:`check_paths`.

Kept apart from :func:`~medfoundry.config.loader.load_config` on purpose: ``medfoundry config`` prints a
recipe whose data are not downloaded yet, and the quality benchmark writes ``.cache/quality/...``
between loading its config and training. The check is cheap (``stat`` calls, a folder listing stopped at
its first match, a manifest's header), reads no image or weights, and names the config key, the path and
the fix in a :class:`~medfoundry.config.loader.ConfigError`. Decoding problems (a truncated weights file,
a corrupt image) are found by the readers when the run uses the file. One exception: for
``data.kind=image_folder`` and for ``eval.data`` the first picture found is read, so that a 16-bit picture
without a value mapping (:class:`~medfoundry.data.readers.slices.UnmappedImageError`) stops the run before
it starts rather than at its first sample or evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from medfoundry.config.loader import ConfigError
from medfoundry.data.pairs import pair_columns_problem

if TYPE_CHECKING:
    from medfoundry.config.clip import ClipDataConfig
    from medfoundry.config.data import DataConfig
    from medfoundry.config.schema import RunConfig

Need = tuple[str, str, Callable[[str, Path], None]]  # (config key, path as given, check of that path)


def check_paths(cfg: RunConfig) -> None:
    """Raise :class:`ConfigError` for the first input file or folder of this run that is missing or unusable.

    The paths are ``model.pretrained`` and what the method's entry lists (``MethodEntry.needed_paths``).
    Call it at the start of training (``medfoundry train`` does), before the run folder is written.
    """
    for key, value, check in needed_paths(cfg):
        path = Path(value).expanduser()
        if not path.exists():
            raise ConfigError(f"'{key}' = {value!r} does not exist{_near_hint(path)}")
        check(key, path)


def needed_paths(cfg: RunConfig) -> Iterator[Need]:
    """Every ``(key, path, check)`` the configured run will read (paths only where set and used)."""
    from medfoundry.methods.registry import get_method_entry

    if cfg.model.pretrained:
        yield "model.pretrained", cfg.model.pretrained, weights
    yield from get_method_entry(cfg.method).needed_paths(cfg)


def pair_paths(prefix: str, d: ClipDataConfig) -> Iterator[Need]:
    """The files of an image-report pair source (the demo source writes its own)."""
    if d.kind == "demo":
        return
    if d.manifest:
        yield f"{prefix}.manifest", d.manifest, pair_table(prefix, d)
    if d.kind == "chexzero" and d.hdf5:
        yield f"{prefix}.hdf5", d.hdf5, regular_file
    if d.image_root:
        yield f"{prefix}.image_root", d.image_root, folder


# ---------------------------------------------------------------- checks of one existing path


def _error(key: str, path: Path, problem: str) -> Exception:
    return ConfigError(f"'{key}' = '{path}' {problem}")


def any_path(key: str, path: Path) -> None:
    """Exists (checked by the caller): a file or a folder both work."""


def regular_file(key: str, path: Path) -> None:
    """A non-empty regular file."""
    if path.is_dir():
        raise _error(key, path, "is a folder; give the file")
    if path.stat().st_size == 0:
        raise _error(key, path, "is empty (0 bytes): the write or download that produced it did not finish")


def folder(key: str, path: Path) -> None:
    """A folder with at least one file in it (at any depth)."""
    if not path.is_dir():
        raise _error(key, path, "is a file; give the folder")
    if _first(path.rglob("*"), Path.is_file) is None:
        raise _error(key, path, "is an empty folder")


def weights(key: str, path: Path) -> None:
    """A weights file, or a folder that resolves to one (run folder, export folder, HF folder)."""
    if path.is_dir():
        from medfoundry.models.pretrained import PretrainedLoadError, resolve_source

        try:
            resolved = resolve_source(path)
        except PretrainedLoadError as err:
            raise _error(key, path, f"holds no weights: {err}") from None
        if resolved.is_dir():
            return  # an HF folder or a sharded checkpoint: its files are checked when it is read
        path = resolved
    weights_file(key, path)


def weights_file(key: str, path: Path) -> None:
    """A non-empty file that starts like a PyTorch (zip, pickle or old tar) or safetensors file.

    Reads 512 bytes: enough to tell a weights file from a text note, a saved HTML error page or a Git LFS
    pointer. A file that starts right but is truncated or corrupt inside is reported when it is loaded.
    """
    regular_file(key, path)
    with open(path, "rb") as fh:
        head = fh.read(512)
    zip_or_pickle = head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or head[:1] == b"\x80"
    safetensors = len(head) > 8 and head[8:9] == b"{"
    old_tar = head[257:262] == b"ustar"
    if not (zip_or_pickle or safetensors or old_tar):
        raise _error(key, path, f"is not a weights file: it starts with {head[:24]!r}{_looks_like(head)}, not "
                     "a PyTorch (.pt/.pth) or safetensors header")


def _looks_like(head: bytes) -> str:
    """What a non-weights file seems to be, for the error message."""
    if head.startswith(b"version https://git-lfs"):
        return " (a Git LFS pointer: fetch the real file with `git lfs pull`)"
    if head.lstrip()[:1] == b"<":
        return " (an HTML/XML page, e.g. a saved download error)"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ""
    return " (a text file)"


def data_root(kind: str, extensions: list[str], data: DataConfig | None = None) -> Callable[[str, Path], None]:
    """The check of ``data.root`` for source ``kind`` (what each source reads, see data/medical_sources.py).

    With ``data`` (the run's data section), an image folder's first picture is also read with its value-mapping
    rules (``data.slice_slope``/``slice_intercept``, ``data.unmapped_16bit``).
    """
    def check(key: str, path: Path) -> None:
        if kind == "image_folder":
            first = _image_folder(key, path, extensions)
            if data is not None:
                _picture_rules(first, data)
        elif kind in ("hdf5", "manifest"):
            regular_file(key, path)
            if kind == "manifest":
                _manifest_columns(key, path, ["path"])
        elif kind == "prepared":
            if not (path / "manifest.csv").is_file():
                raise _error(key, path, f"has no manifest.csv; run `medfoundry prepare SRC --out {path}` first")
        elif path.is_dir():
            folder(key, path)
        else:
            regular_file(key, path)

    return check


def _image_folder(key: str, path: Path, extensions: list[str]) -> Path:
    """The first image file of the folder (an error when there is none)."""
    if not path.is_dir():
        raise _error(key, path, "is a file; data.kind=image_folder reads a folder of images")
    exts = {e.lower() if e.startswith(".") else "." + e.lower() for e in extensions}
    first = _first(path.rglob("*"), lambda p: p.suffix.lower() in exts and p.is_file())
    if first is None:
        empty = _first(path.rglob("*"), Path.is_file) is None
        raise _error(key, path, "is an empty folder" if empty else
                     f"holds no files with suffixes {sorted(exts)} (set data.extensions, or data.kind for DICOM/NIfTI)")
    return first


def eval_pictures(data: DataConfig, label_column: str) -> Callable[[str, Path], None]:
    """The check of ``eval.data``: its first picture is read with the run's value-mapping rules, so that a labelled
    set of unmapped 16-bit PNGs stops the run at its start, not at the first in-training evaluation.

    Anything else wrong with the set (a missing column, no images) is reported when it is evaluated.
    """
    def check(key: str, path: Path) -> None:
        from medfoundry.eval.labelled_set import IMAGE_SUFFIXES, load_labelled_set

        try:
            items = load_labelled_set(str(path), label_column).items
        except Exception:  # noqa: BLE001 - the evaluation names the set's own problems
            return
        first = next((Path(it.path) for it in items if Path(it.path).suffix.lower() in IMAGE_SUFFIXES), None)
        if first is not None and first.is_file():
            _picture_rules(first, data)

    return check


def _picture_rules(first: Path, data: DataConfig) -> None:
    """Read one picture with the run's value-mapping rules: an unmapped 16-bit picture is refused now, not mid-run."""
    from medfoundry.data.image_folder import check_first_picture, configured_mapping

    try:
        mapping = configured_mapping(data)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    check_first_picture(first, mapping, data.unmapped_16bit)


def pair_table(prefix: str, d: ClipDataConfig) -> Callable[[str, Path], None]:
    """The check of a pair table: a non-empty CSV/Parquet whose header has the columns the pair reader needs
    (:func:`medfoundry.data.pairs.pair_columns_problem`), before anything is built."""

    def check(key: str, path: Path) -> None:
        regular_file(key, path)
        problem = pair_columns_problem(_table_header(key, path), d, prefix)
        if problem:
            raise _error(key, path, problem)

    return check


def _table_header(key: str, path: Path) -> list[str]:
    """The column names of a CSV/TSV/Parquet table (its header only)."""
    import pandas as pd

    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            have = list(pq.read_schema(path).names)
        else:
            have = list(pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", nrows=0).columns)
    except Exception as err:  # noqa: BLE001 - any parser failure means the file is not a usable table
        raise _error(key, path, f"is not a readable CSV/Parquet table ({type(err).__name__}: {err})") from None
    return [str(c) for c in have]


def _manifest_columns(key: str, path: Path, columns: list[str]) -> None:
    """The manifest's header names every column in ``columns`` (reads the header only)."""
    have = _table_header(key, path)
    missing = [c for c in columns if c not in have]
    if missing:
        raise _error(key, path, f"has no column {missing} (columns: {have}); a manifest names one image per row "
                     "in a 'path' column")


def _first(items: Iterator[Path], test: Callable[[Path], bool]) -> Path | None:
    """The first item passing ``test``, or None (stops the folder walk early)."""
    return next((p for p in items if test(p)), None)


def _near_hint(path: Path) -> str:
    """A hint naming the deepest existing parent, so a typo in one part of a long path is easy to spot."""
    parent = path.parent
    while parent != parent.parent and not parent.exists():
        parent = parent.parent
    return f" (the nearest existing folder is '{parent}')" if parent != path.parent else ""
