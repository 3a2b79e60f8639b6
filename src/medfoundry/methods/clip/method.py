"""The ``clip`` method: contrastive image-report training with an image tower and a text tower.

Radford et al. 2021 (CLIP) train two encoders so that matching image-text pairs have the highest
cosine similarity in the batch; CheXzero (Tiu et al., Nature BME 2022) applied it to chest X-rays and
their reports, and medical variants swap the text tower for a BERT model (ConVIRT, Zhang et al. 2022;
BiomedCLIP, Zhang et al. 2023). Here:

* image tower: any registered :class:`~medfoundry.models.backbone.Backbone` (``model`` section),
  class-token or mean patch-token pooling, then a linear or MLP projection;
* text tower: the OpenAI/CheXzero CLIP text transformer (Long-CLIP stretchable positions) or an HF
  BERT-family model from a local folder (:mod:`medfoundry.models.text`);
* loss: symmetric InfoNCE or SigLIP (:mod:`medfoundry.losses.clip`) with the learnable ``logit_scale``
  initialised at ``log(1 / temperature)`` and clamped to ``log(max_logit_scale)`` after every step;
* pixel normalisation happens inside the method (``pixel_mean`` / ``pixel_std`` buffers), so a
  checkpoint carries the statistics its image tower was trained with.

State-dict layout: ``image.backbone.*`` (Backbone keys), ``image.proj.*``, ``text.*`` (OpenAI text
keys for the CLIP tower, ``text.model.*`` + ``text.proj.*`` for HF), ``logit_scale``,
``logit_bias`` (SigLIP), ``pixel_mean``, ``pixel_std``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfoundry.config.adapt import AdaptConfig
from medfoundry.config.clip import ClipImageConfig
from medfoundry.config.schema import ModelConfig
from medfoundry.losses.clip import ClipInfoNCELoss, SigLIPLoss
from medfoundry.methods.base import Method
from medfoundry.methods.clip.config import ClipConfig, check_clip_config
from medfoundry.models.backbone import Backbone
from medfoundry.models.projection import ProjectionHead


class ImageTower(nn.Module):
    """Backbone -> pooled tokens (class token or mean of patch tokens) -> projection."""

    def __init__(self, backbone: Backbone, embed_dim: int, cfg: ClipImageConfig) -> None:
        super().__init__()
        self.backbone = backbone
        self.pool = cfg.pool
        self.proj = ProjectionHead(backbone.embed_dim, embed_dim, cfg.proj, cfg.proj_hidden_dim, cfg.proj_bias)

    def pooled(self, x: Tensor) -> Tensor:
        """(B, D) pooled backbone features (before projection)."""
        out = self.backbone.forward_features(x)
        return out.cls if self.pool == "token" else out.patch.mean(dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) normalised images -> (B, embed_dim) features."""
        return self.proj(self.pooled(x))


def apply_text_lora(module: nn.Module, rank: int, alpha: float, targets: Sequence[str],
                    keep_trainable: Sequence[str] = ("text_projection",)) -> list[str]:
    """Inject LoRA (Hu et al., ICLR 2022; via ``peft``) into the linear layers of ``module`` named ``*targets``.

    For text trunks (``transformer.resblocks.N.mlp.c_fc``, BERT's ``encoder.layer.N...query``); image
    backbones use :func:`medfoundry.models.lora.adapt_backbone` (the ``adapt`` section).

    Everything else in ``module`` is frozen except parameters named in ``keep_trainable`` (the CLIP
    tower's own ``text_projection``); the low-rank adapters train. Returns the adapted module names.
    Raises when no module matches.
    """
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"LoRA targets {list(targets)} match no linear layer of {type(module).__name__}")
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=0.0), module)
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n or n in keep_trainable)
    return names


def init_eval_backbone(model: ModelConfig, adapt: AdaptConfig, frozen: bool = False) -> Backbone:
    """The image tower's backbone as :class:`ClipMethod` initialises it, without projection or text tower.

    The image backbone is the first thing the method draws from the RNG, so under the run's seed this
    is bit-identical to the run's step-0 image backbone; no pretrained image or text weights are read
    (:mod:`medfoundry.methods.checkpoint_backbone`).
    """
    from medfoundry.models.lora import adapt_backbone
    from medfoundry.models.registry import create_backbone

    backbone = create_backbone(model)
    if not frozen:  # clip.image.freeze: the tower is not adapted
        adapt_backbone(backbone, adapt, verbose=False)
    return backbone


class ClipMethod(Method):
    """Image tower + text tower + contrastive loss with a learnable logit scale.

    Args:
        model: the image backbone (``model``).
        clip: everything else (``clip``: towers, loss, preprocessing).
        adapt: LoRA / freezing of the image backbone (``adapt``; unused when ``clip.image.freeze``).
        load_pretrained: read ``model.pretrained`` / ``clip.text.pretrained`` weights (off when a
            medfoundry checkpoint is loaded over the method, e.g. for evaluation).
    """

    def __init__(self, model: ModelConfig, clip: ClipConfig, adapt: AdaptConfig | None = None,
                 load_pretrained: bool = True) -> None:
        super().__init__()
        from medfoundry.data.pair_loader import preset_pixel_stats
        from medfoundry.models.registry import create_backbone
        from medfoundry.models.text import build_text_tower, build_tokenizer

        c = clip
        adapt = adapt if adapt is not None else AdaptConfig()
        check_clip_config(c)
        self.cfg = c
        backbone = create_backbone(model)
        self.load_reports: list = []  # what the pretrained image weights provided (written to the run folder)
        if load_pretrained and model.pretrained:
            from medfoundry.models.pretrained import load_pretrained_backbone

            self.load_reports.append(load_pretrained_backbone(backbone, model.pretrained, model.pretrained_format,
                                                              channel_mode=adapt.channel_mode))
        if not c.image.freeze:
            from medfoundry.models.lora import adapt_backbone

            adapt_backbone(backbone, adapt)  # LoRA / freezing rules of the weights issue (`adapt` section)
        backbone.mask_token.requires_grad_(False)  # no masked modelling here (DDP must see no unused params)
        if c.preprocess.size % backbone.patch_size:
            from medfoundry.config import ConfigError

            raise ConfigError(f"'clip.preprocess.size' = {c.preprocess.size} must be a multiple of the patch size "
                              f"{backbone.patch_size} of model.name={model.name}")
        self.image = ImageTower(backbone, c.embed_dim, c.image)
        self.text = build_text_tower(c.text, c.embed_dim, load_pretrained=load_pretrained)
        self.tokenizer = build_tokenizer(c.text)
        if c.text.grad_checkpointing:
            self.text.set_grad_checkpointing(True)

        mean, std = preset_pixel_stats(c.preprocess, model.in_chans)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1))
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1))

        lc = c.loss
        init = math.log(lc.siglip_init_scale) if lc.kind == "siglip" else math.log(1.0 / lc.temperature)
        self.logit_scale = nn.Parameter(torch.tensor(init), requires_grad=lc.learn_temperature)
        self.logit_bias: nn.Parameter | None = None
        if lc.kind == "siglip":
            self.logit_bias = nn.Parameter(torch.tensor(float(lc.siglip_init_bias)))
            self.loss_fn: nn.Module = SigLIPLoss(lc.gather_with_grad)
        else:
            self.loss_fn = ClipInfoNCELoss(lc.local_loss, lc.gather_with_grad)
        self.max_log_scale = math.log(lc.max_logit_scale)

        self._frozen: list[nn.Module] = []
        if c.image.freeze:
            self.image.backbone.requires_grad_(False)
            self._frozen.append(self.image.backbone)
        trunk = self._text_trunk()
        if c.text.lora_rank > 0:
            apply_text_lora(trunk, c.text.lora_rank, c.text.lora_alpha, c.text.lora_targets)
        elif c.text.freeze:
            for name, p in trunk.named_parameters():
                if name != "text_projection":  # the projection keeps training (LiT-style locking)
                    p.requires_grad_(False)
            self._frozen.append(trunk)

    def _text_trunk(self) -> nn.Module:
        text = self.text
        if hasattr(text, "tower"):  # CLIP tower + extra projection
            return text.tower
        if hasattr(text, "model"):  # HF tower: encoder only
            return text.model
        return text

    # ---- Method interface ----------------------------------------------------------------------

    def eval_backbone(self) -> Backbone:
        """The image backbone (what evaluators and exports use)."""
        return self.image.backbone

    def backbones(self) -> dict[str, Backbone]:
        return {"image.backbone": self.image.backbone}

    def train(self, mode: bool = True) -> ClipMethod:
        super().train(mode)
        for module in self._frozen:  # frozen towers stay in eval mode (dropout, drop-path off)
            module.eval()
        return self

    @torch.no_grad()
    def set_pixel_stats(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Replace the normalisation statistics (``clip.preprocess.normalize=dataset``)."""
        self.pixel_mean.copy_(torch.tensor(list(mean), dtype=torch.float32).view(-1, 1, 1))
        self.pixel_std.copy_(torch.tensor(list(std), dtype=torch.float32).view(-1, 1, 1))

    def encode_image(self, images: Tensor, normalize: bool = True) -> Tensor:
        """(B, C, H, W) images in [0, 1] -> (B, embed_dim) features (unit length when ``normalize``)."""
        x = (images - self.pixel_mean.to(images.dtype)) / self.pixel_std.to(images.dtype)
        f = self.image(x)
        return F.normalize(f.float(), dim=-1) if normalize else f

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(B, L) token ids -> (B, embed_dim) features (unit length when ``normalize``)."""
        f = self.text(input_ids, attention_mask)
        return F.normalize(f.float(), dim=-1) if normalize else f

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> Tensor:
        """Tokenise and encode a list of strings (evaluation helper); returns unit-length (N, embed_dim)."""
        device = self.logit_scale.device
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start:start + batch_size]))
            out.append(self.encode_text(tokens.input_ids.to(device), tokens.attention_mask.to(device)))
        return torch.cat(out) if out else torch.zeros(0, self.cfg.embed_dim, device=device)

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        """Contrastive loss of one batch ``{"images", "input_ids", "attention_mask"}``."""
        img = self.encode_image(batch["images"])
        txt = self.encode_text(batch["input_ids"], batch.get("attention_mask"))
        scale = self.logit_scale.exp()
        bias = self.logit_bias
        loss = self.loss_fn(img, txt, scale, bias)
        with torch.no_grad():
            sim = img @ txt.t()
            target = torch.arange(sim.shape[0], device=sim.device)
            out = {
                "loss": loss,
                "logit_scale": scale.detach(),
                "temperature": (1.0 / scale).detach(),
                "batch_i2t_acc": (sim.argmax(1) == target).float().mean(),
                "batch_t2i_acc": (sim.argmax(0) == target).float().mean(),
            }
            if "n_truncated" in batch:
                out["text_truncated_frac"] = batch["n_truncated"].float() / max(1, sim.shape[0])
            if bias is not None:
                out["logit_bias"] = bias.detach()
        return out

    @torch.no_grad()
    def after_optimizer_step(self, step: int, applied: Tensor | None = None) -> None:
        """Clamp ``exp(logit_scale)`` to at most ``clip.loss.max_logit_scale`` (CLIP's 100); a skipped step's
        unchanged scale is already within it, so ``applied`` changes nothing here."""
        self.logit_scale.clamp_(max=self.max_log_scale)
