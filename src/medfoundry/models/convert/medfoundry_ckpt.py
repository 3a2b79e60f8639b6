"""medfoundry's own weights -> backbone: training checkpoints and exported backbone state dicts.

A training checkpoint (``RUN/checkpoints/step_XXXXXXXX.pt``, ``format: medfoundry-train-v1``) holds
``{"method": state_dict, "config": resolved config, ...}`` with keys ``teacher.backbone.vit.*``,
``student.backbone.vit.*``, ``*.backbone.mask_token`` and the heads (``*.dino_head.*`` ...). One
tower is picked: the method's evaluated backbone by default (``MethodEntry.eval_tower``: the EMA
teacher for ``dino``, the student for ``distill``, the image tower for ``clip``), or the one asked
for with ``medfoundry:teacher`` / ``medfoundry:student``.
Heads and the other tower are skipped with a reason.

LoRA runs store ``*.base_layer.weight`` plus ``*.lora_A.<adapter>.weight`` / ``*.lora_B.<adapter>.weight``;
they are merged here into plain weights, ``W + (alpha / r) * B @ A`` with ``alpha`` and ``r`` from the
checkpoint's ``adapt`` section, so any backbone (with or without LoRA) can load them.

An exported backbone (``medfoundry export --to safetensors``) is the plain ``Backbone.state_dict()``:
``vit.*`` and ``mask_token``.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

from medfoundry.models.backbone import Backbone
from medfoundry.models.convert import Converted, PretrainedLoadError

_LORA = re.compile(r"^(.*)\.lora_([AB])\.([^.]+)\.weight$")


def is_training_checkpoint(obj: Any) -> bool:
    """A medfoundry training checkpoint dict (``method`` state dict plus ``config``/``format``)."""
    return isinstance(obj, dict) and isinstance(obj.get("method"), dict) and ("config" in obj or "format" in obj)


def looks_like(sd: dict) -> bool:
    """A medfoundry ``Backbone.state_dict()``: keys under ``vit.`` (plus ``mask_token``)."""
    return any(k.startswith("vit.") for k in sd)


#: For checkpoints written before they recorded ``eval_tower``: the tower each built-in method evaluates.
LEGACY_EVAL_TOWER = {"dino": "teacher", "distill": "student", "clip": "image"}


def default_tower(obj: dict) -> str:
    """The tower whose backbone a run evaluates: the checkpoint's ``eval_tower`` record.

    The training loop writes it from the method's registry entry (``MethodEntry.eval_tower``: ``teacher``
    for ``dino``, ``student`` for ``distill``, ``image`` for ``clip``), the same backbone ``medfoundry eval``
    evaluates. Checkpoints written before that record (and ``best.pt`` files) fall back to
    :data:`LEGACY_EVAL_TOWER` by the method named in their config; models never import the method registry.
    """
    if obj.get("eval_tower"):
        return str(obj["eval_tower"])
    method = (obj.get("config") or {}).get("method", "dino")
    if method not in LEGACY_EVAL_TOWER:
        raise PretrainedLoadError(f"checkpoint of method {method!r} records no eval_tower; pass the tower "
                                  "explicitly (model.pretrained_format=medfoundry:<tower>)")
    return LEGACY_EVAL_TOWER[method]


def resolve_tower(obj: dict, which: str) -> str:
    """``auto`` -> :func:`default_tower`; otherwise the tower name, checked against the checkpoint."""
    tower = default_tower(obj) if which in ("auto", "", None) else which
    if not any(k.startswith(f"{tower}.backbone.") for k in obj["method"]):
        found = sorted({k.split(".")[0] for k in obj["method"] if ".backbone." in k})
        raise PretrainedLoadError(f"checkpoint has no '{tower}.backbone.*' weights; towers with a backbone: {found}")
    return tower


def lora_scaling(config: dict | None) -> float | None:
    """``alpha / r`` of a LoRA run from its resolved config, or None when the run used no LoRA."""
    adapt = (config or {}).get("adapt") or {}
    rank = int(adapt.get("lora_rank", 0) or 0)
    if rank <= 0:
        return None
    return float(adapt.get("lora_alpha", rank)) / rank


def merge_lora_weights(sd: dict[str, Tensor], scaling: float | None) -> tuple[dict[str, Tensor], list[str]]:
    """Fold LoRA adapters into plain weights: ``W = W_base + scaling * B @ A`` (peft's ``Linear`` layout).

    Returns the new state dict (``*.base_layer.*`` renamed to the plain names, adapters removed) and
    the names of the merged weights. Raises if adapters are present but ``scaling`` is unknown.
    """
    adapters: dict[str, dict[str, Tensor]] = {}
    plain: dict[str, Tensor] = {}
    for key, value in sd.items():
        match = _LORA.match(key)
        if match:
            adapters.setdefault(match.group(1), {})[match.group(2)] = value
        else:
            plain[key.replace(".base_layer.", ".")] = value
    if not adapters:
        return plain, []
    if scaling is None:
        raise PretrainedLoadError("the weights contain LoRA adapters but no LoRA rank/alpha to merge them with")
    merged = []
    for module, ab in adapters.items():
        key = f"{module}.weight"
        if key not in plain or "A" not in ab or "B" not in ab:
            raise PretrainedLoadError(f"incomplete LoRA adapter for '{module}'")
        base = plain[key]
        delta = (ab["B"].float() @ ab["A"].float()) * scaling
        plain[key] = (base.float() + delta).to(base.dtype)
        merged.append(key)
    return plain, merged


def convert(obj: dict, backbone: Backbone, which: str = "auto") -> Converted:
    """Map a medfoundry training checkpoint or exported backbone state dict onto ``backbone``."""
    out = Converted(pos_prefix=None)
    if is_training_checkpoint(obj):
        tower = resolve_tower(obj, which)
        out.notes.append(f"tower '{tower}' of a {obj.get('config', {}).get('method', '?')} checkpoint "
                         f"(step {obj.get('step', '?')})")
        prefix = f"{tower}.backbone."
        sd = {}
        for key, value in obj["method"].items():
            if key.startswith(prefix):
                sd[key[len(prefix):]] = value
            else:
                out.skip(key, "head, other tower or loss state")
        scaling = lora_scaling(obj.get("config"))
        name = (obj.get("config") or {}).get("model", {}).get("name")
        if name and tower == "teacher" and (obj.get("config") or {}).get("method") == "distill":
            name = obj["config"].get("distill", {}).get("teacher_name") or name
        if name and backbone.name and name != backbone.name:
            out.notes.append(f"checkpoint backbone '{name}' loaded into '{backbone.name}'")
    else:
        sd = dict(obj)
        scaling = None
    sd, merged = merge_lora_weights(sd, scaling)
    if merged:
        out.notes.append(f"LoRA merged into {len(merged)} weights (scaling alpha/r = {scaling:g})")
    for key, value in sd.items():
        if key == "mask_token" or key.startswith("vit."):
            out.put(key, key, value)
        else:
            out.put(key, f"vit.{key}", value)
    return out


def head_state(obj: dict, which: str = "auto", head: str = "dino_head") -> tuple[dict, dict[str, Tensor]]:
    """The config section and weights of a tower's head (e.g. the teacher DINO head for distillation).

    Returns ``(head_config_dict, state_dict)``; raises :class:`PretrainedLoadError` when absent.
    """
    if not is_training_checkpoint(obj):
        raise PretrainedLoadError(f"no '{head}' here: only medfoundry training checkpoints carry heads")
    tower = resolve_tower(obj, which)
    prefix = f"{tower}.{head}."
    sd = {k[len(prefix):]: v for k, v in obj["method"].items() if k.startswith(prefix)}
    if not sd:
        raise PretrainedLoadError(f"checkpoint has no '{prefix}*' weights")
    config = obj.get("config") or {}
    section = "ibot_head" if head == "ibot_head" else "head"
    return dict((config.get("dino") or {}).get(section) or {}), sd


def tower_model_config(obj: dict, which: str = "auto") -> dict:
    """The ``model`` section describing a tower's backbone (the teacher of a distillation run has its own)."""
    config = obj.get("config") or {}
    model = dict(config.get("model") or {})
    tower = resolve_tower(obj, which)
    if config.get("method") == "distill" and tower == "teacher":
        distill = config.get("distill") or {}
        img_size = distill.get("teacher_img_size") or model.get("img_size")
        model.update(name=distill.get("teacher_name"), img_size=img_size, pretrained=None, drop_path_rate=0.0)
    return model


__all__ = [
    "convert",
    "default_tower",
    "head_state",
    "is_training_checkpoint",
    "lora_scaling",
    "looks_like",
    "merge_lora_weights",
    "tower_model_config",
]
