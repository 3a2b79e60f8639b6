"""MedMNIST ``.npz`` files in the published layout: the reader, the training source and the labelled set.

Files are written here with numpy exactly as the Zenodo files are laid out (``tests/medmnist_files.py``); the
published data cannot be downloaded in tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from medmnist_files import write_chest_like, write_rgb_multiclass, write_volumes, write_with

from medfoundry.config.data import DataConfig
from medfoundry.data.readers import ReaderError, detect_format
from medfoundry.data.readers.medmnist import MedMNISTFile, open_medmnist
from medfoundry.data.sources import build_source
from medfoundry.eval.eval_images import read_eval_image
from medfoundry.eval.labelled_set import load_labelled_set
from medfoundry.eval.split_warnings import check_label_splits, labelled_set_warnings

SIZES = {"train": 12, "val": 5, "test": 7}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("medmnist")
    return {"chest": write_chest_like(d / "chestmnist.npz", sizes=SIZES, prevalence=0.3),
            "rgb": write_rgb_multiclass(d / "dermamnist.npz", sizes=SIZES),
            "vol": write_volumes(d / "nodulemnist3d.npz", sizes={"train": 4, "val": 2, "test": 2}),
            "dir": d}


def test_layout_of_each_kind(files) -> None:
    chest, rgb, vol = (open_medmnist(files[k]) for k in ("chest", "rgb", "vol"))
    assert detect_format(files["chest"]) == "medmnist"
    assert (chest.image_shape, chest.channels, chest.volumetric, chest.n_labels) == ((28, 28), 1, False, 14)
    assert chest.multi_label and len(chest) == sum(SIZES.values())
    assert (rgb.image_shape, rgb.channels, rgb.volumetric, rgb.n_labels) == ((28, 28, 3), 3, False, 1)
    assert (vol.image_shape, vol.channels, vol.volumetric, vol.depth()) == ((28, 28, 28), 1, True, 28)
    assert "14 labels" in chest.describe() and "RGB" in rgb.describe() and "volumes" in vol.describe()
    with np.load(files["chest"]) as raw:
        np.testing.assert_array_equal(chest.labels("val"), raw["val_labels"].astype(np.int64))
        np.testing.assert_array_equal(chest.image("test", 3), raw["test_images"][3].astype(np.float32) / 255.0)
    assert open_medmnist(files["vol"]) is vol  # one decode per file: the last files opened are shared


def test_central_slices_of_a_volume(files) -> None:
    vol = open_medmnist(files["vol"])
    with np.load(files["vol"]) as raw:
        v = raw["val_images"][1].astype(np.float32) / 255.0
    np.testing.assert_array_equal(vol.central_slice("val", 1, 0), v[None, 14])
    np.testing.assert_array_equal(vol.central_slice("val", 1, 1), v[None, :, 14])
    np.testing.assert_array_equal(vol.central_slice("val", 1, 2), v[None, :, :, 14])
    np.testing.assert_array_equal(vol.central_slice("val", 1, 2, slices=3, stride=2),
                                  np.moveaxis(v[:, :, [12, 14, 16]], 2, 0))


def test_training_source_gives_images_in_unit_range(files) -> None:
    src = build_source(DataConfig(kind="medmnist", root=str(files["rgb"]), split="train", channels=3))
    assert len(src) == SIZES["train"]
    with np.load(files["rgb"]) as raw:
        sample = src[4]
        expected = np.moveaxis(raw["train_images"][4], -1, 0) / np.float32(255)
        np.testing.assert_array_equal(sample.image.numpy(), expected)
        assert sample.meta == {"split": "train", "position": 4, "series_id": "train/4",
                               "label": str(int(raw["train_labels"][4, 0]))}
    everything = build_source(DataConfig(kind="medmnist", root=str(files["chest"]), split="", channels=1))
    assert len(everything) == sum(SIZES.values()) and everything[len(everything) - 1].meta["split"] == "test"
    assert set(everything[0].meta["label"].split(",")) <= {"0", "1"} and len(everything[0].meta["label"]) == 27
    volumes = build_source(DataConfig(kind="medmnist", root=str(files["vol"]), split="val", slices=3, channels=3))
    assert len(volumes) == 2 * 28  # every slice of every volume along its first axis
    with np.load(files["vol"]) as raw:
        v = raw["val_images"][1].astype(np.float32) / 255.0
    item = volumes[28 + 0]  # volume 1, slice 0: neighbours replicated at the edge
    np.testing.assert_array_equal(item.image.numpy(), v[[0, 0, 1]])
    assert "nodulemnist3d.npz[val_images][1][z=0]" in item.path
    with pytest.raises(ValueError, match="data.split 'valid'"):
        build_source(DataConfig(kind="medmnist", root=str(files["vol"]), split="valid"))


def test_labelled_set_keeps_the_files_splits(files) -> None:
    lset = load_labelled_set(files["chest"], split_fractions=(1.0, 0.0, 0.0))  # fractions must not re-split it
    assert [int((lset.splits == s).sum()) for s in ("train", "val", "test")] == [12, 5, 7]
    with np.load(files["chest"]) as raw:
        np.testing.assert_array_equal(lset.targets[lset.splits == "val"], raw["val_labels"])
        any_label = raw["train_labels"].any(axis=1)
    assert lset.target_names == [str(j) for j in range(14)]
    assert [it.label for it in lset.items if it.split == "train"] == ["any" if a else "none" for a in any_label]
    image = read_eval_image(lset.items[-1])
    assert image.shape == (1, 28, 28) and 0 <= float(image.min()) <= float(image.max()) <= 1
    assert read_eval_image(lset.items[-1], slices=3).shape == (3, 28, 28)

    rgb = load_labelled_set(files["rgb"])
    assert rgb.targets is None and rgb.classes == ["0", "1", "2"] and read_eval_image(rgb.items[0]).shape == (3, 28, 28)

    vol = load_labelled_set(files["vol"])
    assert vol.aggregate == "series" and len(vol) == 3 * 8  # three central slices per volume
    first = vol.items[:3]
    assert [it.axis for it in first] == [0, 1, 2] and len({it.series for it in first}) == 1
    assert "counts are volumes" in vol.summary() and "train: 0=2, 1=2" in vol.summary()
    assert read_eval_image(first[1]).shape == (1, 28, 28)
    assert vol.signature() != load_labelled_set(files["rgb"]).signature()


def test_single_valued_label_is_a_split_warning(files, tmp_path: Path) -> None:
    with np.load(files["chest"]) as raw:
        labels = raw["test_labels"].copy()
    labels[:, 5] = 0
    path = write_with(tmp_path / "one_valued.npz", files["chest"], test_labels=labels)
    def test_warnings(p: Path) -> list:
        return [w for w in labelled_set_warnings(load_labelled_set(p)) if w.rule == "single_class_label"
                and w.split == "test"]

    assert not any("'5'" in w.message for w in test_warnings(files["chest"]))
    warnings = test_warnings(path)
    assert len(warnings) == 1 and "'5' (always 0)" in warnings[0].message and "nan" in warnings[0].message
    assert check_label_splits(np.array([[0, 1], [1, 1]]), ["train", "train"], ["a", "b"])[0].message.count("'b'") == 1


@pytest.mark.parametrize("case", ["missing_key", "lengths", "label_count", "image_size", "dims", "not_binary",
                                  "float_images", "pickled", "corrupt"])
def test_malformed_file_is_one_error_naming_file_and_key(case: str, files, tmp_path: Path) -> None:
    base = files["chest"]
    with np.load(base) as raw:
        train_images, train_labels = raw["train_images"], raw["train_labels"]
    path = tmp_path / f"{case}.npz"
    key = {"missing_key": "val_labels", "lengths": "train_labels", "label_count": "test_labels",
           "image_size": "val_images", "dims": "train_images", "not_binary": "train_labels",
           "float_images": "train_images", "pickled": "test_images", "corrupt": ""}[case]
    if case == "missing_key":
        write_with(path, base, drop="val_labels")
    elif case == "lengths":
        write_with(path, base, train_labels=train_labels[:-1])
    elif case == "label_count":
        write_with(path, base, test_labels=np.zeros((SIZES["test"], 13), np.uint8))
    elif case == "image_size":
        write_with(path, base, val_images=np.zeros((SIZES["val"], 32, 32), np.uint8))
    elif case == "dims":
        write_with(path, base, train_images=train_images.reshape(SIZES["train"], -1))
    elif case == "not_binary":
        write_with(path, base, train_labels=train_labels * 2)
    elif case == "float_images":
        write_with(path, base, train_images=train_images / 255.0)
    elif case == "pickled":
        write_with(path, base, test_images=np.array([object()] * SIZES["test"], dtype=object))
    else:
        path.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(ReaderError) as info:
        lset = load_labelled_set(path)
        read_eval_image(lset.items[-1])
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    if key:  # the corrupt file has no key to name
        assert f"'{key}'" in message and ("zenodo" in message.lower() or "every split" in message)


def test_reader_contract_type(files) -> None:
    assert isinstance(open_medmnist(files["vol"]), MedMNISTFile)
    with pytest.raises(ReaderError, match="no such file"):
        open_medmnist(files["dir"] / "absent.npz")
