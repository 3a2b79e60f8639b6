"""The model card (``README.md``) written into every export folder.

It says what a user needs to use the weights correctly without opening the run: the method and its resolved
recipe (key hyperparameters in a table, the whole config in a folded YAML block), the input preprocessing
(intensity mapping, HU windows / value range, slices, channels, resize, mean/std; the same record as
``medfoundry_preprocessing.json``), where the training data was (a path: no data is copied), the run's
evaluation results when it has any (``best.json``, ``eval/history.jsonl``, ``eval/comparison.json``) and the
exact Python lines that load the export with transformers, timm or medfoundry.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from medfoundry.models.preprocessing import PREPROCESSING_FILE, Preprocessing

CARD_FILE = "README.md"
#: Common config keys shown in the recipe table (a method's own section adds its top-level scalars).
_RECIPE_KEYS = ("method", "model.name", "model.img_size", "model.in_chans", "model.pretrained", "train.steps",
                "train.batch_size", "train.seed", "train.precision", "optim.lr", "optim.min_lr", "optim.weight_decay",
                "optim.warmup_steps", "crops.n_global", "crops.global_size", "crops.global_scale", "crops.n_local",
                "crops.local_size", "crops.local_scale", "adapt.lora_rank", "adapt.freeze_blocks")
_COMMON_SECTIONS = {"output_dir", "method", "model", "optim", "train", "dist", "adapt", "data", "crops", "eval"}
_DATA_PATH_KEYS = ("root", "manifest", "image_root", "demo_dir", "hdf5_reports")


@dataclass
class Provenance:
    """Where exported weights come from: the run's method, step, tower, checkpoint, resolved config and results."""

    method: str = ""
    step: int | None = None
    tower: str = ""  # the exported tower of a training checkpoint (teacher, student, image)
    source: str = ""  # the checkpoint or weights file read
    run_config: dict | None = None  # the resolved run config (to_dict form), None outside a run
    metrics: dict = field(default_factory=dict)  # read_run_metrics() of the run folder

    def record(self) -> dict:
        """The scalar fields, for the export's JSON records (the config and metrics go to their own files)."""
        return {"method": self.method or None, "step": self.step, "tower": self.tower or None,
                "source": self.source or None}


@dataclass
class ModelCard:
    """Everything the card shows; ``export_backbone`` fills the architecture and the check result."""

    backbone: str
    format: str  # hf | timm | safetensors
    out_dir: Path
    preprocessing: Preprocessing
    architecture: dict = field(default_factory=dict)  # patch_size, embed_dim, depth, num_heads, registers, ...
    provenance: Provenance = field(default_factory=Provenance)
    max_abs_diff: float | None = None


def read_run_metrics(run_dir: str | Path | None) -> dict:
    """The evaluation results a run folder holds: ``best`` (best.json), ``last_eval`` (the last line of
    eval/history.jsonl) and ``comparison`` (eval/comparison.json), each only when present."""
    if run_dir is None or not Path(run_dir).is_dir():
        return {}
    run_dir, out = Path(run_dir), {}
    for key, rel in (("best", "best.json"), ("comparison", "eval/comparison.json")):
        with contextlib.suppress(OSError, ValueError):
            out[key] = json.loads((run_dir / rel).read_text())
    history = run_dir / "eval" / "history.jsonl"
    if history.is_file():
        lines = [line for line in history.read_text().splitlines() if line.strip()]
        with contextlib.suppress(ValueError):
            out["last_eval"] = json.loads(lines[-1]) if lines else None
    return {k: v for k, v in out.items() if v}


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "—" if value in (None, "") else str(value)


def _front_matter(card: ModelCard) -> str:
    library = {"hf": "transformers", "timm": "timm"}.get(card.format, "medfoundry")
    method = card.provenance.method
    tags = ["medfoundry", "vision", "medical-imaging", "self-supervised"] + ([method] if method else [])
    meta = {"library_name": library, "pipeline_tag": "image-feature-extraction", "tags": tags}
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def _model_section(card: ModelCard) -> list[str]:
    a, pv = card.architecture, card.provenance
    rows = [("backbone", f"`{card.backbone}`"), ("layout", a.get("layout", "")),
            ("patch size / width / depth / heads", f"{a.get('patch_size')} / {a.get('embed_dim')} / {a.get('depth')} "
                                                   f"/ {a.get('num_heads')}"),
            ("register tokens", a.get("registers", 0)), ("native input", f"{a.get('img_size')} px, "
                                                                        f"{a.get('in_chans')} channel(s)"),
            ("exported tower", pv.tower or "—"), ("trained by", f"medfoundry `{pv.method}`" if pv.method else "—"),
            ("step", pv.step), ("source", f"`{pv.source}`" if pv.source else "—"),
            ("export check", "not run" if card.max_abs_diff is None
             else f"max abs difference to medfoundry's features {card.max_abs_diff:.2e}")]
    lines = ["## Model", "", "| | |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in rows]
    return lines + ["", "Outputs are `[class, registers..., patches]` tokens after the final norm, as medfoundry's "
                        "`Backbone.forward_features`; the class token is the feature medfoundry evaluates (`cls`).", ""]


def _recipe_section(run_config: dict | None) -> list[str]:
    if not run_config:
        return ["## Training recipe", "", "Not exported from a medfoundry run: no recipe recorded.", ""]
    flat = _flat(run_config)
    keys = [k for k in _RECIPE_KEYS if k in flat]
    for section, value in run_config.items():  # the method's own sections: their top-level scalars
        if section not in _COMMON_SECTIONS and isinstance(value, dict):
            keys += [f"{section}.{k}" for k, v in value.items() if not isinstance(v, dict)]
    lines = ["## Training recipe", "", "| key | value |", "|---|---|"]
    lines += [f"| `{k}` | {_fmt(flat[k])} |" for k in keys]
    text = yaml.safe_dump(run_config, sort_keys=False).rstrip()
    return lines + ["", "<details><summary>Resolved run config (config.yaml)</summary>", "", "```yaml", text, "```",
                    "", "</details>", ""]


def _intensity_lines(p: Preprocessing) -> list[str]:
    if p.intensity == "range":
        low, high = p.value_range
        return [f"`data.intensity: range`: `x = clip((value - {low:g}) / ({high:g} - {low:g}), 0, 1)` "
                f"(`data.value_range: [{low:g}, {high:g}]`)."]
    if p.intensity == "window":
        specs = ", ".join(f"`{s}` (centre {c:g}, width {w:g} HU)" for s, c, w in p.window_specs())
        return [f"`data.intensity: window`: each HU window gives one group of channels, window-major, "
                f"`clip((HU - (centre - width / 2)) / width, 0, 1)`: {specs}."]
    return ["`data.intensity: identity`: images are used as read, already in [0, 1] (8-bit pictures / 255; "
            "16-bit files only through the value mapping recorded with them, e.g. the full-range one, / 65535, or "
            "`data.unmapped_16bit: full_range`)."]


def _preprocessing_section(p: Preprocessing) -> list[str]:
    steps = ["Read the image in source units (8-bit pictures scaled to [0, 1], 16-bit files by their recorded value "
             "mapping, CT in Hounsfield units)."]
    if p.slices > 1:
        steps.append(f"2.5D: stack {p.slices} neighbouring slices (stride {p.slice_stride}) as channels, "
                     "the sampled slice in the middle.")
    steps += _intensity_lines(p)
    steps += [f"Match to {p.channels} channel(s): a single channel is repeated, RGB averaged to one.",
              f"Resize the shorter side to {p.img_size} px ({p.interpolation}, antialiased) and centre-crop "
              f"{p.img_size}x{p.img_size}.",
              f"Normalise per channel: `(x - mean) / std` with mean `{[round(v, 6) for v in p.mean]}`, "
              f"std `{[round(v, 6) for v in p.std]}`."]
    lines = ["## Input preprocessing (reproduce it to feed the model correctly)", ""]
    lines += [f"{i}. {s}" for i, s in enumerate(steps, 1)]
    code = _intensity_code(p)
    if code:
        lines += ["", "The intensity mapping in NumPy (`image`: `(slices, H, W)` in source units):", "", "```python",
                  *code, "```"]
    return lines + ["", f"The same settings, machine-readable: `{PREPROCESSING_FILE}` (medfoundry reloads them). "
                        "medfoundry rounds the resized long side of a non-square image where transformers and timm "
                        "truncate it, so such images can differ by one pixel column after resizing.", ""]


def _intensity_code(p: Preprocessing) -> list[str]:
    if p.intensity == "range":
        low, high = p.value_range
        return ["import numpy as np", "", f"unit = np.clip((image - {low!r}) / ({high!r} - {low!r}), 0, 1)"]
    if p.intensity == "window":
        windows = [(c, w) for _, c, w in p.window_specs()]
        return ["import numpy as np", "", f"windows = {windows!r}  # (centre, width) in HU",
                "unit = np.concatenate([np.clip((image - (c - w / 2)) / w, 0, 1) for c, w in windows])"]
    return []


def _data_section(run_config: dict | None) -> list[str]:
    flat = _flat(run_config or {})
    paths = [(k, v) for k, v in flat.items() if isinstance(v, str) and v
             and (k.startswith("data.") or ".data." in f".{k}") and k.rsplit(".", 1)[-1] in _DATA_PATH_KEYS]
    kind = flat.get("data.kind")
    lines = ["## Training data", ""]
    if not paths:
        return lines + ["No training data path recorded.", ""]
    lines += [f"- `{k}`: `{v}`" for k, v in paths]
    if kind:
        lines.append(f"- `data.kind`: `{kind}`")
    return lines + ["", "Paths on the machine that trained the model; no data is included in this folder.", ""]


def _metric_rows(values: dict) -> list[str]:
    return [f"| `{k}` | {_fmt(v)} |" for k, v in values.items() if isinstance(v, (int, float)) and k != "seconds"]


def _metrics_section(metrics: dict) -> list[str]:
    lines = ["## Evaluation", ""]
    if not metrics:
        return lines + ["The run recorded no evaluation results.", ""]
    best = metrics.get("best")
    if best:
        lines += [f"Best checkpoint: `{best.get('metric')}` = {_fmt(best.get('value'))} at step {best.get('step')}.",
                  "", "| metric | value |", "|---|---|", *_metric_rows(best.get("eval") or {}), ""]
    last = metrics.get("last_eval")
    if last:
        lines += [f"Last in-training evaluation (step {last.get('step')}):", "", "| metric | value |", "|---|---|",
                  *_metric_rows({k: v for k, v in last.items() if k != "step"}), ""]
    for label, block in ((metrics.get("comparison") or {}).get("labels") or {}).items():
        pre, rand = block.get("pretrained") or {}, block.get("random_init") or {}
        lines += [f"`medfoundry eval --compare-random` on `{block.get('data', '?')}` (label `{label}`):", "",
                  "| metric | pretrained | random init |", "|---|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} | {_fmt(rand.get(k))} |" for k, v in pre.items() if isinstance(v, (int, float))]
        lines.append("")
    return lines


def load_snippets(card: ModelCard) -> dict[str, str]:
    """The Python lines that load this export, by library (``transformers``/``timm`` for their formats,
    ``medfoundry`` always)."""
    d, p, reg = str(card.out_dir), card.preprocessing, int(card.architecture.get("registers", 0))
    picture = p.intensity == "identity"
    out = {}
    if card.format == "hf":
        feed = ('image = Image.open("scan.png")  # an 8-bit picture' + (" (grey, mode 'L')" if p.channels == 1 else "")
                + "\ninputs = processor(images=image, return_tensors=\"pt\")") if picture else (
            "# unit: (C, H, W) float32 in [0, 1] after the intensity mapping above (do_rescale is off)\n"
            "inputs = processor(images=unit, input_data_format=\"channels_first\", return_tensors=\"pt\")")
        out["transformers"] = "\n".join([
            *(["from PIL import Image"] if picture else []), "import torch",
            "from transformers import AutoImageProcessor, AutoModel", "",
            f"processor = AutoImageProcessor.from_pretrained({d!r})",
            f"model = AutoModel.from_pretrained({d!r}).eval()", feed, "with torch.no_grad():",
            "    tokens = model(**inputs).last_hidden_state", "cls = tokens[:, 0]  # medfoundry's 'cls' feature",
            f"mean_patch = tokens[:, {1 + reg}:].mean(1)  # medfoundry's 'mean_patch' feature"])
    if card.format == "timm":
        out["timm"] = "\n".join([
            "import timm", "import torch", *(["from PIL import Image"] if picture else []), "",
            f"model = timm.create_model('local-dir:{d}', pretrained=True).eval()",
            "transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))",
            ('x = transform(Image.open("scan.png"))[None]  # an 8-bit picture' if picture
             else "# map intensities first (above); timm's transform takes pictures, so resize and normalise "
                  "yourself\n# or use medfoundry's transform below"),
            *(["with torch.no_grad():", "    cls = model.forward_features(x)[:, 0]"] if picture else [])])
    out["medfoundry"] = "\n".join([
        "from medfoundry.eval.eval_images import eval_transform_from_config",
        "from medfoundry.methods.checkpoint_backbone import load_backbone", "",
        f"loaded = load_backbone({d!r})",
        "transform = eval_transform_from_config(loaded.sections)  # intensity mapping, resize, crop, normalisation",
        "x = transform(image)  # image: (C, H, W) float32 tensor in source units ([0, 1] pictures, HU for CT)",
        "cls = loaded.backbone.forward_features(x[None]).cls"])
    return out


def render_model_card(card: ModelCard) -> str:
    """The card's Markdown text (see the module docstring)."""
    pv = card.provenance
    title = f"# {card.backbone}" + (f": medfoundry `{pv.method}`" if pv.method else "") + (
        f", step {pv.step}" if pv.step is not None else "")
    lines = [_front_matter(card), title, "",
             f"A ViT backbone exported by `medfoundry export --to {card.format}` for frozen features or fine-tuning.",
             ""]
    lines += _model_section(card) + _recipe_section(pv.run_config) + _preprocessing_section(card.preprocessing)
    lines += _data_section(pv.run_config) + _metrics_section(pv.metrics) + ["## How to load", ""]
    for library, code in load_snippets(card).items():
        lines += [f"{library}:", "", "```python", code, "```", ""]
    lines += [f"Evaluate it: `medfoundry eval {card.out_dir} --task knn --data LABELLED_SET`; start a run from it: "
              f"`model.pretrained: {card.out_dir}`.", ""]
    return "\n".join(lines)


def write_model_card(card: ModelCard) -> Path:
    """Write ``card.out_dir/README.md``; returns its path."""
    path = Path(card.out_dir) / CARD_FILE
    path.write_text(render_model_card(card))
    return path


__all__ = ["CARD_FILE", "ModelCard", "Provenance", "load_snippets", "read_run_metrics", "render_model_card",
           "write_model_card"]
