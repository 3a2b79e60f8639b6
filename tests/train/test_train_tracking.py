"""Optional experiment tracking, for real through the libraries' offline modes: W&B with ``WANDB_MODE=offline``
(its ``.wandb`` record file read back), MLflow with a local ``file:`` tracking URI (its metric files read back)."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from nan_method import nan_dino_method

from medfoundry.config import load_config
from medfoundry.recipes import recipes_dir
from medfoundry.train import tracking
from medfoundry.train.loop import NonFiniteLossError, train
from medfoundry.train.run_logger import read_metrics
from medfoundry.train.tracking import Trackers, TrackingError, start_trackers
from medfoundry_cli.cli import main

if not os.environ.get("CI"):  # the dev extra installs both; in CI a missing one fails instead of skipping
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "train.device=cpu", "train.checkpoint_every=1000"]


@pytest.fixture()
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """W&B offline (no account, no network); MLflow's folder store allowed; returns the MLflow tracking URI."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file: stores without it
    return (tmp_path / "mlruns").as_uri()


def _overrides(out: Path, root: Path, uri: str, *extra: str) -> list[str]:
    return [*FAST, f"output_dir={out}", f"data.root={root}", "train.tracking=[wandb,mlflow]",
            "train.tracking_project=medfoundry-test", f"train.tracking_uri={uri}", *extra]


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (LevelDB log format: 7-byte file header, 32 KiB blocks of records
    with a 7-byte header each: CRC32, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, records = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (2, 3):  # first / middle part of a record split over blocks
            pending = (b"" if kind == 2 else pending) + payload
            continue
        record = pb.Record()
        record.ParseFromString(pending + payload if kind == 4 else payload)
        pending = b""
        records.append(record)
    return records


def _wandb_runs(run_dir: Path) -> list[dict]:
    """Per offline run folder (one per start): its run id, config, ``{step: loss}`` and exit code."""
    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        info: dict = {"loss": {}, "exit_code": None}
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                info["id"] = rec.run.run_id
                info["config"] = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in rec.history.item}
                if "loss" in items:
                    info["loss"][items["_step"]] = items["loss"]
            elif kind == "exit":
                info["exit_code"] = rec.exit.exit_code
        out.append(info)
    return out


def _mlflow_run(uri: str, run_id: str) -> tuple[Path, str]:
    """The run's folder in the file store and its status name."""
    from mlflow.entities import RunStatus
    from mlflow.tracking import MlflowClient

    (folder,) = Path(uri.removeprefix("file://")).glob(f"*/{run_id}")
    status = MlflowClient(tracking_uri=uri).get_run(run_id).info.status
    return folder, status if isinstance(status, str) else RunStatus.to_string(status)


def _metric_file(folder: Path, name: str) -> dict[int, float]:
    """MLflow's file store: one ``timestamp value step`` line per logged value."""
    rows = [line.split() for line in (folder / "metrics" / name).read_text().splitlines()]
    return {int(step): float(value) for _ts, value, step in rows}


def test_both_trackers_record_config_and_metrics_and_a_resume_continues_them(
        tmp_path: Path, png_folder: Path, offline: str) -> None:
    out = tmp_path / "run"
    train(load_config(RECIPE, _overrides(out, png_folder, offline, "train.steps=4", "train.log_every=2")))
    first_ids = json.loads((out / "tracking.json").read_text())
    train(load_config(RECIPE, _overrides(out, png_folder, offline, "train.steps=6", "train.log_every=2")))
    ids = json.loads((out / "tracking.json").read_text())
    assert ids == first_ids and set(ids) == {"wandb", "mlflow"}
    logged = {r["step"]: r["loss"] for r in read_metrics(out)}
    assert sorted(logged) == [2, 4, 6]
    ref = train(load_config(RECIPE, [*FAST, f"output_dir={tmp_path / 'ref'}", f"data.root={png_folder}",
                                     "train.steps=6", "train.log_every=2"]))
    assert {r["step"]: r["loss"] for r in read_metrics(ref)} == logged  # tracking draws no random numbers

    folder, status = _mlflow_run(offline, ids["mlflow"])
    assert status == "FINISHED"
    assert _metric_file(folder, "loss") == pytest.approx(logged)
    assert set(_metric_file(folder, "lr")) == {2, 4, 6}
    assert (folder / "params" / "optim.lr").read_text() == "0.0005"
    assert (folder / "params" / "model.name").read_text() == "vit_tiny_patch8"
    assert (folder / "params" / "train.tracking").read_text() == '["wandb", "mlflow"]'

    starts = _wandb_runs(out)
    assert len(starts) == 2 and {s["id"] for s in starts} == {ids["wandb"]}
    assert starts[0]["loss"] == pytest.approx({2: logged[2], 4: logged[4]})
    assert starts[1]["loss"] == pytest.approx({6: logged[6]})
    assert starts[0]["config"]["optim"]["lr"] == 0.0005 and starts[0]["config"]["method"] == "dino"
    assert [s["exit_code"] for s in starts] == [0, 0]


def test_a_failed_run_closes_its_tracked_runs_as_failed(tmp_path: Path, png_folder: Path, offline: str) -> None:
    out = tmp_path / "failed"
    with nan_dino_method("nan_tracking_test"):
        cfg = load_config(RECIPE, _overrides(out, png_folder, offline, "train.steps=6", "train.max_nonfinite_steps=1"))
        cfg.method = "nan_tracking_test"
        with pytest.raises(NonFiniteLossError):
            train(cfg)
    ids = json.loads((out / "tracking.json").read_text())
    folder, status = _mlflow_run(offline, ids["mlflow"])
    assert status == "FAILED" and sorted(_metric_file(folder, "loss")) == [1, 2]
    (start,) = _wandb_runs(out)
    assert start["exit_code"] == 1 and sorted(start["loss"]) == [1, 2]


def test_a_missing_tracker_package_is_one_line_naming_the_extra(
        tmp_path: Path, png_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", "mlflow_not_installed_here")
    out = tmp_path / "run"
    code = main(["train", str(RECIPE), *FAST, f"output_dir={out}", f"data.root={png_folder}", "train.steps=1",
                 "train.tracking=[mlflow]"])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert 'pip install "medfoundry[tracking]"' in err and "mlflow" in err
    assert not out.exists()  # refused before anything was written


def test_a_tracker_that_cannot_start_is_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(TrackingError, match=r"train\.tracking: mlflow could not start .*tracking_uri") as err:
        start_trackers(["mlflow"], tmp_path, "p", "", "nosuchscheme://host/x", {"optim": {"lr": 0.1}})
    assert "\n" not in str(err.value)
    assert not (tmp_path / "tracking.json").exists()


def test_a_tracker_failing_mid_run_is_dropped_and_training_goes_on() -> None:
    class Fake:
        def __init__(self, name: str, fail: bool) -> None:
            self.name, self.run_id, self.fail, self.logged, self.closed = name, name, fail, [], None

        def log_metrics(self, step, metrics):
            if self.fail:
                raise ConnectionError("server went away\nsecond line")
            self.logged.append((step, metrics))

        def close(self, status):
            self.closed = status

    bad, good = Fake("mlflow", fail=True), Fake("wandb", fail=False)
    warnings: list[str] = []
    trackers = Trackers([bad, good], warn=warnings.append)
    trackers.log_metrics(1, {"loss": 2.0, "note": "text", "nan": float("nan"), "flag": True})
    trackers.log_metrics(2, {"loss": 1.0})
    trackers.close("stopped")
    assert good.logged == [(1, {"loss": 2.0}), (2, {"loss": 1.0})]
    assert len(warnings) == 1 and "mlflow tracking stopped at step 1" in warnings[0] and "\n" not in warnings[0]
    assert good.closed == "stopped" and bad.closed is None
