"""The HuggingFace ``preprocessor_config.json`` of an HF export: ``AutoImageProcessor.from_pretrained(DIR)``.

The processor is transformers' ``DINOv3ViTImageProcessor`` (written as its legacy name
``DINOv3ViTImageProcessorFast``, which transformers 4.56+ and 5.x both load), chosen because it works in
medfoundry's evaluation order: rescale to [0, 1] *first*, then resize the float image (shorter side,
bilinear, antialiased), centre crop, normalise. So the processor's ``pixel_values`` equal medfoundry's
evaluation transform (:class:`medfoundry.eval.eval_images.EvalTransform`) to float rounding, not only to
8-bit quantisation. What it cannot do is the intensity mapping of ``range`` / ``window`` runs (HU windows,
value ranges): for those ``do_rescale`` is off and the processor takes images already mapped to [0, 1]
(the model card shows the mapping).
"""

from __future__ import annotations

import json
from pathlib import Path

from medfoundry.models.preprocessing import Preprocessing

HF_PROCESSOR_FILE = "preprocessor_config.json"
HF_PROCESSOR_TYPE = "DINOv3ViTImageProcessorFast"
_PIL_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # PIL.Image.Resampling values, as transformers stores them


def hf_preprocessor_config(prep: Preprocessing) -> dict:
    """The ``preprocessor_config.json`` contents that reproduce ``prep`` after its intensity mapping.

    ``do_rescale`` (by 1/255) is on only for ``intensity: identity`` runs, whose inputs are 8-bit pictures;
    ``do_convert_rgb`` only for 3-channel models (a grey picture is then repeated, as medfoundry does).
    """
    size = int(prep.img_size)
    return {
        "image_processor_type": HF_PROCESSOR_TYPE,
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": _PIL_RESAMPLE.get(prep.interpolation, 2),
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": prep.intensity == "identity",
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [float(v) for v in prep.mean],
        "image_std": [float(v) for v in prep.std],
        "do_convert_rgb": prep.channels == 3,
    }


def write_preprocessor_config(out_dir: str | Path, prep: Preprocessing) -> Path:
    """Write ``out_dir/preprocessor_config.json`` from ``prep``; returns its path."""
    path = Path(out_dir) / HF_PROCESSOR_FILE
    path.write_text(json.dumps(hf_preprocessor_config(prep), indent=2))
    return path


__all__ = ["HF_PROCESSOR_FILE", "hf_preprocessor_config", "write_preprocessor_config"]
