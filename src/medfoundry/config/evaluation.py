"""Configuration of frozen-feature evaluation (in training and from the CLI) and the health monitors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EntropyWallConfig:
    """Entropy-wall detector: the DINO loss staying near ln K (DINO-X: "near ln(K) for thousands of steps")."""

    enabled: bool = True  # watch the logged dino_loss_frac = DINO loss / ln K (needs method=dino)
    after_steps: int = 200  # ignore steps before this one (an untrained student starts near ln K)
    patience: int = 50  # consecutive logged steps at or above the threshold before the warning
    threshold_frac: float = 0.9  # "near ln K": a DINO loss at or above this fraction of ln K counts as the wall
    fatal: bool = False  # stop training (RepresentationHealthError) instead of warning


@dataclass
class PrototypeCollapseConfig:
    """Prototype (head) collapse detector: the teacher sends (almost) every image to a few prototypes."""

    enabled: bool = True  # watch the logged teacher_effective_prototypes_frac (needs method=dino)
    after_steps: int = 200  # ignore steps before this one
    patience: int = 50  # consecutive logged steps below min_effective_frac before the warning
    min_effective_frac: float = 0.1  # exp(entropy of the mean teacher target) / min(K, rows) below this = collapsed
    fatal: bool = False  # stop training (RepresentationHealthError) instead of warning


@dataclass
class CollapseConfig:
    """Collapse detector: feature std or active dimensions falling towards zero (remedy: KoLeo)."""

    enabled: bool = True  # watch the logged teacher feature std and the evaluated active dimensions
    after_steps: int = 200  # ignore steps before this one
    patience: int = 50  # consecutive logged steps with a collapsed teacher feature std before the warning
    eval_patience: int = 2  # consecutive in-training evaluations with collapsed features before the warning
    min_feature_std: float = 0.01  # mean per-dim std of L2-normalised features below this counts as collapsed
    min_active_dims_frac: float = 0.1  # share of dimensions with std > 0.01 below this counts as collapsed
    fatal: bool = False  # stop training (RepresentationHealthError) instead of warning


@dataclass
class EvalConfig:
    """Evaluation on a labelled set (every N training steps, and ``medfoundry eval``) and the monitors."""

    every_steps: int = 0  # run in-training evaluation every N steps (0 = off); the last step always evaluates if on
    data: str = ""  # labelled set: manifest (path,label[,split,series,patient]) or folder <label>/ or <split>/<label>/
    label_column: str = "label"  # manifest column holding the class label
    split_fractions: list[float] = field(default_factory=lambda: [0.6, 0.2, 0.2])  # train/val/test shares if unsplit
    split_seed: int = 0  # seed of that split (grouped by patient, else series, so slices of a volume stay together)
    img_size: int = 0  # side images are resized to for feature extraction (0 = crops.global_size)
    feature: Literal["cls", "mean_patch", "both"] = "cls"  # class token, mean patch token, or both concatenated
    aggregate: Literal["none", "series"] = "none"  # "series": mean of a series' slice features (3-D evaluation)
    tasks: list[str] = field(default_factory=lambda: ["knn", "linear", "health"])  # knn|linear|retrieval|health
    # retrieval = DINO-X's label-free view-retrieval ratio on retrieval_root (needs no eval.data)
    knn_k: list[int] = field(default_factory=lambda: [10, 20])  # neighbours for the weighted kNN
    knn_temperature: float = 0.07  # DINO's kNN vote temperature
    n_bootstrap: int = 200  # bootstrap resamples for the linear probe's confidence intervals
    retrieval_images: int = 4096  # N of DINO-X's view-retrieval ratio (its default; capped at the images available)
    retrieval_root: str = ""  # label-free images for the view retrieval: folder or prepared set ("" = data.root)
    retrieval_kind: str = ""  # data.kind of retrieval_root ("" = data.kind)
    retrieval_split: str = ""  # manifest/prepared split for the view retrieval ("" = data.split; DINO-X: val)
    retrieval_seed: int = 0  # seed of the image sample and of the two views drawn per image
    batch_size: int = 64  # images per forward pass during feature extraction
    best_metric: str = "val_knn_top1_k20"  # metric selecting RUN/best.pt: a val-split one ("" = no best checkpoint)
    best_mode: Literal["max", "min"] = "max"  # whether a higher or lower best_metric is better
    cache_features: bool = True  # cache extracted features on disk keyed by checkpoint identity (CLI eval)
    entropy_wall: EntropyWallConfig = field(default_factory=EntropyWallConfig)
    prototype_collapse: PrototypeCollapseConfig = field(default_factory=PrototypeCollapseConfig)
    collapse: CollapseConfig = field(default_factory=CollapseConfig)
