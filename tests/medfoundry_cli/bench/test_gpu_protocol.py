"""The GPU protocol's table and JSON layout, its handling of failing and late parts, and (slow) the CPU dry run of
``benchmarks/gpu_protocol.py`` end to end, as CI runs it when no GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medfoundry_cli.bench.gpu_protocol import (
    COLUMNS,
    PART_ORDER,
    PartResult,
    Protocol,
    ProtocolConfig,
    document,
    markdown_table,
)
from medfoundry_cli.bench.peer_code import has_code
from medfoundry_cli.bench.results import BenchResult

ROOT = Path(__file__).resolve().parents[3]


def _rows() -> list[PartResult]:
    step = BenchResult("model", "dino vit_base_patch16 2x224+8x96", "cuda:0", 128, 890.0, 0.1438,
                       peak_mem_bytes=40 * 2**30, peak_mem_source="cuda max_memory_allocated", max_batch=1024)
    step.set_flops(57.1e12, 56.9e12, 989e12, "H200 bf16 dense 989 TFLOP/s")
    return [
        PartResult("clip", "hybrid_dinov3_chexzero", batch=64, images_per_s=410.0),
        PartResult("compile", "vit_base_patch16", batch=128, images_per_s=1001.0, comparison="1.12x eager"),
        PartResult.from_bench("step", "vit_base_patch16", step),
        PartResult("e2e", "vit_base_patch16", batch=128, images_per_s=850.0, data_wait_frac=0.031),
        PartResult("step", "vit_small_patch16", status="failed", error="OutOfMemoryError: CUDA out of memory"),
        PartResult("ddp", "vit_base_patch16", status="skipped", error="time budget (450 s) spent"),
    ]


def test_table_layout_rows_in_protocol_order_with_units() -> None:
    models = ["vit_small_patch16", "vit_base_patch16"]
    text = markdown_table(_rows(), "GPU protocol on NVIDIA H200, 2026-12-02", "python benchmarks/gpu_protocol.py",
                          "NVIDIA H200; torch 2.14.1", models)
    lines = text.splitlines()
    assert lines[0] == "### GPU protocol on NVIDIA H200, 2026-12-02"
    assert "Command: `python benchmarks/gpu_protocol.py`" in lines and "Machine: NVIDIA H200; torch 2.14.1" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("| part |"))
    assert lines[header] == "| " + " | ".join(COLUMNS) + " |"
    assert lines[header + 1] == "|" + "|".join("---" for _ in COLUMNS) + "|"
    table = [line.split(" | ") for line in lines[header + 2:] if line.startswith("| ")]
    assert all(len(row) == len(COLUMNS) for row in table)
    order = [(row[0].lstrip("| "), row[1]) for row in table]
    assert order == [("step", "vit_small_patch16"), ("step", "vit_base_patch16"), ("compile", "vit_base_patch16"),
                     ("ddp", "vit_base_patch16"), ("e2e", "vit_base_patch16"), ("clip", "hybrid_dinov3_chexzero")]
    base = dict(zip(COLUMNS, table[1]))
    assert base["images/s"] == "890.0" and base["TFLOP/step"] == "57.1" and base["MFU"] == "40.1 %"
    assert base["peak mem"] == "40.00 GiB" and base["largest batch"] == "1024" and base["data wait"] == "n/a"
    assert table[0][-1].startswith("failed: OutOfMemoryError") and table[3][-1].startswith("skipped: time budget")
    assert dict(zip(COLUMNS, table[4]))["data wait"] == "3.1 %"
    assert "- step vit_base_patch16: MFU vs H200 bf16 dense 989 TFLOP/s" in lines


def test_json_document_layout(tmp_path) -> None:
    cfg = ProtocolConfig(out=tmp_path, tiny=True, command="python benchmarks/gpu_protocol.py --tiny").resolved()
    doc = document(_rows(), cfg, "GPU protocol, CPU dry run", "cpu", "2026-12-02", {"peer_commit": "b8931f7"}, True)
    json.dumps(doc)  # serialisable as it is
    assert {"title", "date", "command", "machine", "torch", "tiny", "finished", "config", "peer", "columns",
            "parts"} <= set(doc)
    assert doc["tiny"] is True and doc["columns"] == COLUMNS and doc["config"]["out"] == str(tmp_path)
    assert doc["config"]["models"] == ["vit_tiny_patch8"] and doc["config"]["global_size"] == 32
    step = next(p for p in doc["parts"] if p["part"] == "step" and p["status"] == "ok")
    assert step["mfu"] == pytest.approx(57.1 / 0.1438 / 989, rel=1e-6) and step["result"]["max_batch"] == 1024


def test_a_failing_part_becomes_a_row_and_a_late_part_is_skipped(tmp_path) -> None:
    protocol = Protocol(ProtocolConfig(out=tmp_path, tiny=True, budget_s=60), echo=lambda line: None)

    def boom() -> list[PartResult]:
        raise RuntimeError("no such kernel\nsecond line")

    protocol.run_part("step", "vit_tiny_patch8", boom)
    protocol.start -= 120  # the budget is spent
    protocol.run_part("clip", "tiny towers", lambda: pytest.fail("ran after the budget"))
    failed, skipped = protocol.parts
    assert failed.status == "failed" and failed.error == "RuntimeError: no such kernel"
    assert "RuntimeError" in (tmp_path / "error_step_vit_tiny_patch8.txt").read_text()
    assert skipped.status == "skipped" and "budget" in skipped.error
    doc = json.loads((tmp_path / "gpu_protocol.json").read_text())
    assert [p["status"] for p in doc["parts"]] == ["failed", "skipped"] and not doc["finished"]
    assert "CPU dry run" in (tmp_path / "gpu_protocol.md").read_text()


@pytest.mark.slow
def test_cpu_dry_run_of_the_gpu_protocol_end_to_end(tmp_path) -> None:
    out = tmp_path / "protocol"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_protocol.py"), "--tiny", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    doc = json.loads((out / "gpu_protocol.json").read_text())
    assert doc["finished"] and doc["tiny"] and "CPU dry run" in doc["title"]
    status = {(p["part"], p["model"]): p for p in doc["parts"]}
    assert {p["part"] for p in doc["parts"]} == set(PART_ORDER)
    peer = [p for p in doc["parts"] if p["part"] == "peer"]
    peer_ok = has_code(ROOT / ".cache" / "peers" / "dinov2") or all(p["status"] == "ok" for p in peer)
    for (part, model), p in status.items():
        if part == "compile":
            assert p["status"] == "skipped" and "CPU" in p["error"]
        elif part == "peer" and not peer_ok:  # no cached code and no network: the one-line reason, nothing else
            assert p["status"] == "failed" and "dinov2 code not found" in p["error"]
        else:
            assert p["status"] == "ok", (part, model, p["error"], proc.stderr[-2000:])
            assert p["images_per_s"] > 0, (part, model)
    assert proc.returncode == (0 if peer_ok else 1), proc.stderr[-2000:]
    for part in ("step", "ddp", "fsdp2", "clip"):
        row = next(p for p in doc["parts"] if p["part"] == part)
        assert row["flops_per_step"] > 0 and 0 < row["mfu"] < 1
    e2e = [p for p in doc["parts"] if p["part"] == "e2e"]
    assert len(e2e) == 2 and all(0 <= p["data_wait_frac"] <= 1 for p in e2e)
    if peer_ok:
        assert doc["peer"]["flops_equal"] and len(peer) == 2
    md = (out / "gpu_protocol.md").read_text()
    assert "CPU dry run" in md and "| " + " | ".join(COLUMNS) + " |" in md and "--tiny" in md
    assert "| step | vit_tiny_patch8 |" in proc.stdout  # rows are printed as their parts end
