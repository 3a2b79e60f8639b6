"""The typed configuration schema: the sections every run has and the component configs below the methods.

Every field has a default and a one-line comment; ``medfoundry config RECIPE`` prints the resolved
tree. A method's own sections live in its package (``methods/dino/config.py``, ``methods/clip/config.py``,
``methods/distill/config.py``), which also defines the method's run config (these common sections +
its own). Each component receives only its own section (e.g. the backbone factory gets ``ModelConfig``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal, Optional

from medfoundry.config.adapt import AdaptConfig


@dataclass
class ModelConfig:
    """Backbone construction (see ``medfoundry models`` for registered names)."""

    name: str = "vit_tiny_patch8"  # registered backbone name
    img_size: int = 224  # native input size: sets the absolute position-embedding grid
    in_chans: int = 3  # input channels (1 for grey CT/X-ray, 3 for RGB or 2.5D/multi-window)
    drop_path_rate: float = 0.0  # stochastic depth rate (student only)
    pretrained: Optional[str] = None  # local checkpoint to start from (no hub access at run time)
    pretrained_format: str = "auto"  # auto|dinov2|dinov3|hf|timm|medfoundry
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory


@dataclass
class HeadConfig:
    """Projection head: DINO's MLP -> bottleneck -> weight-normalised prototypes (Caron et al. 2021), or a plain MLP."""

    kind: Literal["dino", "mlp"] = "dino"  # dino: bottleneck + weight-normed prototypes; mlp: plain MLP (DINO-X)
    out_dim: int = 65536  # number of prototypes K (the last layer's width)
    hidden_dim: int = 2048  # MLP hidden width (0 = the backbone's width, as DINO-X's Linear(d, d))
    bottleneck_dim: int = 256  # kind=dino: L2-normalised bottleneck before the prototypes
    nlayers: int = 3  # linear layers before the prototypes (dino) / in all (mlp), >= 1


@dataclass
class CropsConfig:
    """Multi-crop views (Caron et al. 2020/2021): global and local crops and their augmentations."""

    n_global: int = 2  # number of global crops (the teacher sees these)
    global_size: int = 224  # side of a global crop in pixels
    global_scale: list[float] = field(default_factory=lambda: [0.32, 1.0])  # area fraction range
    n_local: int = 8  # number of local crops (student only)
    local_size: int = 96  # side of a local crop in pixels
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.32])  # area fraction range
    hflip_prob: float = 0.5  # horizontal flip probability
    color_jitter_prob: float = 0.0  # colour jitter probability (off for medical data; DINOv2 0.8)
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])  # jitter strengths: b, c, s, hue
    grayscale_prob: float = 0.0  # random greyscale probability (RGB only; DINOv2 0.2)
    global1_blur_prob: float = 0.0  # Gaussian blur probability of the first global crop (DINOv2 1.0)
    global2_blur_prob: float = 0.0  # ... of the second and further global crops (DINOv2 0.1)
    local_blur_prob: float = 0.0  # ... of each local crop (DINOv2 0.5)
    solarize_prob: float = 0.0  # solarisation probability, second global crop only (DINOv2 0.2)
    hed_prob: float = 0.0  # HED stain augmentation probability per crop (H&E RGB only; Tellez et al. 2018)
    hed_sigma: float = 0.05  # HED strength: stain scale in [1-s, 1+s], shift in [-s, s] (OD units; 0.05 light)
    region_crop_prob: float = 0.0  # chance a crop must contain the labelled region, if any (DINO-MX)
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"  # resize interpolation
    device: Literal["cpu", "gpu"] = "cpu"  # crops made by DataLoader workers, or batched on the training device
    storage_size: int = 512  # crops.device=gpu: canvas side workers place each decoded image on
    gpu_backend: Literal["grid_sample", "roi_align"] = "grid_sample"  # crops.device=gpu: resampling
    normalize: Literal["custom", "imagenet", "tcga"] = "custom"  # custom = mean/std below; a preset sets them
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # per-channel mean
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # per-channel std


@dataclass
class OptimConfig:
    """AdamW with warm-up + cosine learning rate and cosine weight decay (schedules by step)."""

    name: Literal["adamw", "sgd"] = "adamw"  # optimizer: AdamW (decoupled decay) or SGD with momentum (CheXzero)
    momentum: float = 0.9  # SGD momentum (optim.name=sgd)
    lr: float = 5e-4  # peak learning rate (for the global batch; not rescaled)
    min_lr: float = 1e-6  # final learning rate of the cosine
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.04  # weight decay at step 0
    weight_decay_end: float = 0.4  # weight decay at the last step (cosine)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    clip_grad: float = 3.0  # max global grad norm (0 = no clipping)
    layer_decay: float = 1.0  # layer-wise lr decay (1.0 = off)
    patch_embed_lr_mult: float = 1.0  # patch embedding's lr multiplier, times the layer decay (DINOv2: 0.2)
    freeze_backbone_steps: int = 0  # head-only warm-up: backbone frozen for this many steps


@dataclass
class TrainConfig:
    """The step-based loop."""

    steps: int = 1000  # total optimizer steps
    schedule_steps: int = 0  # horizon of the cosine schedules (0 = train.steps); fix it to extend runs exactly
    batch_size: int = 64  # global batch size (split evenly over ranks) of one forward/backward (micro-batch)
    grad_accum_steps: int = 1  # micro-batches per optimizer step: the step's batch is batch_size x this
    seed: int = 0  # seed for init, data order and augmentation
    device: str = "auto"  # auto|cpu|cuda|cuda:N
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto = bf16 autocast on GPU, fp32 on CPU
    log_every: int = 1  # steps between metric lines
    checkpoint_every: int = 500  # steps between checkpoints (the last step always saves)
    keep_last: int = 3  # checkpoints kept on disk
    max_nonfinite_steps: int = 5  # stop after this many non-finite losses in a row
    nonfinite_check: Literal["auto", "host", "device"] = "auto"  # where a NaN step is skipped (train/nonfinite.py)
    progress: bool = True  # progress: a bar in a terminal, else a plain line every train.log_every steps
    tensorboard: bool = True  # write TensorBoard event files
    tracking: list[Literal["wandb", "mlflow"]] = field(default_factory=list)  # experiment trackers (off: [])
    tracking_project: str = "medfoundry"  # W&B project and MLflow experiment of the tracked run
    tracking_name: str = ""  # name of the tracked run ("" = the run folder's name)
    tracking_uri: str = ""  # MLflow tracking URI ("" = $MLFLOW_TRACKING_URI or MLflow's default)
    allow_config_change: bool = False  # resume although config.yaml differs in keys that change the run


@dataclass
class DistConfig:
    """Parallelism, applied from outside the model."""

    strategy: Literal["ddp", "fsdp"] = "ddp"  # data parallel wrapper when world size > 1
    backend: str = "auto"  # auto = nccl on GPU, gloo on CPU
    compile: bool = False  # torch.compile each transformer block
    float8: bool = False  # Float8 training of block linears via torchao (H100-class GPUs; large models)


@dataclass
class RunConfig:
    """The sections every run has; a method's run config (in its package, e.g. ``methods/dino/config.py``) adds its own.

    ``method`` selects that class when a recipe is loaded (:func:`medfoundry.config.loader.load_config`
    looks it up in the catalog the method packages register, :mod:`medfoundry.config.names`), so a run's
    ``config.yaml`` holds the common sections and only the selected method's sections.
    """

    output_dir: str = "runs/default"  # run folder (config, metrics, checkpoints, TensorBoard)
    method: str = "dino"  # training method (registered: `medfoundry train --help`)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)

    #: Top-level keys in the order ``config.yaml`` prints them (sections of the method class included).
    print_order: ClassVar[tuple[str, ...]] = ("output_dir", "method", "model", "optim", "train", "dist", "adapt")

    def check(self) -> None:
        """Cross-field rules of the method's own sections (overridden by a method's run config); raise ConfigError."""

    def check_names(self) -> None:
        """Registered names in the method's own sections (overridden by a method's run config); raise ConfigError."""
