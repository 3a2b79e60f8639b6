"""CLIP text tower: OpenAI state-dict loading (parity with open_clip), Long-CLIP stretching, long reports, tokenizer."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
from openai_clip_testutil import random_openai_state_dict

from medfoundry.models.text.clip_text import ClipTextTower, clip_text_state_dict, stretch_positional_embedding
from medfoundry.models.text.tokenize import ClipBPETokenizer, ReportTruncationWarning, check_truncation

SHORT = ["no acute cardiopulmonary process.", "small left pleural effusion", "heart size is normal"]


def test_openai_state_dict_gives_open_clip_text_embeddings():
    from open_clip.model import build_model_from_openai_state_dict

    sd = random_openai_state_dict()
    ours = ClipTextTower.from_openai_state_dict(sd).eval()
    ref = build_model_from_openai_state_dict(copy.deepcopy(sd), quick_gelu=True, cast_dtype=torch.float32).float()
    ref.eval()
    texts = SHORT + ["the lungs are clear bilaterally without focal consolidation, effusion or pneumothorax. " * 3]
    tok = ClipBPETokenizer(77)
    batch = tok(texts)  # padded to the longest text only
    full = torch.zeros(len(texts), 77, dtype=torch.long)
    full[:, : batch.input_ids.shape[1]] = batch.input_ids
    import open_clip

    torch.testing.assert_close(full, open_clip.tokenize(texts, context_length=77))  # same ids as open_clip
    with torch.no_grad():
        a = ours(batch.input_ids, batch.attention_mask)
        b = ref.encode_text(full)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_state_dict_prefixes_and_mismatch_errors():
    sd = random_openai_state_dict()
    wrapped = {f"module.{k}": v for k, v in sd.items()}
    assert set(clip_text_state_dict(wrapped)) == set(clip_text_state_dict(sd))
    assert not any(k.startswith("visual") or k == "logit_scale" for k in clip_text_state_dict(sd))
    tower = ClipTextTower(77, 49408, width=128, heads=2, layers=2, output_dim=32)
    with pytest.raises(ValueError, match="has shape"):
        tower.load_openai_state_dict(sd)


def _long_clip_reference(pe: torch.Tensor, keep: int = 20) -> torch.Tensor:
    """Long-CLIP's table for 4x stretching, written from its description (positions kept, 1/4 steps, extrapolation)."""
    n, d = pe.shape
    out = torch.zeros(4 * n - 3 * keep, d, dtype=pe.dtype)
    out[:keep] = pe[:keep]
    for i in range(n - 1 - keep):
        for q in range(4):
            out[4 * i + keep + q] = (4 - q) / 4 * pe[i + keep] + q / 4 * pe[i + 1 + keep]
    last, prev = pe[n - 1], pe[n - 2]
    for q in range(4):
        out[4 * n - 3 * keep - 4 + q] = last + q / 4 * (last - prev)
    return out


def test_stretch_reproduces_long_clip_248_and_keeps_first_20():
    pe = torch.randn(77, 16, dtype=torch.float64)
    torch.testing.assert_close(stretch_positional_embedding(pe, 248, 20), _long_clip_reference(pe))
    s512 = stretch_positional_embedding(pe, 512, 20)
    assert s512.shape == (512, 16)
    torch.testing.assert_close(s512[:20], pe[:20])
    coord = 20 + 491 * 57 / 492  # the last new position sits past old position 76: linear extrapolation
    frac = coord - 75
    torch.testing.assert_close(s512[-1], pe[75] * (1 - frac) + pe[76] * frac)
    assert torch.isfinite(s512).all()


def test_stretched_tower_keeps_short_texts_and_changes_longer_ones():
    torch.manual_seed(0)
    tower = ClipTextTower(77, 49408, width=64, heads=1, layers=2, output_dim=32).eval()
    long = copy.deepcopy(tower)
    long.resize_context(512, keep=20)
    assert long.positional_embedding.shape == (512, 64)
    tok = ClipBPETokenizer(512)
    short = tok(SHORT)
    assert max(short.lengths) <= 20  # SOT + words + EOT within the kept positions 0..19
    text_30 = ("the cardiomediastinal silhouette is within normal limits and the lungs are clear without focal "
               "consolidation, effusion or pneumothorax")
    longer = tok([text_30])
    assert 21 < longer.lengths[0] <= 77  # EOT (the read-out position) lies past the kept positions
    with torch.no_grad():
        torch.testing.assert_close(long(short.input_ids), tower(short.input_ids), rtol=0, atol=0)
        diff = (long(longer.input_ids) - tower(longer.input_ids)).abs().max()
    assert diff > 1e-4  # positions past the 20th were interpolated, so longer texts do change


def _report_of_tokens(tok: ClipBPETokenizer, n_tokens: int) -> str:
    """A real report text (IU chest X-ray reports when torchxrayvision is installed) cut to ``n_tokens`` BPE tokens."""
    if importlib.util.find_spec("torchxrayvision") is not None:
        from medfoundry.data.reports import load_iu_reports

        text = " ".join(f"{r['findings']} {r['impression']}" for r in load_iu_reports(12, seed=3))
    else:  # pragma: no cover - the text package is part of the dev set-up
        text = " ".join(SHORT * 60)
    words = text.split()
    lo, hi = 1, len(words)
    while lo < hi:  # largest word prefix with at most n_tokens tokens
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid]))) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def test_400_token_report_is_encoded_without_truncation():
    tok = ClipBPETokenizer(512)
    report = _report_of_tokens(tok, 400)
    batch = tok([report, SHORT[0]])
    assert 390 <= batch.lengths[0] <= 400 and batch.n_truncated == 0
    assert batch.input_ids.shape[1] == batch.lengths[0]  # padded to the longest text, not to 512
    assert batch.input_ids[0, batch.lengths[0] - 1] == tok.eot_id
    torch.manual_seed(1)
    tower = ClipTextTower(77, 49408, width=64, heads=1, layers=1, output_dim=32).eval()
    tower.resize_context(512)
    ids = batch.input_ids[:1]
    changed = ids.clone()
    changed[0, batch.lengths[0] - 5] = 1000  # a word near the end of the report
    with torch.no_grad():
        a, b = tower(ids), tower(changed)
    assert a.shape == (1, 32) and (a - b).abs().max() > 1e-5  # the end of the report reaches the embedding
    with pytest.raises(ValueError, match="context length"):  # an unstretched tower refuses 400 tokens
        ClipTextTower(77, 49408, width=64, heads=1, layers=1, output_dim=32)(ids)


def test_truncation_counts_and_warning():
    tok = ClipBPETokenizer(12)
    texts = [SHORT[0], "the lungs are clear without focal consolidation pleural effusion or pneumothorax", SHORT[2],
             "mild cardiomegaly with small bilateral pleural effusions and bibasilar atelectasis"]
    batch = tok(texts)
    assert batch.n_truncated == 2 and batch.input_ids.shape[1] == 12
    assert (batch.input_ids.argmax(dim=1) == torch.tensor([batch.lengths[0] - 1, 11, batch.lengths[2] - 1, 11])).all()
    with pytest.warns(ReportTruncationWarning, match=r"2 of 4 reports \(50.0%"):
        stats = check_truncation(tok, texts, limit=100)
    assert stats == {"checked": 4, "truncated": 2, "longest": max(batch.lengths)}
