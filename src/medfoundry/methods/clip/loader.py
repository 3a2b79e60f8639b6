"""The ``clip`` method's image-report training loader."""

from __future__ import annotations

from medfoundry.methods.clip.config import ClipRunConfig
from medfoundry.methods.clip.method import ClipMethod


def build_clip_loader(cfg: ClipRunConfig, method: ClipMethod, start_step: int, rank: int, world_size: int):
    """The image-report loader of ``clip.data`` for one rank at ``start_step`` (see :mod:`medfoundry.data.pair_loader`).

    Also sets dataset normalisation statistics on ``method`` (``normalize=dataset``) and warns with
    counts when reports are longer than the text context.
    """
    from medfoundry.data.pair_loader import PairImageTransform, build_pair_loader, estimate_pixel_stats
    from medfoundry.data.pairs import build_pairs
    from medfoundry.models.text.tokenize import check_truncation

    c = cfg.clip
    pairs = build_pairs(c.data)
    channels = cfg.model.in_chans
    if c.preprocess.normalize == "dataset":
        mean, std = estimate_pixel_stats(pairs, PairImageTransform(c.preprocess, channels, train=False),
                                         c.preprocess.stats_samples)
        method.set_pixel_stats(mean, std)
    hint = "Or train on a section (clip.data.sections=[impression])."  # the tokenizer adds its tower's advice
    check_truncation(method.tokenizer, pairs.texts, c.text.truncation_check, "reports", hint)
    return build_pair_loader(pairs, c.preprocess, channels, method.tokenizer, cfg.train.batch_size, cfg.train.seed,
                             start_step, rank, world_size, c.data.num_workers)
