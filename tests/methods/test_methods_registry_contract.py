"""Contract tests over every registered method (timm-style): its config class, 2 training steps, exact resume,
and an evaluated backbone built alone that equals the method's own at step 0.

A new method must add its tiny set-up to ``TINY`` below (the first test fails until it does).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from labelled_images import write_grey_pngs

from medfoundry.config import load_config
from medfoundry.config.loader import to_dict
from medfoundry.config.schema import RunConfig
from medfoundry.methods import METHODS, get_method_entry
from medfoundry.recipes import resolve_recipe
from medfoundry_cli.cli import main

COMMON = ["train.progress=false", "train.tensorboard=false", "train.log_every=1", "train.device=cpu",
          "train.schedule_steps=2", "train.checkpoint_every=1"]
SMALL = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4"]


def _tiny(method: str, work: Path) -> tuple[str, list[str]]:
    """(recipe, overrides) of a tiny CPU run of ``method`` with the data the tests make."""
    pngs = write_grey_pngs(work / "pngs") if not (work / "pngs").is_dir() else work / "pngs"
    if method == "dino":
        return "tiny_dino_cpu", [f"data.root={pngs}", *SMALL]
    if method == "clip":
        return "tiny_clip_cpu", [f"clip.data.demo_dir={work / 'clip_demo'}", "clip.eval.every_steps=0",
                                 "train.batch_size=8"]
    if method == "distill":
        teacher = work / "teacher"
        if not teacher.is_dir():
            recipe, over = _tiny("dino", work)
            assert main(["train", str(resolve_recipe(recipe)), f"output_dir={teacher}", "train.steps=1", *over,
                         *COMMON]) == 0
        return "distill_tiny_cpu", [f"data.root={pngs}", f"distill.teacher_checkpoint={teacher}",
                                    "train.batch_size=4"]
    raise AssertionError(f"method {method!r} has no tiny set-up in {__file__}::_tiny")


TINY = ("clip", "dino", "distill")


def test_every_registered_method_has_a_tiny_setup() -> None:
    assert sorted(METHODS) == sorted(TINY)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_config_class_holds_the_common_sections_and_prints_every_field(name: str) -> None:
    cls = get_method_entry(name).config_class
    assert issubclass(cls, RunConfig)
    fields = [f.name for f in dataclasses.fields(cls)]
    assert [f.name for f in dataclasses.fields(RunConfig)] == [f for f in fields if f in
                                                               {g.name for g in dataclasses.fields(RunConfig)}]
    assert sorted(cls.print_order) == sorted(fields)
    cfg = load_config(None, [f"method={name}"])
    assert type(cfg) is cls and cfg.method == name and list(to_dict(cfg)) == list(cls.print_order)


def _rows(run_dir: Path) -> list[dict]:
    rows = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        rows.append({k: v for k, v in rec.items() if isinstance(v, float) and math.isfinite(v)
                     and not any(t in k for t in ("images_per_s", "seconds", "data_wait", "step_time"))})
    return rows


@pytest.mark.parametrize("name", sorted(METHODS))
def test_two_steps_and_an_exact_resume(name: str, tmp_path: Path) -> None:
    recipe, over = _tiny(name, tmp_path)
    path = str(resolve_recipe(recipe))
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", path, f"output_dir={whole}", "train.steps=2", *over, *COMMON]) == 0
    assert main(["train", path, f"output_dir={split}", "train.steps=1", *over, *COMMON]) == 0
    assert main(["train", path, f"output_dir={split}", "train.steps=2", *over, *COMMON]) == 0
    assert len(_rows(whole)) == 2 and _rows(whole) == _rows(split)
    state = torch.load(split / "checkpoints" / "step_00000002.pt", weights_only=False)
    assert state["eval_tower"] == get_method_entry(name).eval_tower


@pytest.mark.parametrize("name", sorted(METHODS))
def test_the_evaluated_backbone_built_alone_is_the_methods_own_at_step_zero(name: str, tmp_path: Path) -> None:
    recipe, over = _tiny(name, tmp_path)
    cfg = load_config(resolve_recipe(recipe), [f"output_dir={tmp_path / 'run'}", *over, *COMMON])
    entry = get_method_entry(name)
    torch.manual_seed(cfg.train.seed)
    method = entry.build(cfg)
    torch.manual_seed(cfg.train.seed)
    alone = entry.build_eval_backbone(cfg)
    own = method.eval_backbone().state_dict()
    assert set(alone.state_dict()) == set(own)
    assert all(torch.equal(v, own[k]) for k, v in alone.state_dict().items())
    prefix = entry.eval_prefix
    assert any(k.startswith(prefix) for k in method.state_dict())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_needed_paths_name_keys_of_the_methods_config(name: str, tmp_path: Path) -> None:
    from medfoundry.config.loader import all_keys

    recipe, over = _tiny(name, tmp_path)
    cfg = load_config(resolve_recipe(recipe), over)
    keys = set(all_keys(type(cfg)))
    for key, _value, check in get_method_entry(name).needed_paths(cfg):
        assert key in keys and callable(check)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_device_side_nonfinite_check_trains_and_resumes_exactly(name: str, tmp_path: Path) -> None:
    """``train.nonfinite_check=device`` (the GPU default: the skip decided on the device, the method's
    ``after_optimizer_step(step, applied=...)``) runs every method and resumes exactly."""
    recipe, over = _tiny(name, tmp_path)
    path, over = str(resolve_recipe(recipe)), [*over, "train.nonfinite_check=device"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert main(["train", path, f"output_dir={whole}", "train.steps=2", *over, *COMMON]) == 0
    assert main(["train", path, f"output_dir={split}", "train.steps=1", *over, *COMMON]) == 0
    assert main(["train", path, f"output_dir={split}", "train.steps=2", *over, *COMMON]) == 0
    assert len(_rows(whole)) == 2 and _rows(whole) == _rows(split)
