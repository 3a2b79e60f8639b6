"""Component configs of image-report contrastive training (method=clip; its section ``clip`` is composed of
these in ``medfoundry.methods.clip.config``).

The parts: the image tower (any registered backbone from ``model`` plus
a projection), the text tower (OpenAI/CheXzero CLIP text transformer via ``open_clip_torch`` or an HF
BERT-family model from a local folder), the loss (symmetric InfoNCE of Radford et al. 2021 or SigLIP
of Zhai et al. 2023), image preprocessing, the image-report data and in-training evaluation
(CheXzero-style zero-shot classification, Tiu et al. 2022, and image<->text Recall@K). See docs/clip.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional


@dataclass
class ClipImageConfig:
    """Image tower: the backbone of ``model`` + token pooling + a projection to ``clip.embed_dim``.

    LoRA and partial freezing of the image backbone come from the ``adapt`` section (``models.lora``).
    """

    pool: Literal["token", "avg"] = "token"  # class token (default) or mean of patch tokens (timm DINOv3's default)
    proj: Literal["linear", "mlp"] = "linear"  # projection head to the shared embedding
    proj_hidden_dim: int = 2048  # hidden width of the MLP projection
    proj_bias: bool = False  # bias in the (last) projection layer
    freeze: bool = False  # freeze the whole backbone (the projection still trains; LiT, Zhai et al. 2022)


@dataclass
class ClipTextConfig:
    """Text tower: open_clip's CLIP text transformer (BPE) or an HF BERT-family model (WordPiece)."""

    kind: Literal["clip", "hf"] = "clip"  # clip: OpenAI/CheXzero text transformer; hf: local HF model folder
    context_length: int = 77  # max tokens incl. special tokens; CLIP towers stretch 77 positions (Long-CLIP)
    keep_positions: int = 20  # Long-CLIP: leading position embeddings copied unchanged when stretching
    pretrained: Optional[str] = None  # clip: OpenAI-layout state dict or JIT archive (OpenAI CLIP, CheXzero)
    width: int = 512  # clip: transformer width (must match `pretrained`; OpenAI ViT-B/32 and CheXzero: 512)
    heads: int = 8  # clip: attention heads
    layers: int = 12  # clip: transformer blocks
    vocab_size: int = 49408  # clip: BPE vocabulary of open_clip's tokenizer
    mlp_ratio: float = 4.0  # clip: MLP expansion
    native_dim: int = 0  # clip: output width of text_projection (0 = embed_dim, or width when proj is linear/mlp)
    quick_gelu: bool = True  # clip: QuickGELU activation as OpenAI CLIP / CheXzero were trained with
    hf_path: str = ""  # hf: local folder with config.json, tokenizer files and (unless hf_random_init) weights
    hf_random_init: bool = False  # hf: build from config.json only (random weights), e.g. to train from scratch
    pooling: Literal["cls", "mean"] = "cls"  # hf: first token or attention-masked mean of the last hidden states
    proj: Literal["auto", "none", "linear", "mlp"] = "auto"  # auto: clip -> native text_projection, hf -> linear
    proj_hidden_dim: int = 2048  # hidden width of the MLP projection
    freeze: bool = False  # freeze the text trunk (projection still trains)
    grad_checkpointing: bool = False  # recompute text-block activations in backward
    lora_rank: int = 0  # LoRA rank on the text trunk's linear layers (0 = off; trunk frozen except LoRA)
    lora_alpha: float = 16.0  # LoRA scaling numerator (update = alpha / rank * B A)
    lora_targets: list[str] = field(default_factory=lambda: ["c_fc", "c_proj", "query", "value"])  # name suffixes
    truncation_check: int = 2000  # reports tokenised when the loader starts, to warn with truncation counts


@dataclass
class ClipLossConfig:
    """Contrastive objective and its learnable logit scale."""

    kind: Literal["infonce", "siglip"] = "infonce"  # symmetric InfoNCE (CLIP) or pairwise sigmoid (SigLIP)
    temperature: float = 0.07  # initial temperature: logit_scale = log(1 / temperature) (InfoNCE)
    learn_temperature: bool = True  # learn the logit scale
    max_logit_scale: float = 100.0  # exp(logit_scale) clamped to at most this after every step (CLIP)
    siglip_init_scale: float = 10.0  # SigLIP initial exp(logit_scale) (Zhai et al. 2023)
    siglip_init_bias: float = -10.0  # SigLIP initial logit bias
    local_loss: bool = True  # under DDP: local rows against all gathered columns (open_clip's local loss)
    gather_with_grad: bool = True  # under DDP: gathered features carry gradients back to their rank


@dataclass
class ClipPreprocessConfig:
    """Image preprocessing presets (CheXzero: 320 px stored, 224 px bicubic, OpenAI CLIP normalisation)."""

    stored_size: int = 320  # shorter side images are resized to first (CheXzero's HDF5 is already 320 px)
    size: int = 224  # model input side (train_crop in training, resize + centre crop in evaluation)
    # training crop: random_resized (area crop_scale, aspect 3/4-4/3) or center (shorter side to size, then a
    # centre crop, as in evaluation: no random scale)
    train_crop: Literal["random_resized", "center"] = "random_resized"
    crop_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])  # area fraction of the random crop
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"  # resize interpolation
    normalize: Literal["openai_clip", "imagenet", "dataset", "custom"] = "openai_clip"  # mean/std preset
    mean: list[float] = field(default_factory=list)  # custom: per-channel mean (of [0, 1] pixels)
    std: list[float] = field(default_factory=list)  # custom: per-channel std
    stats_samples: int = 256  # dataset: training images used to estimate mean/std
    hflip_prob: float = 0.0  # off by default: a flip swaps left and right against the report's wording
    color_jitter_prob: float = 0.0  # probability of colour jitter per training image (0 = off)
    # jitter strengths [brightness, contrast, saturation, hue] with torchvision ColorJitter semantics (factors
    # uniform in [max(0, 1 - s), 1 + s], hue shift in [-h, h], the four in a random order); grey (1-channel)
    # images get brightness and contrast only, since saturation and hue are undefined for them
    color_jitter: list[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])


@dataclass
class ClipDataConfig:
    """Image-report pairs: a CSV/Parquet manifest, CheXzero's HDF5 + CSV layout, or the offline demo."""

    kind: Literal["manifest", "chexzero", "demo"] = "manifest"  # pair source
    manifest: str = ""  # manifest: CSV/Parquet of pairs; chexzero: CSV of report text aligned with the HDF5 rows
    image_column: str = "image"  # manifest: column of image paths
    image_root: str = ""  # base folder of relative image paths (default: the manifest's folder)
    text_column: str = "report"  # column of report text (CheXzero's CSV: impression)
    sections: list[str] = field(default_factory=list)  # e.g. [impression]: a column of that name or a heading
    section_fallback: Literal["full", "skip"] = "full"  # when no chosen section exists: whole report or drop pair
    hdf5: str = ""  # chexzero: HDF5 file of 320 px images
    hdf5_dataset: str = "cxr"  # chexzero: dataset name inside the HDF5 file
    hdf5_scale: float = 255.0  # chexzero: stored pixel value of white (images are mapped to [0, 1])
    demo_dir: str = ".cache/clip_demo"  # demo: where the real pydicom-data frames are exported
    demo_seed: int = 0  # demo: seed of the (arbitrary, unpaired) report-to-image assignment
    max_pairs: int = 0  # use only the first N pairs (0 = all)
    num_workers: int = 0  # DataLoader worker processes


@dataclass
class ZeroShotConfig:
    """External labelled set for zero-shot classification (CheXzero prompt pairs or class-name ensembles)."""

    kind: Literal["none", "manifest", "hdf5", "demo"] = "none"  # labelled image source
    labels: str = ""  # CSV/Parquet: image column + label columns (manifest) or label rows aligned with hdf5
    hdf5: str = ""  # hdf5: images (CheXzero test layout)
    hdf5_dataset: str = "cxr"  # hdf5: dataset name
    hdf5_scale: float = 255.0  # hdf5: stored value of white
    image_column: str = "image"  # manifest: column of image paths
    image_root: str = ""  # base folder of relative image paths (default: the labels file's folder)
    findings: list[str] = field(default_factory=list)  # binary label columns (1 pos, 0 neg, else ignored)
    positive_template: str = "{}"  # CheXzero positive prompt (the finding name)
    negative_template: str = "no {}"  # CheXzero negative prompt
    label_column: str = ""  # multi-class: column holding the class of each image
    class_names: list[str] = field(default_factory=list)  # multi-class: classes in order (default: sorted values)
    templates: list[str] = field(default_factory=lambda: ["{}"])  # multi-class prompt templates (ensembled)
    max_images: int = 0  # evaluate on the first N images (0 = all)
    bootstrap: int = 1000  # bootstrap resamples for the AUC confidence intervals (0 = none)
    split: Literal["val", "test"] = "test"  # what this labelled set is: only a val set may choose best.pt


@dataclass
class RetrievalEvalConfig:
    """Image<->text Recall@K pairs: the training pairs themselves or another pair source."""

    source: Literal["none", "train", "data"] = "none"  # train: clip.data (no augmentation); data: retrieval.data
    data: ClipDataConfig = field(default_factory=ClipDataConfig)  # used when source=data
    max_pairs: int = 1000  # evaluate on the first N pairs
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # recall cut-offs
    split: Literal["val", "test"] = "test"  # what source=data's pairs are: only held-out val pairs may choose best.pt


@dataclass
class ValLossConfig:
    """Contrastive loss on held-out image-report pairs (evaluation preprocessing, the training loss module).

    The first ``max_pairs`` pairs are scored in consecutive batches of ``batch_size`` pairs (each batch's
    other pairs are its negatives, as in a training step); a last incomplete batch is left out.
    """

    every_steps: int = 0  # compute every N steps and at the last step (0 = off); logged as val/contrastive_loss
    data: ClipDataConfig = field(default_factory=ClipDataConfig)  # the held-out pair source
    max_pairs: int = 1000  # use the first N pairs (0 = all)
    batch_size: int = 0  # pairs per loss batch (0 = train.batch_size, so the value compares with the train loss)


@dataclass
class ClipEvalConfig:
    """Zero-shot and retrieval evaluation every N steps, validation loss and best-checkpoint tracking."""

    every_steps: int = 0  # evaluate every N steps (0 = off)
    batch_size: int = 64  # images / texts per encoder call
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalEvalConfig = field(default_factory=RetrievalEvalConfig)
    val_loss: ValLossConfig = field(default_factory=ValLossConfig)  # held-out contrastive loss (own interval)
    best_metric: str = "val/contrastive_loss"  # decides RUN/best.pt: a validation metric ("" = no best checkpoint)
    best_mode: Literal["auto", "max", "min"] = "auto"  # auto: smaller for losses and ranks, else larger


def best_direction(ec: ClipEvalConfig) -> str:
    """``clip.eval.best_mode`` resolved: ``auto`` is ``min`` for a loss or a rank (``val/contrastive_loss``,
    ``retrieval/i2t_median_rank``) and ``max`` for everything else (AUCs, accuracies, recalls)."""
    if ec.best_mode != "auto":
        return ec.best_mode
    name = ec.best_metric.rsplit("/", 1)[-1]
    return "min" if name.endswith("loss") or name.endswith("_rank") else "max"


def check_clip_best_metric(ec: ClipEvalConfig) -> None:
    """``clip.eval.best_metric`` (when in-training evaluation runs) is measured on validation data: the held-out
    pairs' ``val/contrastive_loss``, or zero-shot / retrieval on a set declared ``split: val``."""
    from medfoundry.config.loader import ConfigError

    metric = ec.best_metric
    if not metric or (ec.every_steps <= 0 and ec.val_loss.every_steps <= 0):
        return
    if metric.startswith("val/"):
        return
    if metric.startswith("zeroshot/") and ec.zeroshot.split == "val":
        return
    if metric.startswith("retrieval/") and ec.retrieval.source == "data" and ec.retrieval.split == "val":
        return
    where = {"zeroshot/": "clip.eval.zeroshot (split: test)", "retrieval/": "clip.eval.retrieval (the training "
             "pairs or a set with split: test)"}
    source = next((w for p, w in where.items() if metric.startswith(p)), "no validation set")
    raise ConfigError(f"'clip.eval.best_metric' = {metric!r} is computed on {source}; best.pt is chosen on "
                      "validation only: use 'val/contrastive_loss' with best_mode min (held-out pairs in "
                      "clip.eval.val_loss), point the zero-shot or retrieval set at validation data and set its "
                      "split: val, or set best_metric '' for no best checkpoint")


def check_color_jitter(p: ClipPreprocessConfig) -> None:
    """``color_jitter_prob`` in [0, 1]; four strengths, brightness/contrast/saturation >= 0, hue in [0, 0.5]."""
    from medfoundry.config.loader import ConfigError

    if not 0.0 <= p.color_jitter_prob <= 1.0:
        raise ConfigError(f"'clip.preprocess.color_jitter_prob' = {p.color_jitter_prob} must be in [0, 1]")
    cj = p.color_jitter
    if len(cj) != 4 or min(cj[:3]) < 0 or not 0.0 <= cj[3] <= 0.5:
        raise ConfigError(f"'clip.preprocess.color_jitter' = {cj} must be [brightness, contrast, saturation, hue] "
                          "with the first three >= 0 and hue in [0, 0.5]")


def check_val_loss(v: ValLossConfig) -> None:
    """Non-negative interval/sizes; a pair source that names its files when the validation loss is on."""
    from medfoundry.config.loader import ConfigError

    for key in ("every_steps", "max_pairs", "batch_size"):
        if getattr(v, key) < 0:
            raise ConfigError(f"'clip.eval.val_loss.{key}' = {getattr(v, key)} must be >= 0")
    if v.every_steps > 0 and v.data.kind in ("manifest", "chexzero") and not v.data.manifest:
        raise ConfigError(f"'clip.eval.val_loss.every_steps' = {v.every_steps} needs held-out pairs: set "
                          "'clip.eval.val_loss.data.manifest' (and '.hdf5' for kind=chexzero)")
    if v.every_steps > 0 and v.data.kind == "chexzero" and not v.data.hdf5:
        raise ConfigError("'clip.eval.val_loss.data.kind' = 'chexzero' needs 'clip.eval.val_loss.data.hdf5'")
