"""Config-time value checks (``config/checks.py``) and the run-start path check (``methods/input_paths.py``)."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import typing
from pathlib import Path

import pytest
import torch

from medfoundry.config import ConfigError, load_config
from medfoundry.config.checks import RULES, UNBOUNDED, leaves
from medfoundry.config.loader import resolved_hints
from medfoundry.config.names import registered_methods, run_config_class
from medfoundry.config.schema import RunConfig
from medfoundry.methods.input_paths import check_paths


def _run_config_classes() -> list[type]:
    """Every registered method's run config class (the common sections are in each)."""
    return [run_config_class(m) for m in registered_methods()]


def _numeric_keys(cls: type | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of every int/float field (plain, Optional or list) of every method's run config."""
    if cls is None:
        return sorted({k for c in _run_config_classes() for k in _numeric_keys(c)})
    keys = []
    for f in dataclasses.fields(cls):
        t = resolved_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            keys += _numeric_keys(t, f"{prefix}{f.name}.")
            continue
        args = set(typing.get_args(t)) | {t}
        if args & {int, float, list[int], list[float]}:
            keys.append(prefix + f.name)
    return keys


def test_every_numeric_field_has_a_rule_or_a_reason() -> None:
    patterns = list(RULES) + list(UNBOUNDED)
    uncovered = [k for k in _numeric_keys() if not any(fnmatch.fnmatchcase(k, p) for p in patterns)]
    assert not uncovered, f"give these fields a rule in config/checks.py RULES (or a reason in UNBOUNDED): {uncovered}"


def test_every_rule_pattern_matches_a_field() -> None:
    keys = [k for c in _run_config_classes() for k, _ in leaves(c())]
    stale = [p for p in list(RULES) + list(UNBOUNDED) if not any(fnmatch.fnmatchcase(k, p) for k in keys)]
    assert not stale, f"patterns that match no field (renamed?): {stale}"


@pytest.mark.parametrize("override", [
    "optim.clip_grad=0", "optim.min_lr=0", "train.schedule_steps=0", "eval.every_steps=0", "crops.n_local=0",
    "dino.head.hidden_dim=0", "adapt.unfreeze_last_n_blocks=-1", "dino.center_momentum=1.0", "crops.hflip_prob=0",
    "optim.layer_decay=1.0", "train.seed=-3", "clip.loss.siglip_init_bias=-10", "data.slices=3",
    "crops.global_scale=[1.0, 1.0]", "train.device=cuda:1", "data.value_range=[-1000, 400]",
])
def test_documented_edge_values_are_accepted(override: str) -> None:
    load_config(None, ["method=clip", override] if override.startswith("clip.") else [override])


def test_message_names_where_the_value_was_set(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  keep_last: 0\n")
    with pytest.raises(ConfigError, match=f"{recipe}: 'train.keep_last' = 0 must be >= 1 .schema default: 3"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="override 'train.keep_last=-1'"):
        load_config(recipe, ["train.keep_last=-1"])


def test_crop_mean_must_fit_the_channels() -> None:
    load_config(None, ["data.channels=1", "crops.mean=[0.5, 0.5, 0.5]"])  # averaged to one channel
    with pytest.raises(ConfigError, match="'crops.std' = \\[0.2, 0.2\\] has 2 values"):
        load_config(None, ["data.channels=3", "crops.std=[0.2, 0.2]"])


def test_window_channels_must_match() -> None:
    with pytest.raises(ConfigError, match="give 3 channels but 'data.channels' = 2"):
        load_config(None, ["data.intensity=window", "data.slices=3", "data.channels=2", "crops.mean=[0.5]",
                           "crops.std=[0.2]"])


# ---------------------------------------------------------------- check_paths


def _cfg(*overrides: str) -> RunConfig:
    return load_config(None, list(overrides))


def test_paths_accept_the_weight_layouts_the_loader_reads(tmp_path: Path, png_folder: Path) -> None:
    torch.save({"w": torch.zeros(2)}, tmp_path / "w.pt")
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    torch.save({"w": torch.zeros(2)}, run / "step_00000005.pt")
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "dinov2"}))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(hf / "model.safetensors"))
    for weights in (tmp_path / "w.pt", tmp_path / "run", hf, hf / "model.safetensors"):
        check_paths(_cfg(f"data.root={png_folder}", f"model.pretrained={weights}"))


def test_paths_of_unused_sections_are_not_checked(tmp_path: Path, png_folder: Path) -> None:
    missing = str(tmp_path / "missing")
    check_paths(_cfg(f"data.root={png_folder}", f"dino.gram_anchor={missing}",  # gram_weight is 0
                     f"eval.data={missing}"))  # evaluation is off
    with pytest.raises(ConfigError, match="section 'distill' belongs to method distill"):  # not a dino run's key
        _cfg(f"data.root={png_folder}", f"distill.teacher_checkpoint={missing}")


def test_clip_paths_are_checked_and_the_demo_source_is_not(tmp_path: Path) -> None:
    check_paths(_cfg("method=clip", "clip.data.kind=demo", f"clip.data.demo_dir={tmp_path / 'later'}"))
    with pytest.raises(ConfigError, match="'clip.data.manifest' = .*pairs.csv' does not exist"):
        check_paths(_cfg("method=clip", f"clip.data.manifest={tmp_path / 'pairs.csv'}"))


# -- best.pt is chosen on validation only ------------------------------------------------------------------------
def test_dino_best_metric_must_be_a_validation_metric() -> None:
    on = ["eval.every_steps=10", "eval.data=labels.csv"]
    with pytest.raises(ConfigError, match=r"'eval.best_metric' = 'knn_top1_k20'.*validation.*'val_knn_top1_k20'"):
        load_config(None, [*on, "eval.best_metric=knn_top1_k20"])
    with pytest.raises(ConfigError, match="health_feature_std"):
        load_config(None, [*on, "eval.best_metric=health_feature_std"])
    for ok in ("val_knn_top1_k20", "eval/val_knn_auc_k10", "linear_val_score", ""):
        assert load_config(None, [*on, f"eval.best_metric={ok}"]).eval.best_metric == ok
    assert load_config(None, on).eval.best_metric == "val_knn_top1_k20"  # the default is one
    assert load_config(None, ["eval.best_metric=knn_top1_k20"]).eval.every_steps == 0  # no evaluation: no choice


def test_clip_best_metric_needs_a_set_declared_validation() -> None:
    from medfoundry.config.clip import best_direction

    on = ["method=clip", "clip.eval.every_steps=10"]
    with pytest.raises(ConfigError, match=r"'clip.eval.best_metric' = 'zeroshot/mean_auc'.*split: test"):
        load_config(None, [*on, "clip.eval.best_metric=zeroshot/mean_auc"])
    with pytest.raises(ConfigError, match="retrieval/i2t_recall_at_5"):
        load_config(None, [*on, "clip.eval.retrieval.source=train", "clip.eval.best_metric=retrieval/i2t_recall_at_5"])
    cfg = load_config(None, [*on, "clip.eval.zeroshot.split=val", "clip.eval.best_metric=zeroshot/mean_auc"])
    assert best_direction(cfg.clip.eval) == "max"
    cfg = load_config(None, [*on, "clip.eval.retrieval.source=data", "clip.eval.retrieval.split=val",
                             "clip.eval.best_metric=retrieval/i2t_median_rank"])
    assert best_direction(cfg.clip.eval) == "min"
    default = load_config(None, on).clip.eval
    assert default.best_metric == "val/contrastive_loss" and best_direction(default) == "min"
