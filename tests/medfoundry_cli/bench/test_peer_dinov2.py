"""The dinov2 peer: finding (and not needlessly fetching) its code, the one-line error when it is missing, and -- when
the code is in the cache -- that the step built from dinov2's modules computes medfoundry's objective on the same
weights and inputs, with the same FLOPs, and that ``bench_train_step.py --peer dinov2`` prints the side-by-side
comparison."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from medfoundry.methods.dino.method import DINOMethod
from medfoundry_cli.bench import peer_code
from medfoundry_cli.bench.peer_code import (
    ENV_VAR,
    PeerUnavailableError,
    default_cache,
    has_code,
    import_dinov2,
    locate_dinov2,
)
from medfoundry_cli.bench.peer_compare import compare_with_dinov2, dino_loss_einsum_flops
from medfoundry_cli.bench.peer_dinov2 import Dinov2PeerStep, dinov2_batch
from medfoundry_cli.bench.step import StepSpec, TrainStep, dino_run_config, synthetic_dino_batch

ROOT = Path(__file__).resolve().parents[3]
CACHE = ROOT / ".cache" / "peers" / "dinov2"
needs_peer = pytest.mark.skipif(not has_code(CACHE), reason=f"dinov2 code not in {CACHE} (see benchmarks/README.md)")


def _fake_code(root: Path, commit: str = "0123abc") -> Path:
    (root / "dinov2" / "models").mkdir(parents=True)
    (root / "dinov2" / "models" / "vision_transformer.py").write_text("")
    (root / "COMMIT").write_text(f"{commit} 2025-01-01\n")
    return root


def test_cached_code_is_used_without_fetching(tmp_path, monkeypatch) -> None:
    root = _fake_code(tmp_path / "peer")
    monkeypatch.setattr(peer_code, "_clone", lambda root: pytest.fail("cloned although the code is cached"))
    code = locate_dinov2(root)
    assert code.root == root.resolve() and code.commit == "0123abc" and not code.fetched
    assert "nothing fetched" in code.describe() and "0123abc" in code.describe()
    monkeypatch.setenv(ENV_VAR, str(root))
    assert default_cache() == root and locate_dinov2().root == root.resolve()


def test_missing_code_fails_in_one_line_naming_the_folder(tmp_path, monkeypatch) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(PeerUnavailableError) as err:
        locate_dinov2(root, fetch=False)
    message = str(err.value)
    assert "\n" not in message and str(root) in message and "--peer-path" in message and ENV_VAR in message
    # an offline machine: the clone fails, the error says so and how to place the code
    monkeypatch.setattr(peer_code, "PEER_URL", str(tmp_path / "no-such-repository"))
    with pytest.raises(PeerUnavailableError) as err:
        locate_dinov2(root)
    message = str(err.value)
    assert "\n" not in message and "cloning" in message and str(root) in message and "git clone --depth 1" in message


def _tiny(global_size: int = 32, local_size: int = 16) -> tuple:
    spec = StepSpec(batch=3, global_size=global_size, local_size=local_size, n_local=2)
    cfg = dino_run_config(spec)
    torch.manual_seed(0)
    method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps)
    batch = synthetic_dino_batch(cfg, spec.batch, method.student["backbone"].patch_size, torch.device("cpu"))
    mods = import_dinov2(locate_dinov2(CACHE, fetch=False))
    peer = Dinov2PeerStep(cfg, method.student["backbone"], torch.device("cpu"), "fp32", mods)
    peer.load_medfoundry_student(method.student)
    return spec, cfg, method, batch, peer


@needs_peer
def test_peer_step_computes_medfoundrys_objective_on_the_same_weights() -> None:
    # global size = local size: no position-embedding resampling, whose kernels differ between timm and dinov2
    _, cfg, method, batch, peer = _tiny(32, 32)
    assert batch["masks"].sum() > 0
    with torch.no_grad():
        ours = method(batch, 0)
    loss_dict, total = peer.forward_backward(dinov2_batch(batch), method.teacher_temperature(0))
    assert float(total.detach()) == pytest.approx(float(ours["loss"]), rel=1e-5)
    dino = float(loss_dict["dino_local_crops_loss"] + loss_dict["dino_global_crops_loss"])
    assert dino == pytest.approx(float(ours["dino_loss"]), rel=1e-5)
    assert 2 * float(loss_dict["ibot_loss"]) == pytest.approx(float(ours["ibot_loss"]), rel=1e-5)


@needs_peer
def test_peer_step_trains_and_moves_the_teacher() -> None:
    _, _, _, batch, peer = _tiny()
    data = dinov2_batch(batch)
    student = [p.detach().clone() for p in peer.student.parameters()]
    teacher = [p.detach().clone() for p in peer.teacher.parameters()]
    for step in range(2):
        loss = peer(data, step)
    assert torch.isfinite(loss)
    assert set(peer.last_loss_dict) == {"dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert any(not torch.equal(a, b) for a, b in zip(student, peer.student.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(teacher, peer.teacher.parameters()))


@needs_peer
def test_comparison_counts_equal_flops_and_names_the_difference() -> None:
    spec = StepSpec(batch=2, global_size=32, local_size=16, n_local=2)
    result = compare_with_dinov2(spec, str(CACHE), fetch=False, repeats=2, steps=1, warmup=0)
    assert result.flops_equal() and result.medfoundry.flops != result.dinov2.flops
    cfg = dino_run_config(spec)
    einsum = dino_loss_einsum_flops(2, 4, 2, cfg.dino.head.out_dim)
    assert result.medfoundry.flops - result.dinov2.flops == einsum
    assert len(result.flops_differences()) == 1 and "einsum" in result.flops_differences()[0]
    assert len(result.medfoundry.cpu_s) == len(result.dinov2.cpu_s) == 2
    assert result.cpu_ratio() > 0 and result.medfoundry.params == result.dinov2.params
    text = result.format()
    assert "ratio medfoundry / dinov2: CPU time" in text and "equal within 0.1 %" in text and result.peer_commit in text


@needs_peer
def test_bench_train_step_peer_option(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "peer.json"
    code = module.main(["--peer", "dinov2", "--peer-path", str(CACHE), "--no-fetch", "--model", "vit_tiny_patch8",
                        "--global-size", "32", "--local-size", "16", "--n-local", "2", "--batch", "2",
                        "--prototypes", "256", "--repeats", "2", "--warmup", "0", "--json", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "peer comparison" in text and "FLOPs per step" in text
    doc = json.loads(out.read_text())
    assert doc["flops_equal"] and doc["cpu_ratio"] > 0 and doc["medfoundry"]["flops"] > 0
    assert doc["peer_commit"] and doc["dinov2"]["name"] == "dinov2"


def test_bench_train_step_peer_option_offline_fails_in_one_line(tmp_path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "benchmarks" / "bench_train_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(["--peer", "dinov2", "--peer-path", str(tmp_path / "empty"), "--no-fetch"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and str(tmp_path / "empty") in err


def test_train_step_is_the_loops_body() -> None:
    """The benchmark's step reads back what the loop reads back (its host syncs) and leaves the loop's metrics."""
    spec = StepSpec(batch=2, n_local=2)
    cfg = dino_run_config(spec)
    torch.manual_seed(0)
    method = DINOMethod(cfg.model, cfg.dino, cfg.train.steps)
    step = TrainStep(method, cfg, torch.device("cpu"), "fp32", read_metrics=True)
    batch = synthetic_dino_batch(cfg, 2, 8, torch.device("cpu"))
    teacher = [p.detach().clone() for p in method.teacher.parameters()]
    loss = step(batch, 0)
    m = step.last_metrics
    assert torch.isfinite(loss) and m["loss"] == pytest.approx(float(loss))
    for key in ("grad_norm", "lr", "weight_decay", "teacher_momentum", "dino_loss", "ibot_loss", "koleo_loss"):
        assert key in m and isinstance(m[key], float)
    assert m["grad_norm"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(teacher, method.teacher.parameters()))
