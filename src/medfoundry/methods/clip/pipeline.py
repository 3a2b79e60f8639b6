"""The ``clip`` method's pipeline: reads a CLIP run's whole config and hands each part its section (method,
image-report loader, evaluated image backbone, zero-shot/retrieval hook, input paths). Registered as :data:`ENTRY`."""

from __future__ import annotations

from collections.abc import Iterator

from medfoundry.config.data import DataConfig
from medfoundry.config.evaluation import EvalConfig
from medfoundry.config.loader import to_dict
from medfoundry.config.schema import CropsConfig
from medfoundry.data.pair_loader import preset_pixel_stats
from medfoundry.eval.clip_hook import ClipEvalContext, ClipEvalHook
from medfoundry.eval.hooks import Hook
from medfoundry.eval.sections import FrozenEvalSections
from medfoundry.methods import input_paths as paths
from medfoundry.methods.clip.config import ClipRunConfig
from medfoundry.methods.clip.loader import build_clip_loader
from medfoundry.methods.clip.method import ClipMethod, init_eval_backbone
from medfoundry.methods.registry import MethodEntry, Need
from medfoundry.models.backbone import Backbone
from medfoundry.models.pretrained import record_load_reports


def build(cfg: ClipRunConfig) -> ClipMethod:
    """Image and text towers and the contrastive loss; load reports recorded in the run folder."""
    method = ClipMethod(cfg.model, cfg.clip, cfg.adapt)
    record_load_reports(method.load_reports, cfg.output_dir)
    return method


def eval_context(cfg: ClipRunConfig) -> ClipEvalContext:
    """What zero-shot, retrieval and validation-loss evaluation read of a CLIP run."""
    c = cfg.clip
    return ClipEvalContext(c.eval, c.preprocess, c.data, cfg.model.in_chans, cfg.train.precision, cfg.train.batch_size)


def build_hooks(cfg: ClipRunConfig) -> list[Hook]:
    """A :class:`ClipEvalHook` when ``clip.eval.every_steps`` or ``clip.eval.val_loss.every_steps`` is > 0."""
    if cfg.clip.eval.every_steps <= 0 and cfg.clip.eval.val_loss.every_steps <= 0:
        return []
    return [ClipEvalHook(eval_context(cfg), cfg.train.steps, to_dict(cfg))]


def needed_paths(cfg: ClipRunConfig) -> Iterator[Need]:
    """The pair data, the text tower's weights and the evaluation sets of ``clip``."""
    c = cfg.clip
    yield from paths.pair_paths("clip.data", c.data)
    if c.text.pretrained:
        yield "clip.text.pretrained", c.text.pretrained, paths.weights_file
    if c.text.kind == "hf" and c.text.hf_path:
        yield "clip.text.hf_path", c.text.hf_path, paths.folder
    if c.eval.every_steps > 0:
        z = c.eval.zeroshot
        if z.kind in ("manifest", "hdf5") and z.labels:
            yield "clip.eval.zeroshot.labels", z.labels, paths.regular_file
        if z.kind == "hdf5" and z.hdf5:
            yield "clip.eval.zeroshot.hdf5", z.hdf5, paths.regular_file
        if z.image_root:
            yield "clip.eval.zeroshot.image_root", z.image_root, paths.folder
        if c.eval.retrieval.source == "data":
            yield from paths.pair_paths("clip.eval.retrieval.data", c.eval.retrieval.data)
    if c.eval.val_loss.every_steps > 0:
        yield from paths.pair_paths("clip.eval.val_loss.data", c.eval.val_loss.data)


def max_bad_fraction(cfg: ClipRunConfig) -> float:
    """The share of unreadable pair images after which the run stops: the ``data`` section's default, as before
    the methods owned their sections (``clip.data`` has no key of its own for it yet)."""
    return DataConfig().max_bad_fraction


def frozen_eval_sections(cfg: ClipRunConfig, state: dict | None = None) -> FrozenEvalSections:
    """The image tower's own evaluation preprocessing, as the sections frozen evaluation (kNN, linear probe,
    attention maps, export) reads.

    Images are read as the pair loader reads them (pictures in [0, 1], ``model.in_chans`` channels), the shorter
    side is resized to ``clip.preprocess.size`` and centre-cropped, and pixels are normalised with the statistics
    the tower was trained with: the checkpoint's ``pixel_mean`` / ``pixel_std`` buffers when ``state`` holds them
    (they carry the measured statistics of ``clip.preprocess.normalize=dataset``), else the preset's. The pair
    loader's intermediate resize to ``clip.preprocess.stored_size`` is not repeated (one resize instead of two).
    """
    p = cfg.clip.preprocess
    mean, std = preset_pixel_stats(p, cfg.model.in_chans)
    if state and "pixel_mean" in state and "pixel_std" in state:
        mean = [float(v) for v in state["pixel_mean"].flatten()]
        std = [float(v) for v in state["pixel_std"].flatten()]
    return FrozenEvalSections(DataConfig(channels=cfg.model.in_chans),
                              CropsConfig(global_size=p.size, mean=mean, std=std), EvalConfig(img_size=p.size))


def build_eval_backbone(cfg: ClipRunConfig) -> Backbone:
    """The image backbone at its step-0 initialisation (``model``, ``adapt`` unless ``clip.image.freeze``)."""
    return init_eval_backbone(cfg.model, cfg.adapt, frozen=cfg.clip.image.freeze)


ENTRY = MethodEntry("clip", ClipRunConfig, build, build_clip_loader, "image", build_eval_backbone, build_hooks,
                    needed_paths, max_bad_fraction, frozen_eval_sections)
