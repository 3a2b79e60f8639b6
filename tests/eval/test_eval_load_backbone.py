"""Evaluation loads only the evaluated backbone: a distilled student evaluates once its teacher is gone.

``medfoundry.methods.checkpoint_backbone.load_backbone`` builds just the backbone the method evaluates (the registry
entry's ``build_eval_backbone``) and loads the checkpoint keys under its ``eval_prefix``; no external
weights (the distillation teacher, ``model.pretrained``) are read. Its random initialisation is the
run's step-0 backbone, bit for bit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from labelled_images import make_labelled_pngs

from medfoundry.checkpoints.format import latest_checkpoint, load_checkpoint
from medfoundry.config import load_config
from medfoundry.config.schema import RunConfig
from medfoundry.methods import get_method_entry
from medfoundry.methods.checkpoint_backbone import build_eval_backbone, config_from_checkpoint, load_backbone
from medfoundry.recipes import resolve_recipe
from medfoundry_cli.cli import main

TINY = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "dino.head.out_dim=64",
        "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "train.batch_size=4", "train.steps=2",
        "train.checkpoint_every=2", "train.progress=false", "train.tensorboard=false"]


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _step0_eval_backbone(cfg: RunConfig) -> torch.nn.Module:
    """The evaluated backbone of the whole method built as the training loop builds it (seed, then build)."""
    torch.manual_seed(cfg.train.seed)
    method = get_method_entry(cfg.method).build(cfg)
    prefix = get_method_entry(cfg.method).eval_prefix
    assert method.get_submodule(prefix.rstrip(".")) is method.eval_backbone()
    return method.eval_backbone()


@pytest.fixture(scope="module")
def student_without_teacher(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny DINO teacher run, a student distilled from it, then the teacher's run folder deleted."""
    tmp = tmp_path_factory.mktemp("eval_load")
    data = make_labelled_pngs(tmp / "labelled", n=12, size=40)
    teacher, student = tmp / "teacher", tmp / "student"
    common = [f"data.root={data}", *TINY]
    assert main(["train", "tiny_dino_cpu", f"output_dir={teacher}", *common]) == 0
    assert main(["train", "distill_tiny_cpu", f"output_dir={student}", f"distill.teacher_checkpoint={teacher}",
                 *common]) == 0
    state = load_checkpoint(latest_checkpoint(student))
    cfg = config_from_checkpoint(state["config"], str(latest_checkpoint(student)))
    cfg.output_dir = str(tmp / "scratch")  # building the method records its load reports there
    step0 = _state(_step0_eval_backbone(cfg))  # needs the teacher: recorded before it goes
    shutil.rmtree(teacher)
    return {"student": student, "data": data, "state": state, "step0": step0, "tmp": tmp}


def test_eval_student_after_teacher_folder_is_deleted(student_without_teacher: dict) -> None:
    """`medfoundry eval STUDENT --task knn` needs nothing but the student's checkpoint."""
    run, out = student_without_teacher["student"], student_without_teacher["tmp"] / "knn.json"
    rc = main(["eval", str(run), "--task", "knn", "--data", str(student_without_teacher["data"]),
               "--n-bootstrap", "10", "--no-cache", "--json", str(out)])
    assert rc == 0
    assert "knn_top1_k20" in json.loads(out.read_text())["pretrained"]


def test_load_backbone_returns_the_student(student_without_teacher: dict) -> None:
    loaded = load_backbone(student_without_teacher["student"])
    assert loaded.method == "distill" and not loaded.random_init and loaded.step == 2
    method_sd = student_without_teacher["state"]["method"]
    student = {k.removeprefix("student.backbone."): v for k, v in method_sd.items()
               if k.startswith("student.backbone.")}
    _assert_same_weights(_state(loaded.backbone), student)
    assert not loaded.backbone.training and not any(p.requires_grad for p in loaded.backbone.parameters())


def test_random_init_after_teacher_deletion_is_the_step0_student(student_without_teacher: dict) -> None:
    loaded = load_backbone(student_without_teacher["student"], random_init=True)
    assert loaded.random_init and loaded.identity.startswith("random-init-")
    _assert_same_weights(_state(loaded.backbone), student_without_teacher["step0"])
    rc = main(["eval", str(student_without_teacher["student"]), "--task", "knn", "--random-init",
               "--data", str(student_without_teacher["data"]), "--n-bootstrap", "10", "--no-cache"])
    assert rc == 0


@pytest.mark.parametrize(("recipe", "overrides"), [
    ("tiny_dino_cpu", [*TINY, "adapt.lora_rank=2", "model.drop_path_rate=0.1"]),  # dino: the EMA teacher, LoRA, no
    # drop-path
    ("tiny_clip_cpu", ["model.img_size=32", "clip.embed_dim=16", "clip.text.width=32", "clip.text.heads=2",
                       "clip.text.layers=1", "clip.text.context_length=48", "clip.preprocess.stored_size=36",
                       "clip.preprocess.size=32", "train.seed=3"]),  # clip: the image tower
], ids=["dino_lora", "clip"])
def test_eval_backbone_is_the_methods_step0_backbone(recipe: str, overrides: list[str], tmp_path: Path) -> None:
    """The registry's eval backbone equals, bit for bit, the whole method's under the same seed."""
    cfg = load_config(resolve_recipe(recipe), [f"output_dir={tmp_path}", *overrides])
    expected = _state(_step0_eval_backbone(cfg))
    rng_before = torch.get_rng_state()
    backbone, prefix = build_eval_backbone(cfg)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the caller's random stream is untouched
    assert prefix == {"dino": "teacher.backbone.", "clip": "image.backbone."}[cfg.method]
    _assert_same_weights(_state(backbone), expected)
