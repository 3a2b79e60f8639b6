"""The dino method: active loss terms follow the config, the teacher is an EMA of the student."""

from __future__ import annotations

import pytest
import torch

from medfoundry.config import load_config
from medfoundry.methods.dino.method import DINOMethod

BASE = ["model.name=vit_tiny_patch8_rope", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=32",
        "dino.head.hidden_dim=16", "dino.head.bottleneck_dim=8"]


def _batch() -> dict:
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(2, 3, 16, generator=g) < 0.4
    return {"global_crops": torch.randn(2, 3, 1, 32, 32, generator=g),
            "local_crops": torch.randn(4, 3, 1, 16, 16, generator=g), "masks": masks}


@pytest.mark.parametrize(
    "extra,terms",
    [([], {"dino_loss"}),
     (["dino.ibot_weight=1", "dino.koleo_weight=0.1", "dino.kde_weight=0.05", "dino.gram_weight=1"],
      {"dino_loss", "ibot_loss", "koleo_loss", "kde_loss", "gram_loss"}),
     (["dino.ibot_weight=1", "dino.ibot_separate_head=true", "dino.centering=sinkhorn"], {"dino_loss", "ibot_loss"})],
)
def test_active_terms_and_total(extra: list[str], terms: set[str]) -> None:
    cfg = load_config(None, [*BASE, *extra])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    out = method(_batch(), step=0)
    present = {k for k in out if k.endswith("_loss")}
    assert present == terms
    weights = {"dino_loss": cfg.dino.dino_weight, "ibot_loss": cfg.dino.ibot_weight,
               "koleo_loss": cfg.dino.koleo_weight, "kde_loss": cfg.dino.kde_weight, "gram_loss": cfg.dino.gram_weight}
    expected = sum(weights[t] * out[t] for t in terms)
    torch.testing.assert_close(out["loss"].detach(), expected)
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())


@pytest.mark.parametrize("centering", ["center", "sinkhorn"])
def test_teacher_logits_kept_for_the_centres_only(centering: str) -> None:
    """The step's teacher logits are kept until ``after_optimizer_step`` only where the EMA centres need them:
    with Sinkhorn-Knopp targets nothing is kept (the (rows, K) logits are freed once the targets exist)."""
    cfg = load_config(None, [*BASE, "dino.ibot_weight=1", f"dino.centering={centering}"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    method.start_step(0)
    method(_batch(), step=0)
    assert set(method._pending) == ({"dino", "ibot"} if centering == "center" else set())
    center = method.dino_loss.center.clone()
    method.after_optimizer_step(0)
    assert method._pending == {}
    assert torch.equal(method.dino_loss.center, center) == (centering == "sinkhorn")


def test_gram_waits_for_its_start_step() -> None:
    cfg = load_config(None, [*BASE, "dino.gram_weight=1", "dino.gram_start_step=5"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    assert "gram_loss" not in method(_batch(), step=4)
    assert "gram_loss" in method(_batch(), step=5)


def test_teacher_is_ema_of_student_and_center_moves() -> None:
    cfg = load_config(None, [*BASE, "dino.teacher_momentum=0.9", "dino.teacher_momentum_end=0.9"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    t_before = {n: p.clone() for n, p in method.teacher.named_parameters()}
    method(_batch(), step=0)
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(1.0)
    method.after_optimizer_step(0)
    student = dict(method.student.named_parameters())
    for n, p in method.teacher.named_parameters():
        if student[n].requires_grad:
            torch.testing.assert_close(p, 0.9 * t_before[n] + 0.1 * student[n])
        else:  # frozen parameters (weight-norm gain, LoRA base weights) are not averaged
            torch.testing.assert_close(p, t_before[n])
    assert method.dino_loss.center.abs().sum() > 0


def test_last_layer_frozen_early() -> None:
    cfg = load_config(None, [*BASE, "dino.freeze_last_layer_steps=3"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    method(_batch(), step=0)["loss"].backward()
    method.before_optimizer_step(2)
    last = [p for n, p in method.student.named_parameters() if "last_layer" in n and p.requires_grad]
    assert last and all(p.grad is None for p in last)


def _reference_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """DINOv2's KoLeo (``dinov2/loss/koleo_loss.py``) written out: -mean log distance to the nearest other row."""
    z = torch.nn.functional.normalize(x, eps=eps, p=2, dim=-1)
    dots = z @ z.t()
    dots.view(-1)[:: z.shape[0] + 1].fill_(-1)
    nearest = dots.argmax(dim=1)
    return -torch.log(torch.nn.functional.pairwise_distance(z, z[nearest], 2, eps=eps) + eps).mean()


def _reference_kde(x: torch.Tensor, kappa: float = 5.0) -> torch.Tensor:
    """OpenMidnight's KDE term per crop: mean_i log sum_j exp(kappa cos(x_i, x_j)) (up to constants)."""
    z = torch.nn.functional.normalize(x, dim=-1)
    return torch.logsumexp(kappa * z @ z.t(), dim=1).mean()


def test_koleo_and_kde_are_summed_over_global_crops() -> None:
    """DINOv2 (ssl_meta_arch.py: sum over student_cls_tokens.chunk(2)) and OpenMidnight sum, not average."""
    cfg = load_config(None, [*BASE, "dino.koleo_weight=0.1", "dino.kde_weight=0.05"])
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    batch = _batch()
    out = method(batch, step=0)
    with torch.no_grad():
        cls = method.student["backbone"].forward_features(batch["global_crops"].flatten(0, 1)).cls.float()
    koleo_ref = sum(_reference_koleo(c) for c in cls.chunk(2))
    torch.testing.assert_close(out["koleo_loss"], koleo_ref, rtol=1e-5, atol=1e-6)
    kde_one = [method.kde_loss(c) for c in cls.chunk(2)]
    torch.testing.assert_close(out["kde_loss"], sum(kde_one), rtol=1e-5, atol=1e-6)
    # the KDE term differs from OpenMidnight's logsumexp form only by a constant per crop (kernel normalisation)
    diffs = [float(k - _reference_kde(c)) for k, c in zip(kde_one, cls.chunk(2))]
    assert diffs[0] == pytest.approx(diffs[1], abs=1e-4)
    assert cfg.dino.koleo_weight == 0.1 and cfg.dino.kde_weight == 0.05  # the weights themselves unchanged


def test_teacher_target_stats_logged_and_exact() -> None:
    """Batch-mean entropy, effective/distinct prototypes and loss / ln K on the targets actually used."""
    import math

    from medfoundry.methods.dino.method import teacher_target_stats

    k = 8
    one_hot = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), k).float()  # 4 rows, 2 prototypes
    s = teacher_target_stats(one_hot, torch.tensor(0.5 * math.log(k)))
    mean_h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert all(v.ndim == 0 for v in s.values())
    assert float(s["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)  # per-sample: confident
    assert float(s["teacher_mean_entropy"]) == pytest.approx(mean_h)
    assert float(s["teacher_mean_entropy_frac"]) == pytest.approx(mean_h / math.log(k))
    assert float(s["teacher_effective_prototypes"]) == pytest.approx(math.exp(mean_h))
    assert float(s["teacher_effective_prototypes_frac"]) == pytest.approx(math.exp(mean_h) / 4)  # min(K=8, N=4)
    assert float(s["teacher_distinct_prototypes"]) == 2
    assert float(s["dino_loss_frac"]) == pytest.approx(0.5)
    uniform = teacher_target_stats(torch.full((4, k), 1 / k))
    assert float(uniform["teacher_entropy_frac"]) == pytest.approx(1.0)
    assert float(uniform["teacher_effective_prototypes"]) == pytest.approx(k)  # soft rows can exceed min(K, N)
    assert "dino_loss_frac" not in uniform

    cfg = load_config(None, BASE)
    out = DINOMethod(cfg.model, cfg.dino, total_steps=10)(_batch(), step=0)
    for key in ("teacher_mean_entropy", "teacher_mean_entropy_frac", "teacher_effective_prototypes",
                "teacher_effective_prototypes_frac", "teacher_distinct_prototypes", "dino_loss_frac"):
        assert out[key].ndim == 0, key
    assert 1 <= float(out["teacher_distinct_prototypes"]) <= 6  # 2 global crops x batch 3 rows
    torch.testing.assert_close(out["dino_loss_frac"], out["dino_loss"].detach() / math.log(32))


def _reference_terms(method: DINOMethod, batch: dict, step: int) -> dict[str, torch.Tensor]:
    """The loss terms as the method computed them before the heads were batched: the head called once per token
    group (student: global class tokens, local class tokens, masked patch tokens; teacher: class tokens, masked
    patch tokens), from the same modules, weights and inputs."""
    c = method.cfg
    glob = batch["global_crops"]
    n_g, b = glob.shape[:2]
    glob = glob.flatten(0, 1)
    local = batch.get("local_crops")
    use_ibot = c.ibot_weight > 0 and "masks" in batch
    masks = batch["masks"].flatten(0, 1) if use_ibot else None
    temp = method.teacher_temperature(step)
    t_ibot = method.teacher["ibot_head"] if "ibot_head" in method.teacher else method.teacher["dino_head"]
    s_ibot = method.student["ibot_head"] if "ibot_head" in method.student else method.student["dino_head"]
    with torch.no_grad():
        t_out = method.teacher["backbone"].forward_features(glob)
        t_probs = method._targets(method.dino_loss, method.teacher["dino_head"](t_out.cls).float(), temp)
        if use_ibot:
            t_patch_probs = method._targets(method.ibot_loss, t_ibot(t_out.patch[masks]).float(), temp)
    s_out = method.student["backbone"].forward_features(glob, masks=masks)
    head = method.student["dino_head"]
    logits = [head(s_out.cls).view(n_g, b, -1)]
    if local is not None:
        s_local = method.student["backbone"].forward_features(local.flatten(0, 1))
        logits.append(head(s_local.cls).view(local.shape[0], b, -1))
    terms = {"dino_loss": method.dino_loss(torch.cat(logits).float(), t_probs.view(n_g, b, -1),
                                           skip_same_view=n_g > 1)}
    if use_ibot:
        index = torch.arange(n_g * b)[:, None].expand_as(masks)[masks]
        terms["ibot_loss"] = method.ibot_loss(s_ibot(s_out.patch[masks]).float(), t_patch_probs, index, n_g * b)
    if c.koleo_weight > 0:
        terms["koleo_loss"] = sum(method.koleo_loss(v) for v in s_out.cls.float().view(n_g, b, -1))
    return terms


def _student_grads(method: DINOMethod, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    method.student.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}
    method.student.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("with_local", [True, False])
@pytest.mark.parametrize("ibot", ["off", "shared", "separate"])
def test_one_head_call_per_tower_matches_per_group_calls(ibot: str, with_local: bool) -> None:
    """One head call on the concatenated token rows gives the losses and student gradients of one call per token
    group (the implementation before, written out in ``_reference_terms``) to 1e-6, and each head runs exactly once
    per tower and step."""
    extra = {"off": [], "shared": ["dino.ibot_weight=1"],
             "separate": ["dino.ibot_weight=1", "dino.ibot_separate_head=true", "dino.centering=sinkhorn"]}[ibot]
    cfg = load_config(None, [*BASE, "model.drop_path_rate=0.1", "dino.koleo_weight=0.1", *extra])
    # float64 weights and inputs, so the comparison to 1e-6 tests the computation and not float32 rounding of the
    # changed summation order (in float32 the largest gradients, ~1e2 here, differ by a few 1e-6 relative)
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10).double()
    batch = {k: v.double() if v.is_floating_point() else v for k, v in _batch().items()}
    if not with_local:
        del batch["local_crops"]
    calls: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda *_, key=f"{tower}.{name}": calls.update({key: calls.get(key, 0) + 1}))
             for tower in ("student", "teacher") for name, m in getattr(method, tower).items() if name != "backbone"]
    torch.manual_seed(1)  # drop-path draws: the same backbone calls in the same order on both paths
    out = method(batch, step=0)
    for h in hooks:
        h.remove()
    assert calls == {f"{t}.{h}": 1 for t in ("student", "teacher")
                     for h in (["dino_head", "ibot_head"] if ibot == "separate" else ["dino_head"])}
    torch.manual_seed(1)
    ref = _reference_terms(method, batch, step=0)
    assert set(ref) == {k for k in out if k.endswith("_loss")}
    weights = {"dino_loss": cfg.dino.dino_weight, "ibot_loss": cfg.dino.ibot_weight, "koleo_loss": 0.1}
    for key, value in ref.items():
        torch.testing.assert_close(out[key], value.detach(), rtol=1e-6, atol=1e-6)
    got = _student_grads(method, out["loss"])
    want = _student_grads(method, sum(weights[k] * v for k, v in ref.items()))
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_student_crop_logits_one_call_equals_per_crop_group() -> None:
    """The shared multi-crop student side (also the distill method's): one head call on global + local class
    tokens equals one call per crop group, in view-major order."""
    cfg = load_config(None, BASE)
    method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
    batch = _batch()
    glob, local = batch["global_crops"], batch["local_crops"]
    g_cls = method.student["backbone"].forward_features(glob.flatten(0, 1)).cls
    got = method.student_crop_logits(g_cls, local, 2, 3)
    head = method.student["dino_head"]
    l_cls = method.student["backbone"].forward_features(local.flatten(0, 1)).cls
    want = torch.cat([head(g_cls).view(2, 3, -1), head(l_cls).view(4, 3, -1)])
    assert got.shape == (6, 3, 32)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_shipped_mask_index_gives_the_boolean_indexing_result() -> None:
    """The loaders' ``mask_index`` (computed on the CPU, no device ``nonzero``) changes nothing: the same losses
    and gradients as a batch without it (where the method finds the masked positions itself)."""
    from medfoundry.data.views import mask_index

    cfg = load_config(None, [*BASE, "dino.ibot_weight=1"])
    results = []
    for ship in (False, True):
        torch.manual_seed(0)
        method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
        batch = _batch()
        if ship:
            batch["mask_index"] = mask_index(batch["masks"])
            patch = torch.randn(6, 16, 3)
            assert torch.equal(patch.flatten(0, 1)[batch["mask_index"]], patch[batch["masks"].flatten(0, 1)])
        out = method(batch, step=0)
        out["loss"].backward()
        results.append((out, {n: p.grad.clone() for n, p in method.student.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    assert torch.equal(a["ibot_loss"], b["ibot_loss"]) and torch.equal(a["loss"], b["loss"])
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
