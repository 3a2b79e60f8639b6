"""The typed config: recipes validate, overrides are typed, bad keys/values name themselves."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfoundry.config import ConfigError, from_dict, load_config, to_dict
from medfoundry.recipes import list_recipes, recipes_dir
from medfoundry_cli.cli import main


@pytest.mark.parametrize("name", [n for n, _ in list_recipes()])
def test_every_bundled_recipe_validates(name: str, capsys) -> None:
    assert main(["config", str(recipes_dir() / f"{name}.yaml")]) == 0
    assert "output_dir:" in capsys.readouterr().out


def test_every_recipe_has_a_description() -> None:
    for name, desc in list_recipes():
        assert desc, f"recipe {name} needs a '# one-line description' first line"


def test_overrides_are_coerced_to_field_types() -> None:
    cfg = load_config(None, ["train.steps=1e3", "optim.lr=1e-4", "crops.global_scale=[0.5, 1.0]",
                             "model.pretrained=null", "train.tensorboard=false", "dino.centering=sinkhorn"])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == pytest.approx(1e-4)
    assert cfg.crops.global_scale == [0.5, 1.0]
    assert cfg.model.pretrained is None
    assert cfg.train.tensorboard is False
    assert cfg.dino.centering == "sinkhorn"


def test_unknown_key_names_key_value_and_nearest() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["dino.centr_momentum=0.99"])
    msg = str(err.value)
    assert "dino.centr_momentum" in msg and "0.99" in msg and "dino.center_momentum" in msg


def test_unknown_key_in_recipe_names_file(tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(recipe) in str(err.value) and "train.stepz" in str(err.value) and "train.steps" in str(err.value)


@pytest.mark.parametrize(
    "override,needle",
    [("train.steps=abc", "integer"), ("dino.centering=foo", "one of"), ("train.progress=maybe", "true or false"),
     ("dino=3", "section"), ("crops.global_scale=[0.9, 0.1]", "low <= high")],
)
def test_wrong_values_are_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(None, [override])


def test_cli_exits_2_and_names_the_key(capsys, tmp_path: Path) -> None:
    code = main(["train", str(recipes_dir() / "tiny_dino_cpu.yaml"), f"output_dir={tmp_path}", "no_such.key=1"])
    assert code == 2
    assert "no_such.key" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_round_trip_through_dict() -> None:
    cfg = load_config(recipes_dir() / "dinov2_vitl14.yaml", ["train.seed=7"])
    again = from_dict(to_dict(cfg))
    assert again == cfg
