"""facebookresearch/dinov2's own modules as the peer of medfoundry's DINOv2-style training step.

The code is located (and, when absent, cloned) by :mod:`medfoundry_cli.bench.peer_code`, never copied
into this repository; the step is built from dinov2's modules: ``dinov2.models.vision_transformer``
(``vit_small`` / ``vit_base`` / ``vit_large``, or ``DinoVisionTransformer`` for other sizes),
``dinov2.layers.DINOHead``, ``dinov2.loss.DINOLoss`` / ``iBOTPatchLoss`` / ``KoLeoLoss``,
``dinov2.utils.param_groups`` and ``dinov2.utils.utils.CosineScheduler``.

:class:`Dinov2PeerStep` is one iteration of dinov2's ``train/train.py::do_train`` around
``train/ssl_meta_arch.py::SSLMetaArch.forward_backward``, written here because ``SSLMetaArch`` itself
cannot be imported without xFormers (it asserts it at import) and is wired to FSDP. It keeps every
fact of that code: one teacher pass on the two global crops with the teacher class tokens swapped
(A is matched to B), one teacher head call on the class tokens and the masked patch tokens together
(shared head), Sinkhorn-Knopp (``sinkhorn_knopp_teacher``) or centering (``softmax_center_teacher`` +
``update_center``) teacher targets, one student head call on local class tokens + global class tokens
+ masked patch tokens, the DINO loss split into its local and global terms, KoLeo over
``chunk(2)`` of the global class tokens, the masked iBOT loss weighted per image, the
loss-scale factors, AdamW over dinov2's fused parameter groups (``foreach=True``), per-submodule
gradient clipping, the schedules (``apply_optim_scheduler``), the EMA update
(``_foreach_mul_`` + ``_foreach_add_``) and the loop's ``.item()`` of every logged loss + NaN check.

What differs from dinov2's own training, and why (none of it changes the FLOPs):

* **No xFormers** (not installed here): dinov2's ``MemEffAttention`` then falls back to its plain
  ``Attention`` (PyTorch ``scaled_dot_product_attention``), with a warning; the nested-tensor student
  call ``backbone([global, local], masks=[masks, None])`` needs xFormers, so the student backbone runs
  twice (global crops with masks, local crops), which is the same computation as the block-diagonal
  attention; ``fmha.BlockDiagonalMask.from_tensor_list`` / ``split`` around the student head is a
  concatenation along the token axis and a split, done with ``torch.cat`` / ``Tensor.split``.
* **Masks**: the same iBOT masks as medfoundry's step (medfoundry's block masks, identical tensors),
  laid out as dinov2's collate lays out its own (``collated_masks``, ``mask_indices_list``,
  ``masks_weight``, ``n_masked_patches``); the head buffer ``upperbound`` is the masked count (dinov2's
  collate pads it to ``sum(int(N * prob_max))`` for static shapes, which would add head FLOPs on
  padding rows).
* **One process, no FSDP**: dinov2's iBOT Sinkhorn calls ``dist.all_reduce`` unconditionally; without a
  process group its module sees a stand-in whose ``all_reduce`` is the identity (what an all-reduce over
  one rank is); with a process group it is torch's.
* **Precision**: the same autocast as medfoundry's step (bf16 on GPU, fp32 on CPU) instead of dinov2's
  FSDP fp16 mixed precision + gradient scaler.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from medfoundry.config.schema import RunConfig
from medfoundry.precision import autocast
from medfoundry_cli.bench.peer_code import Dinov2Modules

_NAMED = {(384, 12, 6): "vit_small", (768, 12, 12): "vit_base", (1024, 24, 16): "vit_large"}


def peer_backbone_kwargs(reference: nn.Module, img_size: int) -> dict:
    """dinov2 ``DinoVisionTransformer`` arguments that give medfoundry's ``reference`` backbone's architecture.

    Reads width, depth, heads, MLP ratio, patch, channels, register tokens, layer scale and qkv bias off
    the timm model; dinov2's training-config defaults for the rest (``block_chunks=0``,
    ``interpolate_offset=0.1``, no antialiasing). Plain ViTs only (absolute position embeddings, GELU MLP).
    """
    from timm.layers import LayerScale
    from timm.models.vision_transformer import VisionTransformer

    vit = reference.vit
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"the dinov2 peer needs a plain ViT (abs pos-embed); '{reference.name}' is "
                         f"{type(vit).__name__}")
    block = vit.blocks[0]
    if not hasattr(block.mlp, "fc1") or hasattr(block.mlp, "fc1_g"):
        raise ValueError(f"the dinov2 peer needs a GELU MLP; '{reference.name}' has {type(block.mlp).__name__}")
    dim = reference.embed_dim
    ls = block.ls1
    return {
        "img_size": img_size,
        "patch_size": reference.patch_size,
        "in_chans": reference.in_chans,
        "embed_dim": dim,
        "depth": reference.depth,
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": float(ls.gamma.detach().flatten()[0]) if isinstance(ls, LayerScale) else None,
        "num_register_tokens": int(getattr(vit, "num_reg_tokens", 0)),
        "block_chunks": 0,
        "interpolate_offset": 0.1,
        "interpolate_antialias": False,
    }


def build_peer_backbone(mods: Dinov2Modules, kwargs: dict, drop_path: float = 0.0) -> nn.Module:
    """dinov2's named constructor (``vit_small`` / ``vit_base`` / ``vit_large``) when the size is one of them,
    else ``DinoVisionTransformer`` with the block those constructors use (``NestedTensorBlock`` +
    ``MemEffAttention``)."""
    vits = mods.vision_transformer
    kw = dict(kwargs)
    key = (kw["embed_dim"], kw["depth"], kw["num_heads"])
    extra = {"drop_path_rate": drop_path, "drop_path_uniform": True} if drop_path > 0 else {}
    if key in _NAMED and kw["mlp_ratio"] == 4:
        for k in ("embed_dim", "depth", "num_heads", "mlp_ratio"):
            kw.pop(k)
        return getattr(vits, _NAMED[key])(**kw, **extra)
    block = partial(mods.layers.NestedTensorBlock, attn_class=mods.layers.MemEffAttention)
    return vits.DinoVisionTransformer(**kw, block_fn=block, **extra)


def _peer_key(key: str) -> str:
    """medfoundry's student state-dict key as dinov2's: the timm ViT's keys are dinov2's under ``backbone.``
    (``reg_token`` is ``register_tokens``); the weight-normed prototypes are ``weight_g`` / ``weight_v``."""
    key = key.replace("backbone.vit.", "backbone.").replace("backbone.reg_token", "backbone.register_tokens")
    key = key.replace("last_layer.parametrizations.weight.original0", "last_layer.weight_g")
    return key.replace("last_layer.parametrizations.weight.original1", "last_layer.weight_v")


def dinov2_batch(batch: dict) -> dict:
    """medfoundry's view-major batch (``global_crops`` (2, B, C, H, W), ``local_crops``, ``masks`` (2, B, N)) in
    the layout of dinov2's ``collate_data_and_cast``: crops stacked view-major, ``collated_masks``,
    ``mask_indices_list``, ``masks_weight``, ``n_masked_patches`` and ``upperbound`` (= the masked count, no
    padding rows). Done once, outside the timed step, as dinov2's collate runs in the loader workers."""
    glob = batch["global_crops"].flatten(0, 1)
    out: dict[str, Any] = {"collated_global_crops": glob}
    if "local_crops" in batch:
        out["collated_local_crops"] = batch["local_crops"].flatten(0, 1)
    if "masks" in batch:
        masks = batch["masks"].flatten(0, 1).bool()
    else:
        masks = torch.zeros(glob.shape[0], 1, dtype=torch.bool, device=glob.device)
    indices = masks.flatten().nonzero().flatten()
    out["collated_masks"] = masks
    out["mask_indices_list"] = indices
    out["masks_weight"] = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    out["n_masked_patches"] = torch.full((1,), fill_value=indices.shape[0], dtype=torch.long, device=glob.device)
    out["upperbound"] = int(indices.shape[0])
    out["has_masks"] = "masks" in batch
    return out


class Dinov2PeerStep:
    """One dinov2 training iteration built from dinov2's modules, configured like medfoundry's step for ``cfg``.

    Args:
        cfg: medfoundry's run config of the benchmarked step (crops, ``dino`` section: head, prototypes,
            iBOT/KoLeo weights, centering, temperatures, momentum; ``optim``: lr, weight decay, betas, clipping,
            layer decay, patch-embedding multiplier; ``train.steps`` for the schedules).
        reference: medfoundry's student backbone, whose architecture the peer's backbone copies.
        device, precision: where and under which autocast to run (as medfoundry's step).
        mods: :func:`import_dinov2`'s modules.

    Call with a :func:`dinov2_batch` and the step index; returns the detached total loss.
    """

    def __init__(self, cfg: RunConfig, reference: nn.Module, device: torch.device, precision: str,
                 mods: Dinov2Modules) -> None:
        c, d, o = cfg.crops, cfg.dino, cfg.optim
        if c.n_global != 2:
            raise ValueError(f"dinov2's step needs exactly 2 global crops (its assert); crops.n_global={c.n_global}")
        if d.head.kind != "dino":
            raise ValueError(f"dinov2's DINOHead is the bottleneck + weight-normed head; dino.head.kind={d.head.kind}")
        if d.centering not in ("sinkhorn", "center"):
            raise ValueError(f"dinov2 centering is sinkhorn_knopp or centering; got dino.centering={d.centering}")
        self.device, self.precision = device, precision
        self.n_local = c.n_local
        self.centering = "sinkhorn_knopp" if d.centering == "sinkhorn" else "centering"
        self.do_ibot = d.ibot_weight > 0
        self.ibot_separate_head = d.ibot_separate_head
        self.dino_loss_weight, self.ibot_loss_weight, self.koleo_weight = d.dino_weight, d.ibot_weight, d.koleo_weight
        self.clip_grad = o.clip_grad
        self.backbone_kwargs = peer_backbone_kwargs(reference, cfg.model.img_size)

        def head(hc: Any) -> nn.Module:
            return mods.layers.DINOHead(in_dim=self.backbone_kwargs["embed_dim"], out_dim=hc.out_dim,
                                        hidden_dim=hc.hidden_dim or self.backbone_kwargs["embed_dim"],
                                        bottleneck_dim=hc.bottleneck_dim, nlayers=hc.nlayers)

        student: dict[str, nn.Module] = {
            "backbone": build_peer_backbone(mods, self.backbone_kwargs, cfg.model.drop_path_rate)}
        teacher: dict[str, nn.Module] = {"backbone": build_peer_backbone(mods, self.backbone_kwargs)}
        student["dino_head"], teacher["dino_head"] = head(d.head), head(d.head)
        if self.do_ibot and self.ibot_separate_head:
            student["ibot_head"], teacher["ibot_head"] = head(d.ibot_head), head(d.ibot_head)
        self.student = nn.ModuleDict(student).to(device)
        self.teacher = nn.ModuleDict(teacher).to(device)
        self.teacher.load_state_dict(self.student.state_dict())  # prepare_for_distributed_training does this
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.student.train()
        self.teacher.eval()

        ibot_dim = d.ibot_head.out_dim if self.ibot_separate_head else d.head.out_dim
        self.dino_loss = mods.loss.DINOLoss(d.head.out_dim, d.student_temp, d.center_momentum).to(device)
        self.ibot_patch_loss = mods.loss.iBOTPatchLoss(ibot_dim, d.student_temp, d.center_momentum).to(device)
        self.koleo_loss = mods.loss.KoLeoLoss().to(device)

        groups: list[dict] = []
        pg = mods.param_groups
        for module in self.student.values():  # SSLMetaArch.get_params_groups
            fused = pg.fuse_params_groups(pg.get_params_groups_with_decay(
                model=module, lr_decay_rate=o.layer_decay, patch_embed_lr_mult=o.patch_embed_lr_mult))
            for g in fused:
                g["foreach"] = True
                groups.append(g)
        self.optimizer = torch.optim.AdamW(groups, betas=tuple(o.betas))  # train.py::build_optimizer

        total = cfg.train.schedule_steps or cfg.train.steps
        sched = mods.utils.CosineScheduler  # train.py::build_schedulers, with medfoundry's values
        warm = min(o.warmup_steps, total)
        self.lr = sched(o.lr, o.min_lr, total, warmup_iters=warm, start_warmup_value=0)
        self.wd = sched(o.weight_decay, o.weight_decay_end, total)
        self.momentum = sched(d.teacher_momentum, d.teacher_momentum_end, total)
        self.teacher_temp = sched(d.teacher_temp, d.teacher_temp, d.warmup_teacher_temp_steps,
                                  warmup_iters=d.warmup_teacher_temp_steps, start_warmup_value=d.warmup_teacher_temp)
        self.last_layer_lr = sched(o.lr, o.min_lr, total, warmup_iters=warm, start_warmup_value=0)
        self.last_layer_lr.schedule[: d.freeze_last_layer_steps] = 0
        self.last_loss_dict: dict[str, float] = {}

    def parameter_count(self) -> int:
        """Parameters of the student (backbone and heads), to check against medfoundry's student."""
        return sum(p.numel() for p in self.student.parameters())

    def load_medfoundry_student(self, student: nn.ModuleDict) -> None:
        """Start student and teacher from medfoundry's student weights (``DINOMethod.student``), so both steps
        compute on the same numbers; raises ``RuntimeError`` naming the keys when the architectures differ."""
        state = {_peer_key(k): v for k, v in student.state_dict().items()}
        self.student.load_state_dict(state, strict=True)
        self.teacher.load_state_dict(state, strict=True)

    def _apply_optim_scheduler(self, step: int) -> None:
        """dinov2's ``train.py::apply_optim_scheduler`` (train.py imports fvcore, so it is restated here)."""
        lr, wd, last_layer_lr = self.lr[step], self.wd[step], self.last_layer_lr[step]
        for group in self.optimizer.param_groups:
            group["weight_decay"] = wd * group["wd_multiplier"]
            group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]

    def __call__(self, data: dict, step: int) -> Tensor:
        """``do_train``'s loop body: schedules, ``zero_grad``, ``forward_backward``, clipping, AdamW step, EMA
        update, then the logged losses as Python floats and the NaN check (the loop's host syncs)."""
        self._apply_optim_scheduler(step)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.precision, self.device):
            loss_dict, total = self.forward_backward(data, float(self.teacher_temp[step]))
        if self.clip_grad:
            for module in self.student.values():  # FSDP's module.clip_grad_norm_ in dinov2, per submodule
                torch.nn.utils.clip_grad_norm_(module.parameters(), self.clip_grad)
        self.optimizer.step()
        self.update_teacher(float(self.momentum[step]))
        reduced = {k: v.item() for k, v in loss_dict.items()}  # loss_dict_reduced (world size 1)
        if math.isnan(sum(reduced.values())):
            raise AssertionError("NaN detected")
        self.last_loss_dict = reduced
        return total.detach()

    def forward_backward(self, images: dict, teacher_temp: float) -> tuple[dict[str, Tensor], Tensor]:
        """``SSLMetaArch.forward_backward`` without xFormers (see the module docstring); returns the loss dict
        and the total loss after ``backward``."""
        n_global_crops = 2
        n_local_crops = self.n_local
        global_crops = images["collated_global_crops"]
        local_crops = images.get("collated_local_crops")
        masks = images["collated_masks"]
        mask_indices_list = images["mask_indices_list"]
        n_masked_patches_tensor = images["n_masked_patches"]
        n_masked_patches = mask_indices_list.shape[0]
        upperbound = images["upperbound"]
        masks_weight = images["masks_weight"]
        do_ibot = self.do_ibot and n_masked_patches > 0

        n_local_crops_loss_terms = max(n_local_crops * n_global_crops, 1)
        n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
        ibot_loss_scale = 1.0 / n_global_crops

        @torch.no_grad()
        def get_teacher_output() -> tuple[Tensor, Tensor | None]:
            out = self.teacher.backbone(global_crops, is_training=True)
            cls = out["x_norm_clstoken"].chunk(n_global_crops)
            cls = torch.cat((cls[1], cls[0]))  # swapped so A is matched to B in the global-crops DINO loss
            patch = out["x_norm_patchtokens"]
            dim, n_cls = patch.shape[-1], cls.shape[0]
            masked_after_head = None
            if do_ibot and not self.ibot_separate_head:
                buffer = patch.new_zeros(upperbound + n_cls, dim)
                buffer[:n_cls].copy_(cls)
                torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list,
                                   out=buffer[n_cls:n_cls + n_masked_patches])
                after_head = self.teacher.dino_head(buffer)
                cls_after_head = after_head[:n_cls]
                masked_after_head = after_head[n_cls:n_cls + n_masked_patches]
            elif do_ibot:
                buffer = patch.new_zeros(upperbound, dim)
                torch.index_select(patch.flatten(0, 1), dim=0, index=mask_indices_list,
                                   out=buffer[:n_masked_patches])
                cls_after_head = self.teacher.dino_head(cls)
                masked_after_head = self.teacher.ibot_head(buffer)[:n_masked_patches]
            else:
                cls_after_head = self.teacher.dino_head(cls)
            ibot_targets = None
            if self.centering == "centering":
                dino_targets = self.dino_loss.softmax_center_teacher(cls_after_head, teacher_temp=teacher_temp).view(
                    n_global_crops, -1, *cls_after_head.shape[1:])
                self.dino_loss.update_center(cls_after_head)
                if do_ibot:
                    masked = masked_after_head.unsqueeze(0)
                    ibot_targets = self.ibot_patch_loss.softmax_center_teacher(
                        masked[:, :n_masked_patches], teacher_temp=teacher_temp).squeeze(0)
                    self.ibot_patch_loss.update_center(masked[:n_masked_patches])
            else:
                dino_targets = self.dino_loss.sinkhorn_knopp_teacher(cls_after_head, teacher_temp=teacher_temp).view(
                    n_global_crops, -1, *cls_after_head.shape[1:])
                if do_ibot:
                    ibot_targets = self.ibot_patch_loss.sinkhorn_knopp_teacher(
                        masked_after_head, teacher_temp=teacher_temp, n_masked_patches_tensor=n_masked_patches_tensor)
            return dino_targets, ibot_targets

        teacher_dino_targets, teacher_ibot_targets = get_teacher_output()

        loss_dict: dict[str, Tensor] = {}
        loss_accumulator: Tensor | float = 0.0
        # the nested call backbone([global, local], masks=[masks, None]) needs xFormers: the same two passes
        student_global = self.student.backbone(global_crops, masks=masks if images["has_masks"] else None,
                                               is_training=True)
        inputs_for_student_head_list = []
        if n_local_crops > 0:
            student_local = self.student.backbone(local_crops, is_training=True)
            inputs_for_student_head_list.append(student_local["x_norm_clstoken"].unsqueeze(0))
        student_global_cls_tokens = student_global["x_norm_clstoken"]
        inputs_for_student_head_list.append(student_global_cls_tokens.unsqueeze(0))
        student_masked_after_head = None
        if do_ibot:
            dim = student_global_cls_tokens.shape[-1]
            patch_tokens = student_global["x_norm_patchtokens"]
            buffer = patch_tokens.new_zeros(upperbound, dim)
            buffer[:n_masked_patches].copy_(torch.index_select(patch_tokens.flatten(0, 1), dim=0,
                                                               index=mask_indices_list))
            if not self.ibot_separate_head:
                inputs_for_student_head_list.append(buffer.unsqueeze(0))
            else:
                student_masked_after_head = self.student.ibot_head(buffer)[:n_masked_patches]

        # fmha.BlockDiagonalMask.from_tensor_list(...) + split: a concatenation on the token axis and a split
        sizes = [t.shape[1] for t in inputs_for_student_head_list]
        outputs_list = list(self.student.dino_head(torch.cat(inputs_for_student_head_list, dim=1)).split(sizes, dim=1))
        student_local_after_head = outputs_list.pop(0).squeeze(0) if n_local_crops > 0 else None
        student_global_after_head = outputs_list.pop(0).squeeze(0)
        if do_ibot and not self.ibot_separate_head:
            student_masked_after_head = outputs_list.pop(0).squeeze(0)[:n_masked_patches]

        terms = n_global_crops_loss_terms + n_local_crops_loss_terms
        if n_local_crops > 0:
            dino_local = self.dino_loss(student_output_list=student_local_after_head.chunk(n_local_crops),
                                        teacher_out_softmaxed_centered_list=teacher_dino_targets) / terms
            loss_dict["dino_local_crops_loss"] = dino_local
            loss_accumulator = loss_accumulator + self.dino_loss_weight * dino_local
        loss_scales = 2
        dino_global = self.dino_loss(student_output_list=[student_global_after_head],
                                     teacher_out_softmaxed_centered_list=[teacher_dino_targets.flatten(0, 1)]
                                     ) * loss_scales / terms
        loss_dict["dino_global_crops_loss"] = dino_global
        loss_accumulator = loss_accumulator + self.dino_loss_weight * dino_global
        if self.koleo_weight > 0:
            koleo = self.koleo_weight * sum(self.koleo_loss(p) for p in student_global_cls_tokens.chunk(2))
            loss_accumulator = loss_accumulator + koleo
            loss_dict["koleo_loss"] = koleo / loss_scales
        if do_ibot:
            ibot = self.ibot_patch_loss.forward_masked(student_masked_after_head, teacher_ibot_targets,
                                                       student_masks_flat=masks, n_masked_patches=n_masked_patches,
                                                       masks_weight=masks_weight) * loss_scales * ibot_loss_scale
            loss_dict["ibot_loss"] = ibot / 2
            loss_accumulator = loss_accumulator + self.ibot_loss_weight * ibot
        assert isinstance(loss_accumulator, Tensor)
        loss_accumulator.backward()  # SSLMetaArch.backprop_loss without the fp16 scaler
        return loss_dict, loss_accumulator

    @torch.no_grad()
    def update_teacher(self, m: float) -> None:
        """``SSLMetaArch.update_teacher`` over the plain (unsharded) submodules."""
        student_param_list: list[Tensor] = []
        teacher_param_list: list[Tensor] = []
        for k in self.student:  # SSLMetaArch: for k in self.student.keys()
            student_param_list += list(self.student[k].parameters())
            teacher_param_list += list(self.teacher[k].parameters())
        torch._foreach_mul_(teacher_param_list, m)
        torch._foreach_add_(teacher_param_list, student_param_list, alpha=1 - m)
