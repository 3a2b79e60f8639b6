"""Contract tests over every registered backbone: one feature interface for all."""

from __future__ import annotations

import pytest
import torch

from medfoundry.config import ModelConfig
from medfoundry.models import create_backbone, get_spec, list_backbones

ALL = [s.name for s in list_backbones()]
SMALL = [s.name for s in list_backbones() if s.cpu_friendly]


@pytest.mark.parametrize("name", ALL)
def test_shapes_for_global_and_local_sizes(name: str) -> None:
    """Every backbone (large ones on the meta device) gives cls/reg/patch tokens for two input sizes."""
    small = get_spec(name).cpu_friendly
    device = "cpu" if small else "meta"
    with torch.device(device):
        bb = create_backbone(ModelConfig(name=name, img_size=64 if small else 224, in_chans=1))
        p = bb.patch_size
        for side in (4 * p, 2 * p):
            x = torch.randn(2, 1, side, side)
            out = bb.forward_features(x)
            n = (side // p) ** 2
            assert out.cls.shape == (2, bb.embed_dim)
            assert out.patch.shape == (2, n, bb.embed_dim)
            assert out.reg.shape == (2, bb.num_reg_tokens, bb.embed_dim)
            assert out.grid == (side // p, side // p)
    assert bb.uses_rope == (get_spec(name).family == "dinov3")


@pytest.mark.parametrize("name", SMALL)
def test_masking_replaces_only_masked_inputs(name: str) -> None:
    torch.manual_seed(0)
    bb = create_backbone(ModelConfig(name=name, img_size=32)).eval()
    with torch.no_grad():
        bb.mask_token.normal_()
    x = torch.randn(2, 3, 32, 32)
    n = (32 // bb.patch_size) ** 2
    none = torch.zeros(2, n, dtype=torch.bool)
    some = none.clone()
    some[0, :3] = True
    with torch.no_grad():
        a = bb.forward_features(x, none)
        b = bb.forward_features(x, some)
        plain = bb.forward_features(x)
    torch.testing.assert_close(a.patch, plain.patch)
    assert not torch.allclose(a.patch[0], b.patch[0])
    torch.testing.assert_close(a.patch[1], b.patch[1])


@pytest.mark.parametrize("name", SMALL)
def test_last_attention_is_a_distribution(name: str) -> None:
    bb = create_backbone(ModelConfig(name=name, img_size=32)).eval()
    attn, grid = bb.last_attention(torch.randn(1, 3, 32, 32))
    tokens = 1 + bb.num_reg_tokens + grid[0] * grid[1]
    assert attn.shape[-2:] == (tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:-1]))


@pytest.mark.parametrize("name", SMALL)
def test_gradients_flow_and_checkpointing_matches(name: str) -> None:
    torch.manual_seed(0)
    bb = create_backbone(ModelConfig(name=name, img_size=32))
    x = torch.randn(2, 3, 32, 32)
    bb.forward_features(x).cls.sum().backward()
    g1 = bb.vit.patch_embed.proj.weight.grad.clone()
    bb.zero_grad()
    bb.set_grad_checkpointing(True)
    bb.forward_features(x).cls.sum().backward()
    torch.testing.assert_close(bb.vit.patch_embed.proj.weight.grad, g1)


def test_unknown_name_lists_close_names() -> None:
    with pytest.raises(KeyError, match="vit_small_patch14_dinov2"):
        create_backbone(ModelConfig(name="vit_smal_patch14_dinov2"))


def test_bad_input_size_is_explained() -> None:
    bb = create_backbone(ModelConfig(name="vit_tiny_patch8", img_size=32))
    with pytest.raises(ValueError, match="multiple of the patch size"):
        bb.forward_features(torch.randn(1, 3, 30, 30))
