"""The clip method: gradients reach every trainable parameter, logit-scale clamp, weight-decay groups, SGD,
freezing, LoRA, gradient checkpointing and SigLIP."""

from __future__ import annotations

import math

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.methods.clip.method import ClipMethod
from medfoundry.train.optim import build_optimizer, param_groups

BASE = ["method=clip", "model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "clip.embed_dim=16",
        "clip.text.width=64", "clip.text.heads=2", "clip.text.layers=2", "clip.text.context_length=48",
        "clip.preprocess.size=32", "clip.preprocess.normalize=custom", "clip.preprocess.mean=[0.5]",
        "clip.preprocess.std=[0.25]"]
TEXTS = ["no acute process", "left pleural effusion", "cardiomegaly", "right upper lobe pneumonia"]


def _method(*extra: str) -> tuple[ClipMethod, object]:
    cfg = load_config(None, BASE + list(extra))
    torch.manual_seed(0)
    return ClipMethod(cfg.model, cfg.clip, cfg.adapt), cfg


def _batch(method: ClipMethod, n: int = 4) -> dict:
    tokens = method.tokenizer(TEXTS[:n])
    g = torch.Generator().manual_seed(1)
    return {"images": torch.rand(n, 1, 32, 32, generator=g), "input_ids": tokens.input_ids,
            "attention_mask": tokens.attention_mask, "n_truncated": torch.tensor(0.0)}


def _grads(method: ClipMethod, batch: dict) -> tuple[torch.Tensor, dict]:
    method.zero_grad(set_to_none=True)
    out = method(batch, 0)
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}


def test_every_trainable_parameter_gets_a_gradient_and_scale_is_clamped():
    method, cfg = _method()
    assert math.isclose(float(method.logit_scale.detach().exp()), 1 / 0.07, rel_tol=1e-6)
    out = method(_batch(method), 0)
    assert set(out) >= {"loss", "logit_scale", "temperature", "batch_i2t_acc", "text_truncated_frac"}
    out["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # DDP (find_unused_parameters=False) needs this
    with torch.no_grad():
        method.logit_scale.fill_(math.log(500.0))
    method.after_optimizer_step(0)
    assert math.isclose(float(method.logit_scale.detach().exp()), 100.0, rel_tol=1e-5)


def test_logit_scale_and_1d_params_get_no_weight_decay_and_sgd_builds():
    method, cfg = _method("optim.name=sgd", "optim.momentum=0.9", "optim.lr=1e-4")
    groups = param_groups(method, cfg.optim)
    no_decay = {n for g in groups if g["wd_scale"] == 0.0 for n in g["names"]}
    decay = {n for g in groups if g["wd_scale"] == 1.0 for n in g["names"]}
    assert "logit_scale" in no_decay  # and every 1-D tensor (biases, norms), as open_clip's training excludes
    assert all(p.ndim >= 2 for n, p in method.named_parameters() if n in decay)
    assert "text.text_projection" in decay and "image.proj.net.weight" in decay
    opt = build_optimizer(method, cfg.optim)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    before = {n: p.detach().clone() for n, p in method.named_parameters()}
    _grads(method, _batch(method))
    opt.step()
    assert any(not torch.equal(before[n], p) for n, p in method.named_parameters())


def test_freezing_either_tower_keeps_projections_trainable():
    method, _ = _method("clip.image.freeze=true", "clip.text.freeze=true")
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"image.proj.net.weight", "text.text_projection", "logit_scale"}
    method.train()
    assert not method.image.backbone.training and not method.text.training
    _grads(method, _batch(method))


def test_text_lora_and_image_lora_from_the_adapt_section():
    method, _ = _method("clip.text.lora_rank=4", "adapt.lora_rank=4", "adapt.lora_targets=[qkv,fc1]")
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    assert any(n.startswith("text.") and "lora_" in n for n in trainable)
    assert any(n.startswith("image.backbone.") and "lora_" in n for n in trainable)
    assert not any(("lora_" not in n) and (n.startswith("image.backbone.") or n.startswith("text.transformer"))
                   for n in trainable)
    _, grads = _grads(method, _batch(method))
    assert all(n in grads for n in trainable)


def test_gradient_checkpointing_changes_nothing_but_memory():
    plain, _ = _method()
    ckpt, _ = _method("model.grad_checkpointing=true", "clip.text.grad_checkpointing=true")
    ckpt.load_state_dict(plain.state_dict())
    plain.train(), ckpt.train()
    batch = _batch(plain)
    loss_a, grads_a = _grads(plain, batch)
    loss_b, grads_b = _grads(ckpt, batch)
    assert ckpt.text.transformer.grad_checkpointing and ckpt.image.backbone.vit.grad_checkpointing
    torch.testing.assert_close(loss_a, loss_b)
    for n in grads_a:
        torch.testing.assert_close(grads_a[n], grads_b[n], rtol=1e-5, atol=1e-6)


HEADS = ["clip.image.pool=avg", "clip.image.proj=mlp", "clip.image.proj_hidden_dim=32", "clip.text.proj=mlp",
         "clip.text.proj_hidden_dim=32"]


@pytest.mark.parametrize("extra", [["clip.loss.kind=siglip"], HEADS])
def test_siglip_and_alternative_heads(extra):
    method, _ = _method(*extra)
    loss, grads = _grads(method, _batch(method))
    assert torch.isfinite(loss)
    if "clip.loss.kind=siglip" in extra:
        assert math.isclose(float(method.logit_scale.detach().exp()), 10.0, rel_tol=1e-6) and "logit_bias" in grads
    emb = method.encode_texts(TEXTS)
    assert emb.shape == (4, 16) and torch.allclose(emb.norm(dim=1), torch.ones(4), atol=1e-5)


def test_pretrained_weights_of_both_towers_load_from_local_files(tmp_path):
    """CheXzero-style text weights (OpenAI layout, stretched to 128 positions) and timm-format image weights."""
    from openai_clip_testutil import random_openai_state_dict

    from medfoundry.models.registry import create_backbone
    from medfoundry.models.text.clip_text import stretch_positional_embedding

    sd = random_openai_state_dict(width=64, layers=2, embed=16)
    torch.save(sd, tmp_path / "chexzero.pt")
    cfg = load_config(None, BASE)
    torch.manual_seed(5)
    donor = create_backbone(cfg.model)
    torch.save(donor.vit.state_dict(), tmp_path / "vit.pth")
    method, _ = _method(f"clip.text.pretrained={tmp_path / 'chexzero.pt'}", "clip.text.heads=1",
                        "clip.text.context_length=128", f"model.pretrained={tmp_path / 'vit.pth'}",
                        "model.pretrained_format=timm")
    torch.testing.assert_close(method.text.transformer.resblocks[1].mlp.c_fc.weight,
                               sd["transformer.resblocks.1.mlp.c_fc.weight"])
    torch.testing.assert_close(method.text.positional_embedding.detach(),
                               stretch_positional_embedding(sd["positional_embedding"], 128, 20))
    torch.testing.assert_close(method.image.backbone.vit.blocks[0].attn.qkv.weight, donor.vit.blocks[0].attn.qkv.weight)


def test_inconsistent_clip_settings_are_config_errors():
    from medfoundry.config import ConfigError

    for bad in (["clip.preprocess.crop_scale=[0.5,2]"], ["clip.text.context_length=10", "clip.text.keep_positions=20"],
                ["clip.text.kind=hf"], ["clip.loss.temperature=0"]):
        with pytest.raises(ConfigError, match="clip\\."):
            _method(*bad)
