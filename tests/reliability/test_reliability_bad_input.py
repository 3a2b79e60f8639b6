"""Issue 12: a corpus of bad inputs, each refused before work with a message naming the key or the file.

Every case goes through the entry point a user would use: the real CLI (``medfoundry_cli.cli.main``, stderr
captured) or, for the data loader, the function the training dataset calls. A refused command exits with
code 2 and prints one ``medfoundry <command>: error: ...`` line (no traceback); ``medfoundry prepare``
instead lists a bad file among its skipped items (or notes) in ``report.json``. Commands that fail must
not touch what earlier runs wrote. ``medfoundry prepare``'s cases are in
``test_reliability_bad_input_prepare.py``; the helpers both use in ``bad_input_testutil.py``.

Case table (id -> what it checks):

=================================  ===================================================================
config_lr_nan                      ``optim.lr=nan`` is refused by ``config`` and ``train`` (finite numbers)
config_lr_negative                 ``optim.lr`` must be > 0
config_lr_inf                      ``optim.lr=inf`` is not finite
config_recipe_weight_decay_inf     a recipe's ``.inf`` is refused, the message names the recipe file
config_checkpoint_every_0          ``train.checkpoint_every=0`` (was a ZeroDivisionError in the loop)
config_steps_0                     ``train.steps`` must be >= 1
config_batch_size_0                ``train.batch_size`` must be >= 1
config_log_every_0                 ``train.log_every`` must be >= 1
config_keep_last_0                 ``train.keep_last`` must be >= 1
config_probability_1p5             ``crops.hflip_prob=1.5`` is not a probability
config_mask_probability_negative   ``dino.mask_probability=-0.1`` is not a probability
config_teacher_temp_0              temperatures must be > 0
config_center_momentum_1p2         momenta lie in [0, 1]
config_crop_scale_reversed         ``crops.global_scale=[1.0, 0.3]``: low <= high
config_crop_scale_zero             ``crops.local_scale=[0, 0.3]``: low > 0
config_betas_three_values          ``optim.betas`` has exactly two values in [0, 1)
config_mask_ratio_min_above_max    ``dino.mask_ratio_min`` <= ``dino.mask_ratio_max``
config_slices_even                 ``data.slices`` is odd (symmetric 2.5D stack)
config_unknown_backbone            ``model.name`` must be registered (nearest name suggested)
config_unknown_method              ``method`` is one of dino, clip, distill
config_unknown_key                 a misspelt key names the nearest valid key
config_wrong_type                  ``train.steps=abc`` expects an integer
config_unknown_data_kind           ``data.kind`` must be a registered source kind
config_unknown_window              ``data.windows`` entries are presets or centre:width
config_unknown_pretrained_format   ``model.pretrained_format`` is one of the loader's formats
config_bad_device                  ``train.device=gpu`` is not a torch device name
config_missing_recipe_file         a recipe path that does not exist
config_bad_yaml                    a recipe that is not valid YAML names the file
config_recipe_not_a_mapping        a recipe that is a YAML list, not a mapping
path_data_root_missing             ``data.root`` that does not exist (``config`` still prints the recipe)
path_data_root_unset               ``data.root`` left empty for a DINO run
path_data_root_empty_folder        ``data.root`` is an empty folder
path_data_root_no_images           ``data.root`` holds files, none with ``data.extensions``
path_pretrained_missing            ``model.pretrained`` that does not exist
path_pretrained_dir_no_weights     ``model.pretrained`` is a folder without any weights file
path_pretrained_zero_bytes         ``model.pretrained`` is a 0-byte ``.pt``
path_pretrained_text_file          ``model.pretrained`` is a text file
path_pretrained_garbage            ``model.pretrained`` is random bytes
path_pretrained_lfs_pointer        ``model.pretrained`` is a Git LFS pointer (hint: ``git lfs pull``)
path_teacher_missing               ``distill.teacher_checkpoint`` that does not exist
path_gram_anchor_missing           ``dino.gram_anchor`` that does not exist
path_manifest_missing_column       ``data.kind=manifest`` CSV without a ``path`` column
path_prepared_without_manifest     ``data.kind=prepared`` folder without ``manifest.csv``
path_eval_data_missing             ``eval.data`` that does not exist while evaluation is on
load_pretrained_truncated          a truncated real ``.pt`` passes the path check, fails to load: exit 2
load_all_images_truncated          every image truncated: exit 2 listing the file and the reason
load_nifti_nan_training            a NIfTI with NaN voxels in training: exit 2 naming the file and "NaN"
substitutes_distinct_files         the loader's "unreadable samples" error names each file once, with reasons
worker_message_unwrapped           a DataLoader worker's wrapped error prints as the original message
prior_run_kept                     failing ``train`` commands into a finished run folder change none of its files
trust_pickle_flag                  ``--trust-pickle`` (before or after the command) sets the opt-in for the command
=================================  ===================================================================
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from bad_input_testutil import assert_user_error, cli, digests, nifti_volume
from PIL import Image

from medfoundry.data.views import load_with_substitutes
from medfoundry.errors import UnreadableDataError
from medfoundry.safe_load import TRUST_ENV
from medfoundry_cli.cli import main, user_message

FAST = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
        "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
        "train.batch_size=4", "train.steps=1", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in a fresh folder (the CLI's fallback ``medfoundry-error.log`` lands there), no pickle trust."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(TRUST_ENV, raising=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small 8-bit grey PNGs: valid training data for the cases that break something else."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(root / f"img_{i}.png")
    return root


# ---------------------------------------------------------------- config values


CONFIG_CASES = [
    ("config_lr_nan", ["optim.lr=nan"], ["optim.lr", "nan", "finite"]),
    ("config_lr_negative", ["optim.lr=-0.001"], ["optim.lr", "-0.001", "> 0"]),
    ("config_lr_inf", ["optim.lr=inf"], ["optim.lr", "inf"]),
    ("config_checkpoint_every_0", ["train.checkpoint_every=0"], ["train.checkpoint_every", ">= 1"]),
    ("config_steps_0", ["train.steps=0"], ["train.steps", ">= 1"]),
    ("config_batch_size_0", ["train.batch_size=0"], ["train.batch_size", ">= 1"]),
    ("config_log_every_0", ["train.log_every=0"], ["train.log_every"]),
    ("config_keep_last_0", ["train.keep_last=0"], ["train.keep_last"]),
    ("config_probability_1p5", ["crops.hflip_prob=1.5"], ["crops.hflip_prob", "1.5", "[0, 1]"]),
    ("config_mask_probability_negative", ["dino.mask_probability=-0.1"], ["dino.mask_probability"]),
    ("config_teacher_temp_0", ["dino.teacher_temp=0"], ["dino.teacher_temp", "> 0"]),
    ("config_center_momentum_1p2", ["dino.center_momentum=1.2"], ["dino.center_momentum"]),
    ("config_crop_scale_reversed", ["crops.global_scale=[1.0, 0.3]"], ["crops.global_scale", "low <= high"]),
    ("config_crop_scale_zero", ["crops.local_scale=[0, 0.3]"], ["crops.local_scale"]),
    ("config_betas_three_values", ["optim.betas=[0.9, 0.99, 0.999]"], ["optim.betas", "2 values"]),
    ("config_mask_ratio_min_above_max", ["dino.mask_ratio_min=0.6", "dino.mask_ratio_max=0.4"],
     ["dino.mask_ratio_min", "dino.mask_ratio_max"]),
    ("config_slices_even", ["data.slices=2"], ["data.slices", "odd"]),
    ("config_unknown_backbone", ["model.name=vit_tiny_patch9"], ["model.name", "vit_tiny_patch9", "vit_tiny_patch8"]),
    ("config_unknown_method", ["method=byol"], ["method", "byol", "dino"]),
    ("config_unknown_key", ["train.stepz=3"], ["train.stepz", "train.steps"]),
    ("config_wrong_type", ["train.steps=abc"], ["train.steps", "integer"]),
    ("config_unknown_data_kind", ["data.kind=folder"], ["data.kind", "folder", "image_folder"]),
    ("config_unknown_window", ["data.intensity=window", "data.windows=[lung,widest]"],
     ["data.windows[1]", "widest"]),
    ("config_unknown_pretrained_format", ["model.pretrained_format=onnx"], ["model.pretrained_format", "onnx"]),
    ("config_bad_device", ["train.device=gpu"], ["train.device", "gpu"]),
]


@pytest.mark.parametrize("overrides,needles", [pytest.param(o, n, id=i) for i, o, n in CONFIG_CASES])
def test_bad_config_value_is_refused_by_config_and_train(overrides: list[str], needles: list[str], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    rc, err = cli(["config", "tiny_dino_cpu", *overrides], capsys)
    assert_user_error(rc, err, "config", *needles)
    run = tmp_path / "run"
    rc, err = cli(["train", "tiny_dino_cpu", f"output_dir={run}", *FAST, *overrides], capsys)
    assert_user_error(rc, err, "train", *needles)
    assert not run.exists(), "a refused config must not create the run folder"
    assert not (tmp_path / "medfoundry-error.log").exists(), "a config error's message is complete: no log"


RECIPE_CASES = [
    ("config_recipe_weight_decay_inf", "optim:\n  weight_decay: .inf\n", ["optim.weight_decay", "inf"]),
    ("config_bad_yaml", "train:\n  steps: [1, 2\n", ["not valid YAML"]),
    ("config_recipe_not_a_mapping", "- train\n- steps\n", ["must be a mapping"]),
]


@pytest.mark.parametrize("text,needles", [pytest.param(t, n, id=i) for i, t, n in RECIPE_CASES])
def test_bad_recipe_file_names_the_file(text: str, needles: list[str], tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    recipe = tmp_path / "my_recipe.yaml"
    recipe.write_text(text)
    rc, err = cli(["config", str(recipe)], capsys)
    assert_user_error(rc, err, "config", str(recipe), *needles)


def test_missing_recipe_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """config_missing_recipe_file"""
    rc, err = cli(["train", str(tmp_path / "nope.yaml")], capsys)
    assert_user_error(rc, err, "train", "nope.yaml", "medfoundry recipes")


# ---------------------------------------------------------------- paths checked when a run starts


def _torch_file(path: Path) -> Path:
    torch.save({"w": torch.zeros(64)}, path)
    return path


def _make(tmp: Path, case: str) -> list[str]:
    """Build the bad input of a path case under ``tmp``; returns the overrides that hand it to the run."""
    if case == "path_data_root_missing":
        return [f"data.root={tmp / 'data' / 'missing'}"]
    if case == "path_data_root_unset":
        return ["data.root="]
    if case == "path_data_root_empty_folder":
        (tmp / "empty").mkdir()
        return [f"data.root={tmp / 'empty'}"]
    if case == "path_data_root_no_images":
        (tmp / "notes").mkdir()
        (tmp / "notes" / "readme.txt").write_text("no images here\n")
        return [f"data.root={tmp / 'notes'}"]
    if case == "path_pretrained_missing":
        return [f"model.pretrained={tmp / 'weights' / 'dinov2.pth'}"]
    if case == "path_pretrained_dir_no_weights":
        (tmp / "weights").mkdir()
        (tmp / "weights" / "README.md").write_text("weights go here\n")
        return [f"model.pretrained={tmp / 'weights'}"]
    if case == "path_pretrained_zero_bytes":
        (tmp / "w.pt").write_bytes(b"")
        return [f"model.pretrained={tmp / 'w.pt'}"]
    if case == "path_pretrained_text_file":
        (tmp / "w.pt").write_text("download the weights from the model card\n")
        return [f"model.pretrained={tmp / 'w.pt'}"]
    if case == "path_pretrained_garbage":
        noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
        (tmp / "w.pt").write_bytes(b"\x00\x13" + noise)  # starts like no weights format
        return [f"model.pretrained={tmp / 'w.pt'}"]
    if case == "path_pretrained_lfs_pointer":
        (tmp / "w.pt").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 343000000\n")
        return [f"model.pretrained={tmp / 'w.pt'}"]
    if case == "path_teacher_missing":
        return ["method=distill", "distill.teacher_name=vit_tiny_patch8",
                f"distill.teacher_checkpoint={tmp / 'teacher_run'}"]
    if case == "path_gram_anchor_missing":
        return ["dino.gram_weight=1.0", "dino.gram_mode=anchor", f"dino.gram_anchor={tmp / 'anchor.pt'}"]
    if case == "path_manifest_missing_column":
        (tmp / "m.csv").write_text("file,label\na.png,0\n")
        return ["data.kind=manifest", f"data.root={tmp / 'm.csv'}"]
    if case == "path_prepared_without_manifest":
        (tmp / "prep" / "items").mkdir(parents=True)
        (tmp / "prep" / "items" / "x.npy").write_bytes(b"\x93NUMPY")
        return ["data.kind=prepared", f"data.root={tmp / 'prep'}"]
    if case == "path_eval_data_missing":
        return ["eval.every_steps=1", f"eval.data={tmp / 'labelled.csv'}"]
    raise AssertionError(case)


PATH_CASES = [
    ("path_data_root_missing", ["data.root", "does not exist", "nearest existing folder"]),
    ("path_data_root_unset", ["data.root", "not set"]),
    ("path_data_root_empty_folder", ["data.root", "empty folder"]),
    ("path_data_root_no_images", ["data.root", "no files with suffixes", "data.extensions"]),
    ("path_pretrained_missing", ["model.pretrained", "dinov2.pth", "does not exist"]),
    ("path_pretrained_dir_no_weights", ["model.pretrained", "no weights"]),
    ("path_pretrained_zero_bytes", ["model.pretrained", "w.pt", "0 bytes"]),
    ("path_pretrained_text_file", ["model.pretrained", "w.pt", "not a weights file", "text file"]),
    ("path_pretrained_garbage", ["model.pretrained", "w.pt", "not a weights file"]),
    ("path_pretrained_lfs_pointer", ["model.pretrained", "git lfs pull"]),
    ("path_teacher_missing", ["distill.teacher_checkpoint", "teacher_run", "does not exist"]),
    ("path_gram_anchor_missing", ["dino.gram_anchor", "anchor.pt", "does not exist"]),
    ("path_manifest_missing_column", ["data.root", "m.csv", "'path'"]),
    ("path_prepared_without_manifest", ["data.root", "manifest.csv", "medfoundry prepare"]),
    ("path_eval_data_missing", ["eval.data", "labelled.csv"]),
]


@pytest.mark.parametrize("case,needles", [pytest.param(c, n, id=c) for c, n in PATH_CASES])
def test_bad_path_is_refused_before_the_run_starts(case: str, needles: list[str], tmp_path: Path, images: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    overrides = [f"data.root={images}", *FAST, *_make(tmp_path, case)]  # the case's data.root, if any, wins
    rc, out_err = cli(["config", "tiny_dino_cpu", *overrides], capsys)
    assert rc == 0, f"`medfoundry config` must print a recipe whose files are not there yet: {out_err}"
    run = tmp_path / "run"
    rc, err = cli(["train", "tiny_dino_cpu", f"output_dir={run}", *overrides], capsys)
    assert_user_error(rc, err, "train", *needles)
    assert not run.exists(), "the run folder must not be created for a missing input"


# ---------------------------------------------------------------- files that fail when they are read


def test_truncated_pretrained_passes_the_path_check_and_fails_to_load(tmp_path: Path, images: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """load_pretrained_truncated"""
    whole = _torch_file(tmp_path / "whole.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(whole[: len(whole) // 2])
    run = tmp_path / "run"
    rc, err = cli(["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={images}", *FAST,
                   f"model.pretrained={tmp_path / 'cut.pt'}"], capsys)
    assert_user_error(rc, err, "train", "cut.pt", "truncated", f"[traceback: {run / 'error.log'}]")
    assert "Traceback" in (run / "error.log").read_text()


def test_all_images_truncated_names_the_files_and_reasons(tmp_path: Path, images: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    """load_all_images_truncated"""
    bad = tmp_path / "bad_images"
    bad.mkdir()
    for i, src in enumerate(sorted(images.glob("*.png"))[:2]):
        (bad / f"cut_{i}.png").write_bytes(src.read_bytes()[:80])
    rc, err = cli(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={bad}", *FAST], capsys)
    assert_user_error(rc, err, "train", "all 2 samples", "cut_0.png", "cut_1.png", "truncated")


def test_nifti_with_nan_in_training_names_the_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """load_nifti_nan_training"""
    (tmp_path / "vols").mkdir()
    nifti_volume(tmp_path / "vols" / "nan.nii.gz", nan=True)
    rc, err = cli(["train", "tiny_dino_cpu", f"output_dir={tmp_path / 'run'}", f"data.root={tmp_path / 'vols'}",
                   "data.kind=nifti", "data.intensity=range", "data.value_range=[0, 100]", *FAST], capsys)
    assert_user_error(rc, err, "train", "nan.nii.gz", "NaN", "4 samples")


# ---------------------------------------------------------------- the loader's message, the CLI's unwrapping


def test_substitutes_error_names_each_file_once_with_reasons() -> None:
    """substitutes_distinct_files: slices of one corrupt volume are one file; n=2 stops after two tries."""
    names = ["a.nii.gz [slice 0]", "a.nii.gz [slice 1]", "a.nii.gz [slice 2]", "b.png"]

    def load(i: int) -> None:
        raise OSError(f"broken #{i}") if i < 3 else ValueError("bad header")

    with pytest.raises(UnreadableDataError) as info:
        load_with_substitutes(load, names.__getitem__, 0, len(names))
    msg = str(info.value)
    assert msg.count("a.nii.gz") == 1 and "(3 samples)" in msg and "OSError: broken #0" in msg, msg
    assert "b.png: ValueError: bad header" in msg and "2 distinct files" in msg, msg
    tries: list[int] = []

    def failing(i: int) -> None:
        tries.append(i)
        raise OSError("unreadable")

    with pytest.raises(UnreadableDataError, match="all 2 samples"):
        load_with_substitutes(failing, lambda i: f"f{i}.png", 1, 2, max_substitutes=16)
    assert tries == [1, 0], "a small source is tried once per item, not max_substitutes times"


def test_worker_wrapped_message_is_unwrapped() -> None:
    """worker_message_unwrapped"""
    wrapped = UnreadableDataError("Caught UnreadableDataError in DataLoader worker process 0.\nOriginal Traceback "
                                  "(most recent call last):\n  File \"x.py\", line 1\n"
                                  "medfoundry.errors.UnreadableDataError: all 3 samples are unreadable")
    assert user_message(wrapped) == "all 3 samples are unreadable"


# ---------------------------------------------------------------- what was written before stays


def test_failing_commands_leave_a_finished_run_unchanged(tmp_path: Path, images: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """prior_run_kept"""
    run = tmp_path / "run"
    base = ["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={images}", *FAST]
    assert main(base) == 0
    before = digests(run)
    assert any(k.startswith("checkpoints/") for k in before) and "config.yaml" in before
    for extra in (["optim.lr=nan"], ["train.checkpoint_every=0"], [f"model.pretrained={tmp_path / 'gone.pt'}"],
                  [f"data.root={tmp_path / 'gone'}"]):
        rc, err = cli([*base, *extra], capsys)
        assert_user_error(rc, err, "train")
        assert digests(run) == before, f"{extra} changed the finished run"


# ---------------------------------------------------------------- --trust-pickle


@pytest.mark.parametrize("argv", [["--trust-pickle", "models"], ["models", "--trust-pickle"]], ids=["before", "after"])
def test_trust_pickle_flag_sets_the_opt_in_for_the_command(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """trust_pickle_flag"""
    seen: list[str | None] = []
    commands = importlib.import_module("medfoundry_cli.commands.models")
    monkeypatch.setattr(commands, "run", lambda args: seen.append(os.environ.get(TRUST_ENV)) or 0)
    assert main(argv) == 0
    assert seen == ["1"]
    assert TRUST_ENV not in os.environ, "the opt-in ends with the command"


def test_docstring_table_lists_every_case() -> None:
    """The module docstring's table and the cases above stay in step."""
    lines = (__doc__ or "").splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("====")]
    table = {line.split()[0] for line in lines[rules[0] + 1:rules[-1]] if line.strip()}
    ids = {i for i, *_ in CONFIG_CASES} | {i for i, *_ in RECIPE_CASES} | {c for c, *_ in PATH_CASES}
    named_tests = {"config_missing_recipe_file", "load_pretrained_truncated", "load_all_images_truncated",
                   "load_nifti_nan_training", "substitutes_distinct_files", "worker_message_unwrapped",
                   "prior_run_kept", "trust_pickle_flag"}
    assert table == ids | named_tests
    assert len(table) >= 30
