"""Text towers for image-report contrastive training and their tokenizers.

* :class:`~medfoundry.models.text.clip_text.ClipTextTower`: OpenAI/CheXzero CLIP text transformer
  (open_clip modules, loads OpenAI-layout state dicts by key, Long-CLIP position stretching).
* :class:`~medfoundry.models.text.hf_text.HFTextTower`: a BERT-family model from a local folder.
* :func:`build_text_tower` / :func:`build_tokenizer`: both from the ``clip.text`` config section.
"""

from __future__ import annotations

from medfoundry.config.clip import ClipTextConfig
from medfoundry.models.text.tokenize import ClipBPETokenizer, HFTokenizer, ReportTruncationWarning, TokenBatch


def build_tokenizer(cfg: ClipTextConfig) -> ClipBPETokenizer | HFTokenizer:
    """The tokenizer of the configured text tower (per-batch padding, truncation at ``context_length``)."""
    if cfg.kind == "clip":
        return ClipBPETokenizer(cfg.context_length)
    return HFTokenizer(cfg.hf_path, cfg.context_length)


def build_text_tower(cfg: ClipTextConfig, embed_dim: int, load_pretrained: bool = True):
    """The text tower of ``cfg`` producing ``embed_dim`` features (its projection included).

    ``clip``: the shape comes from ``clip.text`` (width, heads, layers, vocab_size, native_dim); with
    ``pretrained`` the OpenAI-layout weights are loaded by key (a shape mismatch names the key) and
    their positions stretched to ``context_length`` (Long-CLIP). The native ``text_projection`` must
    output ``embed_dim`` unless an extra projection (``proj: linear|mlp``) follows it. ``hf``:
    ``hf_path`` is loaded with ``local_files_only``. ``load_pretrained=False`` builds the same shapes
    without reading weights (used when a medfoundry checkpoint is loaded over them).
    """
    from medfoundry.models.projection import ProjectionHead

    if cfg.kind == "hf":
        from medfoundry.models.text.hf_text import HFTextTower

        proj = "linear" if cfg.proj == "auto" else cfg.proj
        tower = HFTextTower(cfg.hf_path, embed_dim, cfg.pooling, proj, cfg.proj_hidden_dim,
                            random_init=cfg.hf_random_init or not load_pretrained)
        if tower.max_positions and cfg.context_length > tower.max_positions:
            raise ValueError(f"clip.text.context_length={cfg.context_length} exceeds the model's "
                             f"{tower.max_positions} position embeddings ({cfg.hf_path})")
        return tower

    from medfoundry.models.text.clip_text import ClipTextTower, ProjectedTextTower, load_clip_checkpoint

    extra = cfg.proj in ("linear", "mlp")
    native = cfg.native_dim or (cfg.width if extra else embed_dim)
    tower = ClipTextTower(cfg.context_length, cfg.vocab_size, cfg.width, cfg.heads, cfg.layers, cfg.mlp_ratio,
                          output_dim=native, quick_gelu=cfg.quick_gelu)
    if cfg.pretrained and load_pretrained:
        tower.load_openai_state_dict(load_clip_checkpoint(cfg.pretrained), keep=cfg.keep_positions)
    if extra:
        return ProjectedTextTower(tower, ProjectionHead(tower.output_dim, embed_dim, cfg.proj, cfg.proj_hidden_dim))
    if tower.output_dim != embed_dim:
        raise ValueError(f"the CLIP text tower outputs {tower.output_dim}-d features but clip.embed_dim={embed_dim}; "
                         "set clip.embed_dim accordingly or add clip.text.proj=linear")
    return tower


__all__ = [
    "ClipBPETokenizer",
    "HFTokenizer",
    "ReportTruncationWarning",
    "TokenBatch",
    "build_text_tower",
    "build_tokenizer",
]
