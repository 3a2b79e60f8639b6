"""Config-time value checks: finite numbers, ranges that are true for each field, registered names.

:func:`check_values` runs inside :func:`~medfoundry.config.loader.load_config`, so ``medfoundry config``,
``train``, ``sweep`` and ``launch`` refuse a bad value before any work (and before a sweep starts its
arms). It checks only what the config itself can tell; whether files and folders exist is checked once
at the start of a run by :func:`medfoundry.methods.input_paths.check_paths` (``medfoundry config`` must work
for a recipe whose data are not downloaded yet).

Every float anywhere in the tree must be finite. Each int/float leaf then has a rule in :data:`RULES`
(dotted-key patterns, ``*`` matching any part), or is listed in :data:`UNBOUNDED` with the reason it
has none; a test keeps that table complete. A broken rule raises
:class:`~medfoundry.config.loader.ConfigError` naming the key, the value, where it was set, the
requirement and the default.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from medfoundry.config.names import PRETRAINED_FORMATS, registered_names

if TYPE_CHECKING:
    from medfoundry.config.data import DataConfig
    from medfoundry.config.evaluation import EvalConfig
    from medfoundry.config.schema import CropsConfig, RunConfig


@dataclass(frozen=True)
class Rule:
    """A predicate on one field's value and the words for it ("an integer >= 1")."""

    test: Callable[[Any], bool]
    requirement: str


def at_least(low: float) -> Rule:
    """``value >= low`` (counts, step numbers, sizes, weights)."""
    return Rule(lambda v: v >= low, f">= {low:g}")


def positive() -> Rule:
    """``value > 0`` (temperatures, learning rates, scales)."""
    return Rule(lambda v: v > 0, "> 0")


def within(low: float, high: float, high_open: bool = False) -> Rule:
    """``low <= value <= high`` (or ``< high``): probabilities, momenta, fractions."""
    if high_open:
        return Rule(lambda v: low <= v < high, f"in [{low:g}, {high:g})")
    return Rule(lambda v: low <= v <= high, f"in [{low:g}, {high:g}]")


def in_unit_open_low() -> Rule:
    """``0 < value <= 1`` (a decay factor where 1 is off)."""
    return Rule(lambda v: 0 < v <= 1, "in (0, 1]")


def odd() -> Rule:
    """An odd count >= 1 (slices stacked symmetrically around the sampled one)."""
    return Rule(lambda v: v >= 1 and v % 2 == 1, "odd and >= 1 (1, 3, 5 ...)")


def each(rule: Rule, min_len: int = 1) -> Rule:
    """Every element of a list satisfies ``rule`` and the list has at least ``min_len`` elements."""
    return Rule(lambda v: len(v) >= min_len and all(rule.test(x) for x in v),
                f"a list of at least {min_len} value(s), each {rule.requirement}")


def ordered_pair(low: float = -math.inf, high: float = math.inf, strict: bool = False,
                 low_open: bool = False) -> Rule:
    """``[a, b]`` with ``low <= a <= b <= high`` (``a < b`` when ``strict``; ``low < a`` when ``low_open``)."""
    def test(v: list) -> bool:
        if len(v) != 2:
            return False
        a, b = v
        return (a > low if low_open else a >= low) and b <= high and (a < b if strict else a <= b)

    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"
    return Rule(test, f"[low, high] with low {'<' if strict else '<='} high, both in {bounds}")


def exactly(n: int, rule: Rule) -> Rule:
    """A list of exactly ``n`` elements, each satisfying ``rule``."""
    return Rule(lambda v: len(v) == n and all(rule.test(x) for x in v), f"{n} values, each {rule.requirement}")


_COUNT = at_least(1)
_NONNEG = at_least(0)
_PROB = within(0.0, 1.0)

# Patterns of dotted keys -> rule. Every rule that matches a key applies. A value of None (an unset
# Optional) is not checked. Ranges follow how the field is used; see each field's comment in the schema.
RULES: dict[str, Rule] = {
    # model
    "model.img_size": _COUNT,
    "model.in_chans": _COUNT,
    "model.drop_path_rate": within(0.0, 1.0, high_open=True),
    # data
    "data.channels": _COUNT,
    "*num_workers": _NONNEG,
    "data.max_bad_fraction": _PROB,
    "data.slices": odd(),
    "data.slice_stride": _COUNT,
    "data.volume_cache": _COUNT,
    "data.slice_slope": Rule(lambda v: v != 0, "non-zero (stored * slope + intercept)"),
    "data.tile_mpp": positive(),
    "data.tile_size": _COUNT,
    "data.min_tissue": _PROB,
    "data.slide_mpp": positive(),
    "data.value_range": ordered_pair(strict=True),
    "data.random_window_prob": _PROB,
    "data.window_center_range": ordered_pair(),
    "data.window_width_range": ordered_pair(low=0.0, low_open=True),
    # crops
    "crops.n_global": _COUNT,
    "crops.global_size": _COUNT,
    "crops.global_scale": ordered_pair(0.0, 1.0, low_open=True),
    "crops.n_local": _NONNEG,
    "crops.local_size": _COUNT,
    "crops.local_scale": ordered_pair(0.0, 1.0, low_open=True),
    "crops.*_prob": _PROB,
    "crops.storage_size": _COUNT,
    "crops.hed_sigma": within(0.0, 1.0),  # stain scale factors in [1 - s, 1 + s] stay >= 0
    "*color_jitter": Rule(lambda v: len(v) == 4 and min(v[:3]) >= 0 and 0 <= v[3] <= 0.5,
                          "[brightness, contrast, saturation, hue] with the first three >= 0 and hue in [0, 0.5]"),
    "crops.mean": each(Rule(lambda v: True, "finite")),
    "crops.std": each(positive()),
    # dino
    "dino.*head.out_dim": _COUNT,
    "dino.*head.hidden_dim": _NONNEG,  # 0 = the backbone's width
    "dino.*head.bottleneck_dim": _COUNT,
    "dino.*head.nlayers": _COUNT,
    "dino.*_temp": positive(),
    "dino.warmup_teacher_temp_steps": _NONNEG,
    "dino.*momentum*": _PROB,
    "dino.sinkhorn_iterations": _COUNT,
    "dino.*_weight": _NONNEG,
    "dino.mask_probability": _PROB,
    "dino.mask_ratio_*": _PROB,
    "dino.kde_temperature": positive(),
    "dino.gram_start_step": _NONNEG,
    "dino.freeze_last_layer_steps": _NONNEG,
    # optim
    "optim.momentum": _PROB,
    "optim.lr": positive(),
    "optim.min_lr": _NONNEG,
    "optim.warmup_steps": _NONNEG,
    "optim.weight_decay*": _NONNEG,
    "optim.betas": exactly(2, within(0.0, 1.0, high_open=True)),
    "optim.clip_grad": _NONNEG,  # 0 = no clipping
    "optim.layer_decay": in_unit_open_low(),
    "optim.patch_embed_lr_mult": _NONNEG,  # 0 = the patch embedding is not updated
    "optim.freeze_backbone_steps": _NONNEG,
    # train
    "train.steps": _COUNT,
    "train.schedule_steps": _NONNEG,  # 0 = train.steps
    "train.batch_size": _COUNT,
    "train.grad_accum_steps": _COUNT,
    "train.log_every": _COUNT,
    "train.checkpoint_every": _COUNT,
    "train.keep_last": _COUNT,
    "train.max_nonfinite_steps": _COUNT,
    # adapt, distill
    "adapt.lora_rank": _NONNEG,
    "adapt.lora_alpha": positive(),
    "adapt.lora_dropout": within(0.0, 1.0, high_open=True),
    "adapt.freeze_first_n_blocks": _NONNEG,
    "adapt.unfreeze_last_n_blocks": at_least(-1),  # -1 = off
    "distill.teacher_img_size": _NONNEG,  # 0 = model.img_size
    "distill.*_weight": _NONNEG,
    # clip (cross-field checks are in config/clip.py)
    "clip.embed_dim": _COUNT,
    "clip.*proj_hidden_dim": _COUNT,
    "clip.text.context_length": at_least(3),
    "clip.text.keep_positions": _NONNEG,
    "clip.text.width": _COUNT,
    "clip.text.heads": _COUNT,
    "clip.text.layers": _COUNT,
    "clip.text.vocab_size": _COUNT,
    "clip.text.mlp_ratio": positive(),
    "clip.text.native_dim": _NONNEG,  # 0 = derived
    "clip.text.lora_rank": _NONNEG,
    "clip.text.lora_alpha": positive(),
    "clip.text.truncation_check": _NONNEG,
    "clip.loss.temperature": positive(),
    "clip.loss.max_logit_scale": positive(),
    "clip.loss.siglip_init_scale": positive(),
    "clip.preprocess.stored_size": _COUNT,
    "clip.preprocess.size": _COUNT,
    "clip.preprocess.crop_scale": ordered_pair(0.0, 1.0, low_open=True),
    "clip.preprocess.std": Rule(lambda v: all(x > 0 for x in v), "all > 0"),
    "clip.preprocess.stats_samples": _COUNT,
    "clip.preprocess.*_prob": _PROB,
    "clip.*hdf5_scale": positive(),
    "clip.*max_pairs": _NONNEG,  # 0 = all
    "clip.eval.every_steps": _NONNEG,
    "clip.eval.batch_size": _COUNT,
    "clip.eval.zeroshot.max_images": _NONNEG,
    "clip.eval.zeroshot.bootstrap": _NONNEG,
    "clip.eval.retrieval.ks": each(_COUNT),
    "clip.eval.val_loss.every_steps": _NONNEG,
    "clip.eval.val_loss.batch_size": _NONNEG,  # 0 = train.batch_size
    # eval and monitors
    "eval.every_steps": _NONNEG,
    "eval.split_fractions": exactly(3, _NONNEG),
    "eval.img_size": _NONNEG,  # 0 = crops.global_size
    "eval.knn_k": each(_COUNT),
    "eval.knn_temperature": positive(),
    "eval.n_bootstrap": _NONNEG,
    "eval.retrieval_images": at_least(2),
    "eval.batch_size": _COUNT,
    "eval.*.after_steps": _NONNEG,
    "eval.*.patience": _COUNT,
    "eval.*.eval_patience": _COUNT,
    "eval.entropy_wall.threshold_frac": positive(),
    "eval.prototype_collapse.min_effective_frac": _PROB,
    "eval.collapse.min_feature_std": _NONNEG,
    "eval.collapse.min_active_dims_frac": _PROB,
}

# Numeric fields with no range beyond being finite, and why.
UNBOUNDED: dict[str, str] = {
    "train.seed": "any integer seeds the run",
    "eval.split_seed": "any integer",
    "eval.retrieval_seed": "any integer",
    "clip.*demo_seed": "any integer",
    "data.slice_intercept": "an offset in source units, any sign",
    "clip.loss.siglip_init_bias": "a logit bias, negative by design (SigLIP: -10)",
    "clip.preprocess.mean": "a per-channel mean, any value (its length is checked with normalize=custom)",
}


def leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, value)`` of every non-section field of a config dataclass, in schema order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", value


def rules_for(key: str) -> list[Rule]:
    """Every rule whose pattern matches ``key``."""
    return [rule for pattern, rule in RULES.items() if fnmatch.fnmatchcase(key, pattern)]


def _floats(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, float)]
    return []


def _default_of(key: str, root: type) -> Any:
    node: Any = root()
    for part in key.split("."):
        node = getattr(node, part)
    return node


def value_error(key: str, value: Any, requirement: str, origins: dict[str, str] | None = None,
                root: type | None = None) -> str:
    """The message for ``key = value`` breaking ``requirement``: where it was set, and the default to go back to.

    ``root`` is the class of the run config the key belongs to (default: the common sections).
    """
    from medfoundry.config.schema import RunConfig

    where = (origins or {}).get(key)
    default = _default_of(key, root or RunConfig)
    return f"{where + ': ' if where else ''}'{key}' = {value!r} must be {requirement} (schema default: {default!r})"


def check_values(cfg: RunConfig, origins: dict[str, str] | None = None) -> None:
    """Raise :class:`ConfigError` for the first non-finite number or value outside its field's rule."""
    from medfoundry.config.loader import ConfigError

    for key, value in leaves(cfg):
        if value is None or isinstance(value, bool):
            continue
        if any(not math.isfinite(x) for x in _floats(value)):
            raise ConfigError(value_error(key, value, "a finite number (not nan or inf)", origins, type(cfg)))
        for rule in rules_for(key):
            if not rule.test(value):
                raise ConfigError(value_error(key, value, rule.requirement, origins, type(cfg)))


def check_eval_section(ec: EvalConfig) -> None:
    """``eval.split_fractions`` must have a positive sum (for the methods whose run config has ``eval``)."""
    from medfoundry.config.loader import ConfigError

    if sum(ec.split_fractions) <= 0:
        raise ConfigError(f"'eval.split_fractions' = {ec.split_fractions} must have a positive sum "
                          "(train, val, test shares, e.g. [0.6, 0.2, 0.2])")


def is_validation_metric(name: str) -> bool:
    """Whether in-training metric ``name`` is measured on the validation split (``val_knn_top1_k20``,
    ``linear_val_score``): the only kind that may choose ``best.pt``."""
    name = name.removeprefix("eval/")
    return name.startswith("val_") or "_val_" in name


def check_best_metric(ec: EvalConfig) -> None:
    """``eval.best_metric`` (when in-training evaluation runs) is a validation-split metric, so ``best.pt`` is
    never chosen on the test split that the final numbers are reported on."""
    from medfoundry.config.loader import ConfigError

    metric = ec.best_metric
    if ec.every_steps > 0 and metric and not is_validation_metric(metric):
        hint = f"'val_{metric.removeprefix('eval/')}'" if metric.removeprefix("eval/").startswith("knn_") else \
            "a val_ metric such as 'val_knn_top1_k20'"
        raise ConfigError(f"'eval.best_metric' = {metric!r} is not measured on the validation split; best.pt is "
                          f"chosen on validation only (the test split is for the final report): use {hint}, or "
                          "'' for no best checkpoint")


def check_image_pipeline(data: DataConfig, crops: CropsConfig) -> None:
    """``crops.mean``/``crops.std`` fit ``data.channels``; HU windows x slices give ``data.channels``; a
    normalisation preset and HED stain augmentation need RGB pictures."""
    from medfoundry.config.loader import ConfigError

    channels = data.channels
    if crops.normalize != "custom" and channels != 3:
        raise ConfigError(f"'crops.normalize' = {crops.normalize!r} is a preset of 3 RGB statistics but "
                          f"'data.channels' = {channels}; set crops.normalize=custom with crops.mean/std")
    if crops.hed_prob > 0:
        check_hed(data, crops)
    for key in ("mean", "std"):
        values = getattr(crops, key)
        if len(values) not in (1, channels) and channels != 1:
            raise ConfigError(f"'crops.{key}' = {values} has {len(values)} values but 'data.channels' = {channels}; "
                              f"give 1 or {channels} values")
    if data.intensity != "window":
        return
    from medfoundry.config.windows import parse_window

    for i, spec in enumerate(data.windows):
        try:
            parse_window(spec)
        except ValueError as err:
            raise ConfigError(f"'data.windows[{i}]' = {spec!r}: {err}") from None
    produced = data.slices * len(data.windows)
    if produced not in (1, channels):
        raise ConfigError(f"'data.slices' = {data.slices} x {len(data.windows)} window(s) in 'data.windows' "
                          f"give {produced} channels but 'data.channels' = {channels}; set data.channels (and "
                          f"model.in_chans) to {produced}")


def check_hed(data: DataConfig, crops: CropsConfig) -> None:
    """HED stain augmentation (``crops.hed_prob > 0``) needs RGB pictures (3 channels, no HU windows) and the CPU
    crop path, which implements it."""
    from medfoundry.config.loader import ConfigError

    why = ""
    if data.channels != 3:
        why = f"'data.channels' = {data.channels}"
    elif data.intensity == "window":
        why = "'data.intensity' = 'window' (HU windows are not colours)"
    elif crops.device != "cpu":
        why = f"'crops.device' = {crops.device!r} (only the CPU crop path implements it)"
    if why:
        raise ConfigError(f"'crops.hed_prob' = {crops.hed_prob} needs RGB H&E pictures and crops.device=cpu, "
                          f"not {why}; set crops.hed_prob=0")


_BACKENDS = ("auto", "nccl", "gloo", "mpi", "ucc")


def one_of(key: str, value: str, names: list[str] | tuple[str, ...] | None) -> None:
    """Raise :class:`ConfigError` unless ``value`` is in ``names`` (None: catalog not registered, skip)."""
    from medfoundry.config.backbones import nearest_name
    from medfoundry.config.loader import ConfigError

    if names is not None and value not in names:
        raise ConfigError(f"'{key}' = {value!r} is not one of {sorted(names)}; nearest: "
                          f"'{nearest_name(value, list(names))}'")


def check_names(cfg: RunConfig) -> None:
    """Registered names of the common sections: pretrained format, device, backend, backbone.

    Backbones are checked against the catalog the registry registered (:mod:`medfoundry.config.names`);
    a catalog not registered yet (its package not imported) is skipped here and checked again by
    ``train()``. A method's own names (data kinds, evaluation tasks, a teacher's backbone) are checked by
    its run config's ``check()`` with :func:`check_data_names` / :func:`check_eval_names`.
    """
    from medfoundry.config.backbones import check_backbone_names

    one_of("model.pretrained_format", cfg.model.pretrained_format, PRETRAINED_FORMATS)
    _check_device(cfg.train.device)
    if cfg.dist.backend not in _BACKENDS and ":" not in cfg.dist.backend:  # "cpu:gloo,cuda:nccl" is torch's form
        one_of("dist.backend", cfg.dist.backend, _BACKENDS)
    check_backbone_names([("model.name", cfg.model.name)])
    cfg.check_names()


def check_data_names(data: DataConfig) -> None:
    """``data.kind`` is a registered source kind."""
    one_of("data.kind", data.kind, registered_names("data.kind"))


def check_eval_names(ec: EvalConfig) -> None:
    """``eval.retrieval_kind`` is a source kind and, when evaluation is on, every ``eval.tasks`` entry a task."""
    if ec.retrieval_kind:
        one_of("eval.retrieval_kind", ec.retrieval_kind, registered_names("data.kind"))
    if ec.every_steps > 0:  # the task list matters only when evaluation is on
        tasks = registered_names("eval.task")
        for i, task in enumerate(ec.tasks):
            one_of(f"eval.tasks[{i}]", task, tasks)


def _check_device(name: str) -> None:
    """``auto`` or a name torch can parse (``cpu``, ``cuda``, ``cuda:1``, ``mps``); availability is not checked."""
    from medfoundry.config.loader import ConfigError

    if name == "auto":
        return
    import torch

    try:
        torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise ConfigError(f"'train.device' = {name!r} is not a device ({err}); use auto, cpu, cuda or cuda:N"
                          ) from None
