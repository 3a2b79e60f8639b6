"""``crops.normalize`` presets: ``tcga`` / ``imagenet`` resolve into ``crops.mean`` / ``crops.std`` when the config
loads (so views, evaluation and exports read the resolved numbers), contradictions are refused naming the keys,
a saved config reloads, and an exported model records the preset's statistics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_runs import train_tiny_run, write_pictures

from medfoundry.config import load_config
from medfoundry.config.loader import ConfigError, save_config
from medfoundry.config.normalization import IMAGENET_MEAN, IMAGENET_STD, TCGA_MEAN, TCGA_STD
from medfoundry.models.preprocessing import preprocessing_from_sections, read_preprocessing
from medfoundry.recipes import recipes_dir
from medfoundry_cli.cli import main

PATHOLOGY = recipes_dir() / "pathology_vits14_0p5mpp.yaml"  # RGB tiles; its recipe sets ImageNet's mean/std
TINY = recipes_dir() / "tiny_dino_cpu.yaml"  # grey: data.channels = 1, crops.mean = [0.5]


def test_tcga_preset_resolves_to_its_statistics() -> None:
    # Lunit's TCGA-trained ViT-S statistics (kaiko-ai/eva, backbones/pathology/lunit.py)
    assert TCGA_MEAN == (0.70322989, 0.53606487, 0.66096631)
    assert TCGA_STD == (0.21716536, 0.26081574, 0.20723464)
    cfg = load_config(PATHOLOGY, ["crops.normalize=tcga"])  # an override replaces the recipe's ImageNet values
    assert cfg.crops.mean == list(TCGA_MEAN) and cfg.crops.std == list(TCGA_STD)
    cfg = load_config(PATHOLOGY, ["crops.normalize=imagenet"])
    assert cfg.crops.mean == list(IMAGENET_MEAN) and cfg.crops.std == list(IMAGENET_STD)
    assert load_config(PATHOLOGY).crops.normalize == "custom"  # the default keeps mean/std as given


def test_a_contradicting_mean_is_refused_naming_both_keys() -> None:
    with pytest.raises(ConfigError, match=r"'crops.mean' = \[0.5, 0.5, 0.5\] contradicts 'crops.normalize' = "
                                          r"'tcga'.*crops.normalize' = 'custom'"):
        load_config(PATHOLOGY, ["crops.normalize=tcga", "crops.mean=[0.5,0.5,0.5]"])
    with pytest.raises(ConfigError, match="'crops.std'"):
        load_config(PATHOLOGY, ["crops.std=[0.2,0.2,0.2]", "crops.normalize=tcga"])
    # the preset's own numbers given again are no contradiction
    cfg = load_config(PATHOLOGY, ["crops.normalize=tcga", f"crops.mean=[{','.join(map(str, TCGA_MEAN))}]"])
    assert cfg.crops.mean == list(TCGA_MEAN)


def test_a_preset_needs_rgb() -> None:
    with pytest.raises(ConfigError, match=r"'crops.normalize' = 'tcga' .* 'data.channels' = 1"):
        load_config(TINY, ["crops.normalize=tcga"])


def test_a_saved_config_reloads_with_the_resolved_numbers(tmp_path: Path) -> None:
    """A run's config.yaml holds the preset's name and numbers; reading it back (resume, eval) changes nothing."""
    cfg = load_config(PATHOLOGY, ["crops.normalize=tcga"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again.crops.normalize == "tcga" and again.crops.mean == list(TCGA_MEAN)
    assert again.crops.std == list(TCGA_STD)


def test_the_preprocessing_record_reads_the_resolved_statistics() -> None:
    cfg = load_config(PATHOLOGY, ["crops.normalize=tcga"])
    prep = preprocessing_from_sections(cfg.data, cfg.crops, cfg.eval)
    assert prep.mean == list(TCGA_MEAN) and prep.std == list(TCGA_STD)
    assert prep.sections["crops"]["normalize"] == "tcga"


def test_an_exported_model_records_the_tcga_statistics(tmp_path: Path) -> None:
    """A tiny RGB run with crops.normalize=tcga, exported to HF: medfoundry_preprocessing.json and transformers'
    preprocessor_config.json carry the TCGA mean/std (the tiny recipe's own [0.5]/[0.25] are replaced)."""
    data = tmp_path / "tiles"
    write_pictures(data, [(40, 40)] * 6, channels=3)
    run = train_tiny_run(tmp_path / "run", data, "data.channels=3", "model.in_chans=3", "crops.normalize=tcga")
    out = tmp_path / "hf"
    assert main(["export", str(run), "--to", "hf", "--out", str(out)]) == 0
    prep = read_preprocessing(out)
    assert prep is not None and prep.mean == pytest.approx(list(TCGA_MEAN)) and prep.std == pytest.approx(
        list(TCGA_STD))
    hf = json.loads((out / "preprocessor_config.json").read_text())
    assert hf["image_mean"] == pytest.approx(list(TCGA_MEAN)) and hf["image_std"] == pytest.approx(list(TCGA_STD))


def test_a_preset_given_to_a_built_config_replaces_its_statistics() -> None:
    """``medfoundry attention --override crops.normalize=tcga`` (apply_overrides on a loaded section bundle)."""
    from medfoundry.config.loader import apply_overrides
    from medfoundry.config.schema import CropsConfig
    from medfoundry.eval.sections import FrozenEvalSections

    sections = FrozenEvalSections(crops=CropsConfig(mean=[0.5], std=[0.25]))
    apply_overrides(sections, ["crops.normalize=tcga"], "--override")
    assert sections.crops.mean == list(TCGA_MEAN) and sections.crops.std == list(TCGA_STD)
    with pytest.raises(ConfigError, match="--override 'crops.mean=.*contradicts"):
        apply_overrides(FrozenEvalSections(), ["crops.normalize=tcga", "crops.mean=[0.1,0.2,0.3]"], "--override")
