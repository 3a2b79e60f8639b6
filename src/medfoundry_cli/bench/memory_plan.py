"""Per-GPU memory plan of DINO + iBOT pretraining of a large ViT under FSDP2 (ViT-7B/16 by default).

Analytic: nothing is allocated. The parameter counts come from the real method built on the meta device
(:func:`inputs_from_config` builds ``DINOMethod`` under ``torch.device("meta")``), the rest from the
formulas below. Bytes are per GPU, ``N`` GPUs, ``P`` parameter counts, ``D`` width, ``H`` SwiGLU hidden
width, ``h`` attention heads, ``L`` blocks, ``T`` tokens.

**Model state (sharded by FSDP2 over N GPUs; fully_shard per block, per backbone, then the root).**
medfoundry keeps fp32 master weights (``m`` = 4 bytes; 2 for a bf16 master) and FSDP2's
``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` gathers bf16 copies for compute::

    student weights   m * P_student / N
    gradients         m * P_trainable / N      (sharded gradients are kept in the parameter dtype)
    AdamW             2 * m * P_trainable / N  (exp_avg and exp_avg_sq, in the parameter dtype)
    teacher (EMA)     m * P_teacher / N        (sharded like the student; no gradients, no optimizer state)

**FSDP2 transients.** The root unit (everything outside the backbones: both towers' heads) is gathered
for the forward and, being the root, stays unsharded until the end of the backward (FSDP2 does not
reshard the root after forward), and its student half's unsharded bf16 gradients wait for the root's
post-backward; one block is the unit gathered at a time: during the backward the current and the
prefetched block in bf16, the block's unsharded bf16 gradients and their fp32 copy for the
reduce-scatter::

    2 * P_root + 2 * P_student_heads + 10 * P_block

**Saved activations, one transformer block, per token** (bf16 compute under CUDA autocast, which runs
``layer_norm`` in fp32 (PyTorch's autocast op reference); FSDP2's bf16 parameters keep the residual
stream in bf16): both norms save an fp32 copy of their input (4D each) and fp32 mean/rstd (8 each);
the qkv input (2D), the qkv output kept alive by ``v`` (6D), q and k after RoPE (4D), the attention
output (2D, flash/efficient SDPA: no T x T matrix) plus its logsumexp (4h), the projection input (2D)
and output (2D, for the layer-scale gradient); the two SwiGLU input projections each save their own
bf16 cast of the norm output (4D), SiLU's input, SiLU's output, the gate (3 x 2H) and the fc2 input
(2H), the fc2 output (2D, layer scale)::

    a_block = 32 D + 8 H + 4 h + 16            (26 D + 8 H + 4 h + 8 where layer_norm stays bf16, e.g. CPU)

``tests/medfoundry_cli/bench/test_memory_plan.py`` measures this with ``saved_tensors_hooks`` on a
narrow block of the same architecture. With activation checkpointing (``model.grad_checkpointing``,
one ``torch.utils.checkpoint`` per block) a block keeps only its bf16 input (2D) and one block at a
time is recomputed in the backward.

**fp8.** ``dist.float8`` (torchao's ``Float8Linear``) and DINOv3's own ``Fp8LinearFn`` both save the
*high-precision* matmul inputs for the backward (``ctx.save_for_backward(input_hp, weight_hp_t)`` /
``(a, b_t, ...)``): fp8 speeds the matmuls up but saves no activation memory. The row marked
``fp8-saved`` is hypothetical (a linear that keeps its inputs in fp8): the linear inputs (qkv 2D,
proj 2D, fc1 2 x 2D, fc2 2H) shrink by half, ``a_block`` by 4D + H.

**Per image** (``n_g`` global crops of ``T_g`` tokens, ``n_l`` local crops of ``T_l``; ``T_s`` =
``n_g T_g + n_l T_l``; ``M`` expected iBOT-masked patches = ``n_g * mask_probability * mean mask ratio
* patches``; ``K``/``K_i`` prototypes)::

    blocks             L * T_s * a_block                    (no checkpointing)
                       L * T_s * 2D + T_s * a_block         (checkpointing: inputs + one recomputed block)
    gradient flow      T_s * 4D                             (gradient of a block's output and input, bf16)
    embedding          2 * C * (n_g g^2 + n_l l^2)          (bf16 copy of the pixels for the patch conv)
    final norm         T_s * (4D + 8)
    DINO head + loss   (n_g + n_l) * (head_mlp + 4K + 8K)   (MLP inputs, fp32 log-softmax, its gradients)
    teacher targets    n_g * 8K                             (fp32 probs, their bf16 copy in the loss, logits)
    iBOT               M * (head_mlp_i + 4K_i + 8K_i + 6K_i)

with ``head_mlp = 2 (D + 2 (nlayers - 1) hidden + 2 bottleneck) + 4`` (linear and GELU inputs, the
L2-normalised bottleneck). **Per step**, independent of the batch: the weight-normalised prototype
layers recompute their weight each forward (``2 K bottleneck + 4 K`` per student head).

**Fits** when ``fixed + B * per_image <= (1 - headroom) * capacity - reserve``: ``capacity`` 81,559 MiB
(nvidia-smi's total of an H100 SXM 80 GB), ``reserve`` 3 GiB (CUDA context, NCCL buffers, cuBLAS
workspaces), ``headroom`` 10 % for allocator fragmentation.

**Checkpoints.** ``train/loop.py::_save`` takes ``get_state_dict(method, optimizer)`` with the default
``full_state_dict=False`` (DTensor shards) and ``dcp.save`` writes every rank's own shards, staging one
tensor at a time to the host: no rank gathers the full state and no GPU memory is added. The best
checkpoint of in-training evaluation (``eval/best.py``) is written the same way under FSDP, as the sharded
``RUN/best.dcp/`` (the method's weights, no optimizer state).

Sources of the defaults: facebookresearch/dinov3 ``dinov3/configs/train/dinov3_vit7b16_pretrain.yaml``
(2 x 256 px global and 8 x 112 px local crops, 16 images per GPU, heads 262144/8192/512 and
98304/4096/384, iBOT mask probability 0.5, ratio 0.1-0.5, ``checkpointing: true``, ``fp8_enabled:
true``) and ``dinov3/hub/backbones.py`` (the ViT-7B/16).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GIB = 2**30
H100_80GB_BYTES = 81559 * 2**20  # nvidia-smi's total memory of an H100 SXM 80 GB
RESERVE_BYTES = 3 * GIB  # CUDA context, NCCL buffers, cuBLAS workspaces
HEADROOM = 0.10  # allocator fragmentation

# DINOv3's ViT-7B/16 pretraining recipe (dinov3/configs/train/dinov3_vit7b16_pretrain.yaml) in medfoundry keys
DINOV3_7B_OVERRIDES = [
    "model.name=vit_7b_patch16_dinov3", "model.img_size=256", "model.grad_checkpointing=true",
    "crops.n_global=2", "crops.global_size=256", "crops.n_local=8", "crops.local_size=112",
    "dino.head.out_dim=262144", "dino.head.hidden_dim=8192", "dino.head.bottleneck_dim=512", "dino.head.nlayers=3",
    "dino.ibot_weight=1.0", "dino.ibot_separate_head=true", "dino.ibot_head.out_dim=98304",
    "dino.ibot_head.hidden_dim=4096", "dino.ibot_head.bottleneck_dim=384", "dino.ibot_head.nlayers=3",
    "dino.mask_probability=0.5", "dino.mask_ratio_min=0.1", "dino.mask_ratio_max=0.5", "dino.koleo_weight=0.1",
]
DINOV3_7B_BATCH_PER_GPU = 16  # train.batch_size_per_gpu of the same recipe (on 256 GPUs)


@dataclass(frozen=True)
class HeadShape:
    """A DINO head as the formulas see it (``kind: dino``)."""

    out_dim: int  # K prototypes
    hidden_dim: int
    bottleneck_dim: int
    nlayers: int


@dataclass(frozen=True)
class PlanInputs:
    """Everything the formulas read: shapes and parameter counts of the method, and the crops of a step."""

    model_name: str
    dim: int
    depth: int
    num_heads: int
    mlp_hidden: int  # SwiGLU hidden width (fc1_g / fc1_x)
    patch: int
    prefix_tokens: int  # class + register tokens
    in_chans: int
    backbone_params: int  # one backbone, mask token included
    student_params: int
    student_trainable: int
    student_head_trainable: int  # trainable parameters of the student's heads (root unit)
    teacher_params: int
    block_params: int  # one transformer block: the unit FSDP2 gathers at a time
    root_params: int  # parameters outside every backbone (both towers' heads): FSDP2's root unit
    dino_head: HeadShape
    ibot_head: HeadShape | None  # None: iBOT off
    n_global: int
    global_size: int
    n_local: int
    local_size: int
    mask_probability: float
    mask_ratio_mean: float

    def tokens(self, side: int) -> int:
        """Tokens of one ``side`` x ``side`` crop: patches plus class and register tokens."""
        return (side // self.patch) ** 2 + self.prefix_tokens

    @property
    def student_tokens(self) -> int:
        """Tokens the student sees per image, all crops."""
        return self.n_global * self.tokens(self.global_size) + self.n_local * self.tokens(self.local_size)

    @property
    def masked_patches(self) -> float:
        """Expected iBOT-masked patches per image (over the global crops)."""
        if self.ibot_head is None:
            return 0.0
        return self.n_global * self.mask_probability * self.mask_ratio_mean * (self.global_size // self.patch) ** 2


@dataclass(frozen=True)
class Mode:
    """One way to run the step: activation checkpointing and the linear layers' precision."""

    name: str
    checkpointing: bool
    fp8: str = "off"  # off | torchao (dist.float8: inputs saved in bf16) | fp8-saved (hypothetical)


MODES = (
    Mode("bf16", False),
    Mode("bf16 + AC", True),
    Mode("fp8 (torchao)", False, "torchao"),
    Mode("fp8 (torchao) + AC", True, "torchao"),
    Mode("fp8-saved, hypothetical", False, "fp8-saved"),
    Mode("fp8-saved + AC, hypothetical", True, "fp8-saved"),
)


@dataclass
class ModeResult:
    """The plan of one mode: per-image activations, the fixed part, the largest batch that fits."""

    mode: Mode
    per_image: dict[str, float]
    per_image_total: float
    fixed: float
    largest_batch: int
    peak_at: dict[int, float] = field(default_factory=dict)  # batch per GPU -> bytes


@dataclass
class MemoryPlan:
    """The whole plan for ``n_gpus`` GPUs of ``capacity`` bytes."""

    inputs: PlanInputs
    n_gpus: int
    capacity: float
    master_bytes: int
    state: dict[str, float]
    transient: dict[str, float]
    per_step: dict[str, float]
    modes: list[ModeResult]
    checkpoint: dict[str, float]

    @property
    def budget(self) -> float:
        """Bytes a step may use: capacity less fragmentation headroom and the fixed reserve."""
        return (1 - HEADROOM) * self.capacity - RESERVE_BYTES


def _head_shape(cfg) -> HeadShape:
    return HeadShape(cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.nlayers)


def inputs_from_config(overrides: list[str] | None = None) -> PlanInputs:
    """Build the DINO method of ``DINOV3_7B_OVERRIDES + overrides`` on the meta device and read its counts.

    Nothing is allocated (``torch.device("meta")``); the parameter counts are those of the modules
    medfoundry would train, so a registry or head change shows up in the plan.
    """
    from medfoundry.config import load_config
    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry.models.backbone import Backbone

    cfg = load_config(None, [*DINOV3_7B_OVERRIDES, *(overrides or [])])
    if cfg.dino.head.kind != "dino" or (cfg.dino.ibot_head.kind != "dino"):
        raise ValueError("the memory plan models DINO heads (kind: dino) only")
    with torch.device("meta"):
        method = DINOMethod(cfg.model, cfg.dino, total_steps=1)
    student, teacher = method.student, method.teacher
    backbone: Backbone = student["backbone"]
    in_backbones = {id(p) for m in method.modules() if isinstance(m, Backbone) for p in m.parameters()}
    mlp = backbone.vit.blocks[0].mlp
    use_ibot = cfg.dino.ibot_weight > 0
    return PlanInputs(
        model_name=cfg.model.name,
        dim=backbone.embed_dim,
        depth=backbone.depth,
        num_heads=backbone.vit.blocks[0].attn.num_heads,
        mlp_hidden=(mlp.fc1_g if hasattr(mlp, "fc1_g") else mlp.fc1).out_features,
        patch=backbone.patch_size,
        prefix_tokens=int(backbone.vit.num_prefix_tokens),
        in_chans=backbone.in_chans,
        backbone_params=sum(p.numel() for p in backbone.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        student_trainable=sum(p.numel() for p in student.parameters() if p.requires_grad),
        student_head_trainable=sum(p.numel() for n, p in student.named_parameters()
                                   if p.requires_grad and not n.startswith("backbone.")),
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        block_params=sum(p.numel() for p in backbone.vit.blocks[0].parameters()),
        root_params=sum(p.numel() for p in method.parameters() if id(p) not in in_backbones),
        dino_head=_head_shape(cfg.dino.head),
        ibot_head=(_head_shape(cfg.dino.ibot_head if cfg.dino.ibot_separate_head else cfg.dino.head)
                   if use_ibot else None),
        n_global=cfg.crops.n_global,
        global_size=cfg.crops.global_size,
        n_local=cfg.crops.n_local,
        local_size=cfg.crops.local_size,
        mask_probability=cfg.dino.mask_probability,
        mask_ratio_mean=(cfg.dino.mask_ratio_min + cfg.dino.mask_ratio_max) / 2,
    )


def state_bytes(inp: PlanInputs, n_gpus: int, master_bytes: int = 4) -> dict[str, float]:
    """Sharded model state per GPU: student weights, gradients, AdamW moments, teacher (module docstring)."""
    return {
        "student weights": master_bytes * inp.student_params / n_gpus,
        "gradients": master_bytes * inp.student_trainable / n_gpus,
        "AdamW exp_avg + exp_avg_sq": 2 * master_bytes * inp.student_trainable / n_gpus,
        "teacher EMA weights": master_bytes * inp.teacher_params / n_gpus,
    }


def fsdp_transient_bytes(inp: PlanInputs) -> dict[str, float]:
    """Unsharded bf16 copies and gradients FSDP2 holds during the backward (module docstring)."""
    return {
        "root unit (both towers' heads), bf16": 2.0 * inp.root_params,
        "student heads' unsharded bf16 grads": 2.0 * inp.student_head_trainable,
        "2 gathered blocks + their grads": 10.0 * inp.block_params,
    }


def per_step_bytes(inp: PlanInputs) -> dict[str, float]:
    """Batch-independent activations: the weight-normalised prototype layers' recomputed weights."""
    heads = [inp.dino_head] + ([inp.ibot_head] if inp.ibot_head is not None else [])
    return {"weight-norm prototype weights": float(sum(2 * h.out_dim * h.bottleneck_dim + 4 * h.out_dim
                                                       for h in heads))}


def block_saved_bytes_per_token(dim: int, mlp_hidden: int, num_heads: int, norm_fp32: bool = True,
                                fp8: str = "off") -> int:
    """Bytes one transformer block saves for the backward, per token (``a_block``, module docstring).

    ``norm_fp32``: layer_norm runs in fp32 (CUDA autocast) rather than in bf16 (CPU autocast).
    ``fp8="fp8-saved"``: the hypothetical linear that keeps its inputs in fp8 (4D + H bytes less).
    """
    if norm_fp32:
        saved = 32 * dim + 8 * mlp_hidden + 4 * num_heads + 16
    else:
        saved = 26 * dim + 8 * mlp_hidden + 4 * num_heads + 8
    if fp8 == "fp8-saved":
        saved -= 4 * dim + mlp_hidden
    return saved


def head_mlp_saved_bytes(in_dim: int, head: HeadShape) -> int:
    """Bytes a DINO head's MLP saves per token: linear and GELU inputs, the normalised bottleneck."""
    return 2 * (in_dim + 2 * (head.nlayers - 1) * head.hidden_dim + 2 * head.bottleneck_dim) + 4


def activation_bytes_per_image(inp: PlanInputs, mode: Mode) -> dict[str, float]:
    """Activation bytes of one image (all its crops) alive at the start of the backward (module docstring)."""
    d, t_s = inp.dim, inp.student_tokens
    a_block = block_saved_bytes_per_token(d, inp.mlp_hidden, inp.num_heads, True, mode.fp8)
    if mode.checkpointing:
        blocks = inp.depth * t_s * 2 * d + t_s * a_block
    else:
        blocks = inp.depth * t_s * a_block
    crops = inp.n_global + inp.n_local
    k = inp.dino_head.out_dim
    out = {
        "blocks": float(blocks),
        "gradient flow": float(t_s * 4 * d),
        "embedding": float(2 * inp.in_chans * (inp.n_global * inp.global_size**2 + inp.n_local * inp.local_size**2)),
        "final norm": float(t_s * (4 * d + 8)),
        "DINO head + loss": float(crops * (head_mlp_saved_bytes(d, inp.dino_head) + 12 * k)),
        "teacher targets": float(inp.n_global * 8 * k),
    }
    if inp.ibot_head is not None:
        ki = inp.ibot_head.out_dim
        out["iBOT head + loss + targets"] = inp.masked_patches * (head_mlp_saved_bytes(d, inp.ibot_head) + 18 * ki)
    return out


def largest_batch(fixed: float, per_image: float, budget: float) -> int:
    """The largest per-GPU batch with ``fixed + B * per_image <= budget`` (0 when even one image does not fit)."""
    if per_image <= 0:
        raise ValueError("per-image bytes must be positive")
    return max(0, int((budget - fixed) // per_image))


def checkpoint_bytes(inp: PlanInputs, n_gpus: int, master_bytes: int = 4) -> dict[str, float]:
    """What saving costs per rank: the periodic sharded checkpoint and the sharded best checkpoint (``best.dcp``)."""
    per_rank = (master_bytes * (inp.student_params + inp.teacher_params)
                + 2 * master_bytes * inp.student_trainable) / n_gpus
    return {
        "periodic .dcp: bytes each rank writes": per_rank,
        "periodic .dcp: extra GPU bytes": 0.0,
        "best.dcp: bytes each rank writes (fp32 method)": 4.0 * (inp.student_params + inp.teacher_params) / n_gpus,
        "best.dcp: extra GPU bytes": 0.0,
    }


def plan(inp: PlanInputs, n_gpus: int = 8, capacity: float = H100_80GB_BYTES, master_bytes: int = 4,
         batches: tuple[int, ...] = (DINOV3_7B_BATCH_PER_GPU,)) -> MemoryPlan:
    """The per-GPU plan of every mode in :data:`MODES` for ``n_gpus`` GPUs of ``capacity`` bytes."""
    if n_gpus < 1:
        raise ValueError(f"n_gpus must be >= 1, got {n_gpus}")
    state = state_bytes(inp, n_gpus, master_bytes)
    transient = fsdp_transient_bytes(inp)
    per_step = per_step_bytes(inp)
    result = MemoryPlan(inp, n_gpus, capacity, master_bytes, state, transient, per_step, [],
                        checkpoint_bytes(inp, n_gpus, master_bytes))
    fixed = sum(state.values()) + sum(transient.values()) + sum(per_step.values())
    for mode in MODES:
        per_image = activation_bytes_per_image(inp, mode)
        total = sum(per_image.values())
        row = ModeResult(mode, per_image, total, fixed, largest_batch(fixed, total, result.budget))
        row.peak_at = {b: fixed + b * total for b in batches}
        result.modes.append(row)
    return result


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def format_plan(p: MemoryPlan) -> str:
    """The plan as text: counts, the per-GPU state and transients, one table row per mode, checkpoints."""
    i = p.inputs
    gpus = f"{p.n_gpus}×H100 80 GB" if p.capacity == H100_80GB_BYTES else f"{p.n_gpus} GPUs of {_gib(p.capacity)} GiB"
    master = {4: "fp32", 2: "bf16"}.get(p.master_bytes, f"{p.master_bytes}-byte")
    lines = [
        f"Memory plan (analytic): {i.model_name} DINO + iBOT on {gpus}, FSDP2, bf16 compute, {master} master weights",
        f"  parameters: backbone {i.backbone_params:,}; student {i.student_params:,} ({i.student_trainable:,} "
        f"trainable), teacher "
        f"{i.teacher_params:,}; one block {i.block_params:,}; root unit (heads of both towers) {i.root_params:,}",
        f"  crops: {i.n_global} x {i.global_size} px + {i.n_local} x {i.local_size} px, patch {i.patch}: "
        f"{i.tokens(i.global_size)} / {i.tokens(i.local_size)} tokens, {i.student_tokens} student tokens per image, "
        f"{i.masked_patches:.1f} iBOT-masked patches per image",
        "",
        f"  {'per GPU':<58}{'bytes':>16}{'GiB':>9}",
    ]
    for title, part in (("sharded state", p.state), ("FSDP2 transients", p.transient), ("per step", p.per_step)):
        for name, value in part.items():
            lines.append(f"  {title + ': ' + name:<58}{value:>16,.0f}{_gib(value):>9}")
    fixed = p.modes[0].fixed
    lines.append(f"  {'fixed total (all modes)':<58}{fixed:>16,.0f}{_gib(fixed):>9}")
    lines.append(f"  budget: (1 - {HEADROOM:.0%}) x {_gib(p.capacity)} GiB - {_gib(RESERVE_BYTES)} GiB reserve = "
                 f"{_gib(p.budget)} GiB")
    lines.append("")
    batches = list(p.modes[0].peak_at)
    head = f"  {'mode':<30}{'act/image GiB':>14}{'blocks GiB':>12}" + "".join(
        f"{f'peak @{b} GiB':>15}" for b in batches) + f"{'max batch/GPU':>15}"
    lines.append(head)
    for row in p.modes:
        lines.append(f"  {row.mode.name:<30}{_gib(row.per_image_total):>14}{_gib(row.per_image['blocks']):>12}"
                     + "".join(f"{_gib(row.peak_at[b]):>15}" for b in batches) + f"{row.largest_batch:>15}")
    lines.append("")
    for name, value in p.checkpoint.items():
        lines.append(f"  {'checkpoint ' + name:<58}{value:>16,.0f}{_gib(value):>9}")
    return "\n".join(lines)
