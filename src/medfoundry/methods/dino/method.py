"""The ``dino`` method: student/EMA-teacher self-distillation with the DINO family of objectives.

One method covers DINOv1 (class-token DINO loss with centering; Caron et al. 2021), DINOv2 (+ iBOT
masked-patch loss, KoLeo, Sinkhorn-Knopp targets; Oquab et al. 2023), DINOv3 Gram anchoring
(Siméoni et al. 2025) and the DINO-X medical recipes (online Gram against the EMA teacher, center
momentum 0.999). Which terms are active is decided by the weights in :class:`DinoConfig`.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from medfoundry.config.adapt import AdaptConfig
from medfoundry.config.schema import ModelConfig
from medfoundry.losses import DINOLoss, GramLoss, IBOTPatchLoss, KDEUniformityLoss, KoLeoLoss
from medfoundry.methods.base import StudentTeacherMethod
from medfoundry.methods.dino.config import DinoConfig
from medfoundry.models.backbone import Backbone
from medfoundry.models.heads import DINOHead, apply_head
from medfoundry.models.registry import create_backbone
from medfoundry.schedules import cosine, linear_warmup_constant


class DINOMethod(StudentTeacherMethod):
    """Student and EMA teacher (backbone + DINO head [+ iBOT head]) and the configured loss terms.

    Args:
        model_cfg: backbone section (the teacher is built without drop-path).
        cfg: the ``dino`` section.
        total_steps: run length, for the teacher-momentum cosine.
        adapt_cfg: the ``adapt`` section (LoRA, freezing, channel adaptation), applied to the student
            after pretrained weights are loaded and to the teacher so both keep the same structure.
        freeze_backbone_steps: head-only warm-up: the student backbone gets no update for these steps.
    """

    def __init__(self, model_cfg: ModelConfig, cfg: DinoConfig, total_steps: int,
                 adapt_cfg: AdaptConfig | None = None, freeze_backbone_steps: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.total_steps = total_steps
        self.freeze_backbone_steps = freeze_backbone_steps
        self.load_reports: list = []  # LoadReports of pretrained loads, written to RUN/pretrained_load.json
        channel_mode = adapt_cfg.channel_mode if adapt_cfg is not None else "average"
        backbone = create_backbone(model_cfg)
        if model_cfg.pretrained:
            from medfoundry.models.pretrained import load_pretrained_backbone

            self.load_reports.append(load_pretrained_backbone(backbone, model_cfg.pretrained,
                                                              model_cfg.pretrained_format, channel_mode=channel_mode,
                                                              what="model.pretrained"))
        if adapt_cfg is not None:
            from medfoundry.models.lora import adapt_backbone

            adapt_backbone(backbone, adapt_cfg)
        self.student = self._build_tower(backbone)
        teacher_backbone = create_backbone(_replace(model_cfg, drop_path_rate=0.0, grad_checkpointing=False))
        if adapt_cfg is not None:
            adapt_backbone(teacher_backbone, adapt_cfg, verbose=False)
        self.teacher = self._build_tower(teacher_backbone)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        k = cfg.head.out_dim
        self.dino_loss = DINOLoss(k, cfg.student_temp, cfg.center_momentum)
        self.ibot_loss = IBOTPatchLoss(self._ibot_dim, cfg.student_temp, cfg.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.kde_loss = KDEUniformityLoss(cfg.kde_temperature)
        self.gram_loss = GramLoss()
        self.gram_anchor: Backbone | None = None
        if cfg.gram_weight > 0 and cfg.gram_mode == "anchor":
            from medfoundry.models.pretrained import load_pretrained_backbone

            anchor = create_backbone(_replace(model_cfg, drop_path_rate=0.0, grad_checkpointing=False))
            self.load_reports.append(
                load_pretrained_backbone(anchor, cfg.gram_anchor, "auto", channel_mode=channel_mode,
                                         what="dino.gram_anchor"))
            anchor.requires_grad_(False)
            anchor.eval()
            self.gram_anchor = anchor
        self._pending: dict[str, list[Tensor]] = {}  # teacher logits of the step's micro-batches, for the centres

    @property
    def _ibot_dim(self) -> int:
        return self.cfg.ibot_head.out_dim if self.cfg.ibot_separate_head else self.cfg.head.out_dim

    def _build_tower(self, backbone: Backbone) -> nn.ModuleDict:
        tower = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(backbone.embed_dim, self.cfg.head)})
        if self.cfg.ibot_weight > 0 and self.cfg.ibot_separate_head:
            tower["ibot_head"] = DINOHead(backbone.embed_dim, self.cfg.ibot_head)
        return tower

    def _ibot_head(self, tower: nn.ModuleDict) -> nn.Module:
        return tower["ibot_head"] if "ibot_head" in tower else tower["dino_head"]

    def head_logits(self, tower: nn.ModuleDict, cls: Tensor, patch: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """DINO-head logits of the class-token rows ``cls`` and iBOT-head logits of the masked patch-token rows
        ``patch`` (None: no iBOT term) of one tower, with one call per head.

        With the iBOT head shared (``dino.ibot_separate_head=false``, DINOv2's default) both row sets go
        through the head in a single call (:func:`~medfoundry.models.heads.apply_head`, as DINOv2's
        ``ssl_meta_arch.py`` does), so the prototype matrix is read and weight-normalised once per tower and
        step; with a separate iBOT head each head runs once.
        """
        if patch is None:
            return tower["dino_head"](cls), None
        if "ibot_head" in tower:
            return tower["dino_head"](cls), tower["ibot_head"](patch)
        cls_logits, patch_logits = apply_head(tower["dino_head"], [cls, patch])
        return cls_logits, patch_logits

    def eval_backbone(self) -> Backbone:
        """The teacher backbone: DINO's better and smoother model, the one evaluated and exported."""
        return self.teacher["backbone"]

    def train(self, mode: bool = True) -> DINOMethod:
        super().train(mode)
        if self.gram_anchor is not None:
            self.gram_anchor.eval()
        return self

    def teacher_temperature(self, step: int) -> float:
        """Teacher temperature at ``step`` (linear warm-up, then constant)."""
        c = self.cfg
        return linear_warmup_constant(step, c.warmup_teacher_temp_steps, c.warmup_teacher_temp, c.teacher_temp)

    def teacher_momentum(self, step: int) -> float:
        """EMA momentum at ``step`` (cosine from teacher_momentum to teacher_momentum_end)."""
        return cosine(step, self.total_steps, self.cfg.teacher_momentum, self.cfg.teacher_momentum_end)

    def _targets(self, loss: nn.Module, logits: Tensor, temp: float) -> Tensor:
        if self.cfg.centering == "sinkhorn":
            return loss.teacher_probs_sinkhorn(logits, temp, self.cfg.sinkhorn_iterations)
        return loss.teacher_probs_centered(logits, temp)

    def forward(self, batch: dict, step: int) -> dict[str, Tensor]:
        """All active loss terms for one multi-crop batch (view-major tensors, see ``collate_views``).

        KoLeo and KDE are computed on each global crop's student class tokens separately (two views of
        one image are never neighbours) and **summed** over the global crops, as DINOv2
        (``ssl_meta_arch.py``), DINOv3 and OpenMidnight do: ``koleo_weight: 0.1`` means what it means there.
        """
        c = self.cfg
        glob: Tensor = batch["global_crops"]
        n_g, b = glob.shape[:2]
        glob = glob.flatten(0, 1)
        local: Tensor | None = batch.get("local_crops")
        use_ibot = c.ibot_weight > 0 and "masks" in batch
        masks = batch["masks"].flatten(0, 1) if use_ibot else None
        masked = masked_positions(batch) if use_ibot else None  # flat (image x patch) index of the masked tokens
        use_gram = c.gram_weight > 0 and step >= c.gram_start_step
        temp = self.teacher_temperature(step)

        with torch.no_grad():
            t_out = self.teacher["backbone"].forward_features(glob)
            t_logits, t_patch_logits = self.head_logits(self.teacher, t_out.cls,
                                                        gather_tokens(t_out.patch, masked) if use_ibot else None)
            t_probs = self._targets(self.dino_loss, t_logits.float(), temp)
            if use_ibot:
                t_patch_probs = self._targets(self.ibot_loss, t_patch_logits.float(), temp)
            pending: dict[str, Tensor] = {}
            if c.centering == "center":  # the centres move after the optimizer step, from these logits
                pending["dino"] = t_logits.detach()
                if use_ibot:
                    pending["ibot"] = t_patch_logits.detach()
            # the (rows, K) teacher logits are not needed past the targets (Sinkhorn): freed before the student runs
            del t_logits, t_patch_logits
            gram_target = None
            if use_gram:
                gram_target = (
                    self.gram_anchor.forward_features(glob).patch if self.gram_anchor is not None else t_out.patch
                )

        s_out = self.student["backbone"].forward_features(glob, masks=masks)
        # one head call per tower: global + local class tokens (+ masked patch tokens with a shared iBOT head)
        s_local_cls = self.student_local_cls(local)
        s_cls = s_out.cls if s_local_cls is None else torch.cat([s_out.cls, s_local_cls])
        s_logits, s_patch_logits = self.head_logits(self.student, s_cls,
                                                    gather_tokens(s_out.patch, masked) if use_ibot else None)
        student_logits = s_logits.view(-1, b, s_logits.shape[-1]).float()
        teacher_probs = t_probs.view(n_g, b, -1)

        terms: dict[str, Tensor] = {}
        terms["dino_loss"] = self.dino_loss(student_logits, teacher_probs, skip_same_view=n_g > 1)
        if use_ibot:
            image_index = masked // masks.shape[1]
            terms["ibot_loss"] = self.ibot_loss(s_patch_logits.float(), t_patch_probs, image_index, n_g * b)
        # KoLeo and KDE per global crop, summed over the crops as DINOv2 (ssl_meta_arch.py, KoLeo over
        # chunk(2)), DINOv3 and OpenMidnight do, so a published weight means the same here
        s_cls_views = s_out.cls.float().view(n_g, b, -1)
        if c.koleo_weight > 0:
            terms["koleo_loss"] = sum(self.koleo_loss(v) for v in s_cls_views)
        if c.kde_weight > 0:
            terms["kde_loss"] = sum(self.kde_loss(v) for v in s_cls_views)
        if use_gram:
            terms["gram_loss"] = self.gram_loss(s_out.patch.float(), gram_target.float())

        weights = {
            "dino_loss": c.dino_weight,
            "ibot_loss": c.ibot_weight,
            "koleo_loss": c.koleo_weight,
            "kde_loss": c.kde_weight,
            "gram_loss": c.gram_weight,
        }
        loss = sum(weights[name] * value for name, value in terms.items())
        for key, logits in pending.items():  # gathered over the step's micro-batches (train.grad_accum_steps)
            self._pending.setdefault(key, []).append(logits)

        with torch.no_grad():
            t_cls = nn.functional.normalize(t_out.cls.float(), dim=-1)
            out = {"loss": loss, **{k: v.detach() for k, v in terms.items()}}
            out.update(teacher_target_stats(t_probs, terms["dino_loss"]))
            out["teacher_feature_std"] = t_cls.std(dim=0).mean()
            out["teacher_temp"] = torch.tensor(temp)
        return out

    def before_optimizer_step(self, step: int) -> None:
        """Keep the prototype layers fixed during the first ``freeze_last_layer_steps`` (DINO), and the
        whole student backbone during the first ``freeze_backbone_steps`` (head-only warm-up of fresh
        heads on released weights; AdamW skips parameters whose grad is None)."""
        if step < self.cfg.freeze_last_layer_steps:
            for name, p in self.student.named_parameters():
                if "last_layer" in name:
                    p.grad = None
        if step < self.freeze_backbone_steps:
            for p in self.student["backbone"].parameters():
                p.grad = None

    def start_step(self, step: int) -> None:
        """Forget teacher outputs gathered for a step that was skipped (non-finite loss)."""
        self._pending = {}

    @torch.no_grad()
    def after_optimizer_step(self, step: int, applied: Tensor | None = None) -> None:
        """EMA update of the teacher, then the centers from this step's teacher outputs (of all its micro-batches,
        so an accumulated step updates them as the big batch would). ``applied`` = 0 (a skipped step, decided on
        the device) leaves both exactly as they were: the lerp weight is ``(1 - m) * applied``."""
        m = self.teacher_momentum(step)
        # only trainable student params move; frozen ones (LoRA base weights, frozen blocks) stay bit-identical
        pairs = [(s, t) for s, t in zip(self.student.parameters(), self.teacher.parameters()) if s.requires_grad]
        s_params = [s for s, _ in pairs]
        t_params = [t for _, t in pairs]
        if applied is None:
            torch._foreach_lerp_(t_params, s_params, 1.0 - m)
        elif t_params:  # t + 0 * (s - t) = t exactly: the student did not move, so s - t is finite
            weight = torch.full((), 1.0 - m, device=applied.device) * applied
            torch._foreach_lerp_(t_params, s_params, [weight.to(t.dtype) for t in t_params])
        if self.cfg.centering == "center":
            if "dino" in self._pending:
                self.dino_loss.update_center(torch.cat(self._pending["dino"]).float(), applied)
            if "ibot" in self._pending:
                self.ibot_loss.update_center(torch.cat(self._pending["ibot"]).float(), applied)
        self._pending = {}

    def metrics_after_step(self, step: int) -> dict[str, float]:
        """Schedule values worth logging at ``step``."""
        return {"teacher_momentum": self.teacher_momentum(step)}


def masked_positions(batch: dict) -> Tensor:
    """The flat positions of the iBOT-masked patches of ``batch["masks"]`` (view-major ``(n_global, B, N)``).

    The loaders ship them (``batch["mask_index"]``, :func:`medfoundry.data.views.mask_index`, computed on the
    CPU); a batch without them (built by hand) gets them here, at the cost of one ``nonzero``: on a GPU a host
    sync, which the shipped indices avoid."""
    from medfoundry.data.views import mask_index

    index = batch.get("mask_index")
    return mask_index(batch["masks"]) if index is None else index


def gather_tokens(patch: Tensor, positions: Tensor) -> Tensor:
    """``patch[masks]`` for patch tokens ``(B', N, D)``: the rows at flat ``positions`` of ``patch.flatten(0, 1)``
    (``index_select``: the same values, order and gradients as boolean indexing, without its ``nonzero``)."""
    return patch.flatten(0, 1).index_select(0, positions)


@torch.no_grad()
def teacher_target_stats(t_probs: Tensor, dino_loss: Tensor | None = None) -> dict[str, Tensor]:
    """Health statistics of the DINO teacher targets actually used this step, as 0-dim float tensors.

    Args:
        t_probs: ``(N, K)`` teacher targets (rows sum to 1) after centering/Sinkhorn and sharpening,
            ``N = n_global * B`` rows of this rank.
        dino_loss: the DINO cross-entropy of this step; adds ``dino_loss_frac`` when given.

    Returns:
        * ``teacher_entropy``: mean per-sample entropy (nats): low = confident targets; near ``ln K`` =
          every target is flat (the "entropy wall" on the teacher side);
        * ``teacher_entropy_frac``: the same divided by ``ln K``;
        * ``teacher_mean_entropy`` (``_frac``): entropy of the batch-mean target distribution (/ ``ln K``):
          how many prototypes the batch uses at all. Confident targets (low per-sample entropy) with a low
          mean entropy mean every image is sent to the same few prototypes -- head collapse;
        * ``teacher_effective_prototypes``: ``exp(teacher_mean_entropy)``, the perplexity of the mean target,
          between 1 (one prototype) and ``K``;
        * ``teacher_effective_prototypes_frac``: that divided by ``min(K, N)``, the most ``N`` confident rows
          can reach (``N`` one-hot rows cover at most ``N`` prototypes), so 1 = every row on its own prototype,
          whatever the batch size; soft (flat) rows can exceed 1 (up to ``K / N``); near ``1 / N`` = every row
          on the same prototype (head collapse);
        * ``teacher_distinct_prototypes``: the number of distinct argmax prototypes over the ``N`` rows;
        * ``dino_loss_frac``: ``dino_loss / ln K``; near 1 = DINO-X's entropy wall (the student is no better
          than uniform against the targets).

    Under DDP the training loop all-reduces every logged value as a mean over ranks, so the distinct and
    effective counts are then per-rank counts averaged over ranks (not counts over the global batch).
    """
    probs = t_probs.detach().float().reshape(-1, t_probs.shape[-1])
    n, k = probs.shape
    log_k = math.log(k)
    entropy = DINOLoss.entropy(probs).mean()
    mean_entropy = DINOLoss.entropy(probs.mean(0))
    effective = mean_entropy.exp()
    out = {
        "teacher_entropy": entropy,
        "teacher_entropy_frac": entropy / log_k,
        "teacher_mean_entropy": mean_entropy,
        "teacher_mean_entropy_frac": mean_entropy / log_k,
        "teacher_effective_prototypes": effective,
        "teacher_effective_prototypes_frac": effective / max(1, min(k, n)),
        "teacher_distinct_prototypes": torch.tensor(float(probs.argmax(-1).unique().numel()), device=probs.device),
    }
    if dino_loss is not None:
        out["dino_loss_frac"] = dino_loss.detach().float() / log_k
    return out


def init_eval_backbone(model: ModelConfig, adapt: AdaptConfig) -> Backbone:
    """The EMA teacher's backbone as :class:`DINOMethod` initialises it, without the rest of the method.

    The teacher starts as a copy of the student backbone, the first thing the method draws from the
    RNG (then the student's LoRA adapters), so under the run's seed this is bit-identical to the run's
    step-0 teacher backbone; heads, the other tower and external weights (``model.pretrained``, the
    Gram anchor) are neither built nor read. For evaluation (:mod:`medfoundry.methods.checkpoint_backbone`).
    """
    from medfoundry.models.lora import adapt_backbone

    student = create_backbone(model)
    adapt_backbone(student, adapt, verbose=False)
    teacher = create_backbone(_replace(model, drop_path_rate=0.0, grad_checkpointing=False))
    adapt_backbone(teacher, adapt, verbose=False)
    teacher.load_state_dict(student.state_dict())
    return teacher


def _replace(cfg: ModelConfig, **changes) -> ModelConfig:
    new = copy.copy(cfg)
    for k, v in changes.items():
        setattr(new, k, v)
    return new
