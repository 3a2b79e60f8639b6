"""Small ``.npz`` files in MedMNIST's published layout (importable from any test module).

The layout (MedMNIST v3.0.2 ``README.md`` "Data Files"; see :mod:`medfoundry.data.readers.medmnist`): six
arrays ``{train,val,test}_{images,labels}``, uint8 images ``(N, H, W)`` grey, ``(N, H, W, 3)`` RGB or
``(N, D, H, W)`` volumes, labels ``(N, L)``; written compressed like the Zenodo files. Labels depend on the
image content, so a probe on any reasonable features beats chance.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SPLIT_SIZES = {"train": 160, "val": 64, "test": 96}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def _textures(n_labels: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One grating per label, each with its own orientation and frequency, over the whole image."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for j in range(n_labels):
        angle = np.pi * j / n_labels
        freq = 2.0 + 1.5 * (j % 4)
        phase = rng.uniform(0, 2 * np.pi)
        out.append(np.cos(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase))
    return np.stack(out)


def write_chest_like(path: Path, n_labels: int = 14, size: int = 28, sizes: dict[str, int] | None = None,
                     prevalence: float = 0.12, seed: int = 0, constant_test_label: int | None = None) -> Path:
    """A ChestMNIST-like file: grey ``(N, size, size)`` uint8 images, ``(N, n_labels)`` 0/1 labels (uint8).

    Label ``j`` is 1 with probability ``prevalence``; an image is a dim background plus the grating of every
    label it has (plus noise). ``constant_test_label``: that label is 0 on every test image (a single-class
    label split)."""
    rng = np.random.default_rng(seed)
    tex = _textures(n_labels, size, rng)
    arrays = {}
    for split, n in (sizes or SPLIT_SIZES).items():
        labels = (rng.random((n, n_labels)) < prevalence).astype(np.uint8)
        if constant_test_label is not None and split == "test":
            labels[:, constant_test_label] = 0
        img = 0.35 + 0.25 * np.einsum("nl,lhw->nhw", labels.astype(np.float64), tex) / 2
        img += 0.04 * rng.standard_normal(img.shape)
        arrays[f"{split}_images"] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = labels
    return _save(path, arrays)


def write_rgb_multiclass(path: Path, n_classes: int = 3, size: int = 28, sizes: dict[str, int] | None = None,
                         seed: int = 1) -> Path:
    """A DermaMNIST-like file: RGB ``(N, size, size, 3)`` uint8 images, ``(N, 1)`` class labels; class ``c`` tints
    the image towards colour channel ``c % 3`` and draws a disc whose radius grows with ``c``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    arrays = {}
    for split, n in (sizes or SPLIT_SIZES).items():
        labels = (np.arange(n) % n_classes).astype(np.uint8)
        rng.shuffle(labels)
        imgs = np.empty((n, size, size, 3))
        for i, c in enumerate(labels):
            img = 0.3 + 0.05 * rng.standard_normal((size, size, 3))
            img[..., c % 3] += 0.3
            r = 3 + 3 * c
            img += 0.3 * ((((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < r**2)[..., None])
            imgs[i] = img
        arrays[f"{split}_images"] = (np.clip(imgs, 0, 1) * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    return _save(path, arrays)


def write_volumes(path: Path, size: int = 28, sizes: dict[str, int] | None = None, seed: int = 2) -> Path:
    """A NoduleMNIST3D-like file: ``(N, size, size, size)`` uint8 volumes, ``(N, 1)`` binary labels; class 1 has a
    bright ball at the centre (seen by the central slice of every axis), class 0 only noise and a gradient."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.mgrid[0:size, 0:size, 0:size]
    ball = ((zz - size / 2) ** 2 + (yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 4) ** 2
    arrays = {}
    for split, n in (sizes or {"train": 40, "val": 16, "test": 24}).items():
        labels = (np.arange(n) % 2).astype(np.uint8)
        rng.shuffle(labels)
        vols = 0.2 + 0.2 * xx[None] / size + 0.05 * rng.standard_normal((n, size, size, size))
        vols += 0.5 * labels[:, None, None, None] * ball[None]
        arrays[f"{split}_images"] = (np.clip(vols, 0, 1) * 255).round().astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    return _save(path, arrays)


def write_with(path: Path, base: Path, drop: str | None = None, **replace: np.ndarray) -> Path:
    """A copy of the MedMNIST file ``base`` without key ``drop`` and with arrays replaced (malformed files)."""
    with np.load(base) as data:
        arrays = {k: data[k] for k in data.files if k != drop}
    arrays.update(replace)
    return _save(path, arrays)
