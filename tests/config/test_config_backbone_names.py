"""Backbone names in the config are checked when it loads: an unregistered name is a config error (exit 2)."""

from __future__ import annotations

import re

import pytest

from medfoundry.config import ConfigError, load_config
from medfoundry.models.registry import list_backbones
from medfoundry.recipes import recipes_dir
from medfoundry_cli.cli import main

REGISTERED = [spec.name for spec in list_backbones()]


def _nearest_in(message: str) -> str:
    """The name after ``nearest registered name:`` in an error message."""
    found = re.search(r"nearest registered name: '([^']*)'", message)
    assert found, message
    return found.group(1)


def test_cli_config_rejects_unregistered_model_name(capsys) -> None:
    code = main(["config", str(recipes_dir() / "tiny_dino_cpu.yaml"), "model.name=no_such_vit"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model.name" in err and "no_such_vit" in err
    assert _nearest_in(err) in REGISTERED


def test_typo_in_model_name_suggests_the_intended_backbone() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.name=vit_smal_patch14_dinov2"])
    assert _nearest_in(str(err.value)) == "vit_small_patch14_dinov2"


def test_cli_config_rejects_unregistered_distill_teacher(capsys) -> None:
    code = main(["config", str(recipes_dir() / "distill_tiny_cpu.yaml"), "distill.teacher_name=vit_tiny_patch9"])
    err = capsys.readouterr().err
    assert code == 2
    assert "distill.teacher_name" in err and "vit_tiny_patch9" in err
    assert _nearest_in(err) == "vit_tiny_patch8"


def test_every_registered_name_and_an_unset_teacher_load() -> None:
    for name in REGISTERED:
        assert load_config(None, ["method=distill", f"model.name={name}",
                                  f"distill.teacher_name={name}"]).model.name == name
    assert load_config(None, ["method=distill", "distill.teacher_name="]).distill.teacher_name == ""
