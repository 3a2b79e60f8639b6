"""Optional experiment tracking through the libraries users already have: Weights & Biases and MLflow.

Off by default. ``train.tracking=[wandb]`` and/or ``[mlflow]`` (``pip install "medfoundry[tracking]"``) make the
main rank open one tracked run per run folder: the resolved config goes in as the run's config (W&B) or params
(MLflow, flattened to dotted keys), every logged step's metrics follow (the same records as ``metrics.jsonl``),
and the run is closed at the end, on a failure (W&B exit code 1, MLflow ``FAILED``) and on a pre-emption stop
(W&B marked preempting, MLflow ``KILLED``). The tracked run's id is kept in ``RUN/tracking.json``, so resuming
the folder continues the same tracked run.

Where the records go is each library's own business and set the way its users know:
``WANDB_MODE=offline`` / ``WANDB_DIR`` / ``WANDB_API_KEY`` (default folder: ``RUN/wandb``), and
``train.tracking_uri`` or ``MLFLOW_TRACKING_URI`` (a server ``http://...``; ``file:...`` folders need
``MLFLOW_ALLOW_FILE_STORE=true`` from MLflow 3 on; ``sqlite:`` needs the full ``mlflow`` package).

A tracker that cannot start stops the run before its first step with one line naming the fix
(:class:`TrackingError`); one that fails later (a network error) is reported once and dropped, and training
goes on: how a run is watched never ends it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from medfoundry.errors import UserError

#: tracker name (a ``train.tracking`` value) -> the module it needs
TRACKERS: dict[str, str] = {"wandb": "wandb", "mlflow": "mlflow"}
INSTALL_HINT = 'pip install "medfoundry[tracking]"'
#: where a run folder keeps its tracked runs' ids, so a resume continues them
IDS_FILE = "tracking.json"
_PARAM_VALUE_LIMIT = 500  # characters of one MLflow param value kept (older servers allow no more)


class TrackingError(UserError):
    """A selected tracker is not installed or cannot start (not logged in, unreachable server, bad URI)."""


class Tracker(Protocol):
    """One started tracked run."""

    name: str
    run_id: str

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Record the metrics of one logged step."""

    def close(self, status: str) -> None:
        """End the tracked run; ``status`` is ``finished``, ``failed`` or ``stopped`` (pre-emption)."""


def check_available(names: Iterable[str]) -> None:
    """Raise :class:`TrackingError` (one line, naming the install command) if a selected tracker's package is missing.

    Cheap (no import): call it at the start of ``train``, before anything is written.
    """
    for name in names:
        module = TRACKERS[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(f"train.tracking selects {name}, but the {module} package is not installed: "
                                f"{INSTALL_HINT} (or drop {name} from train.tracking)")


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config dict as ``{"optim.lr": 0.0005, ...}``: scalars kept, ``None`` as ``"null"``, lists as JSON.

    The one flat view of a run's hyperparameters, shared by MLflow params and TensorBoard's hparams.
    """
    out: dict[str, str | int | float | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, name + "."))
        elif value is None:
            out[name] = "null"
        elif isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            out[name] = value
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def finite_numbers(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numeric entries of a metrics record (booleans, strings and NaN/inf left out)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class Trackers:
    """The started trackers of a run, used as one (what :class:`~medfoundry.train.run_logger.RunLogger` calls)."""

    def __init__(self, trackers: list[Tracker], warn: Callable[[str], None] = print) -> None:
        self.trackers = trackers
        self.warn = warn

    @property
    def names(self) -> list[str]:
        """The names of the trackers still running."""
        return [t.name for t in self.trackers]

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Send one step's finite numeric metrics to every tracker; one that fails is reported once and dropped."""
        values = finite_numbers(metrics)
        if not values:
            return
        for tracker in list(self.trackers):
            try:
                tracker.log_metrics(step, values)
            except Exception as err:  # noqa: BLE001 - a tracker's failure must not end the run
                self.trackers.remove(tracker)
                self.warn(f"warning: {tracker.name} tracking stopped at step {step} ({type(err).__name__}: "
                          f"{_first_line(err)}); training continues, metrics.jsonl has every step")

    def close(self, status: str = "finished") -> None:
        """Close every tracker with ``status`` (``finished``, ``failed``, ``stopped``); errors are reported only."""
        for tracker in self.trackers:
            try:
                tracker.close(status)
            except Exception as err:  # noqa: BLE001 - closing must not hide the run's own outcome
                self.warn(f"warning: could not close the {tracker.name} run ({type(err).__name__}: "
                          f"{_first_line(err)})")
        self.trackers = []


def start_trackers(names: Iterable[str], run_dir: str | Path, project: str, run_name: str, uri: str,
                   config: dict[str, Any], warn: Callable[[str], None] = print) -> Trackers:
    """Start the selected trackers for the run in ``run_dir`` (continuing the runs named in ``RUN/tracking.json``).

    ``project`` is the W&B project and the MLflow experiment (``medfoundry`` when empty), ``run_name`` the tracked
    run's name (the folder's name when empty), ``uri`` MLflow's tracking URI (empty: ``MLFLOW_TRACKING_URI`` or
    MLflow's default) and ``config`` the resolved run config as a nested dict. Raises :class:`TrackingError`
    naming the tracker and the fix when one is missing or cannot start; the ones already started are closed.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return Trackers([], warn)
    check_available(names)
    run_dir = Path(run_dir)
    project = project or "medfoundry"
    run_name = run_name or run_dir.resolve().name
    ids_path = run_dir / IDS_FILE
    ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
    starters = {"wandb": lambda: WandbTracker(run_dir, project, run_name, config, ids.get("wandb")),
                "mlflow": lambda: MlflowTracker(project, run_name, uri, flat_params(config), ids.get("mlflow"),
                                                run_dir)}
    started: list[Tracker] = []
    for name in names:
        try:
            started.append(starters[name]())
        except Exception as err:
            Trackers(started, warn).close("failed")
            raise TrackingError(f"train.tracking: {name} could not start ({type(err).__name__}: "
                                f"{_first_line(err)}); {_START_HINTS[name]}") from err
    ids.update({t.name: t.run_id for t in started})
    tmp = run_dir / f".{IDS_FILE}.tmp"
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    tmp.replace(ids_path)
    return Trackers(started, warn)


_START_HINTS = {
    "wandb": "log in (`wandb login` or WANDB_API_KEY), or set WANDB_MODE=offline to record locally and "
             "`wandb sync` later",
    "mlflow": "set train.tracking_uri or MLFLOW_TRACKING_URI to a tracking server (http://HOST:5000) or a "
              "folder (file:./mlruns, with MLFLOW_ALLOW_FILE_STORE=true on MLflow 3)",
}


def _first_line(err: BaseException, limit: int = 300) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class WandbTracker:
    """A W&B run (``wandb.init``); its files go to ``WANDB_DIR`` or else ``RUN/wandb``."""

    name = "wandb"

    def __init__(self, run_dir: Path, project: str, run_name: str, config: dict[str, Any],
                 resume_id: str | None = None) -> None:
        import os

        import wandb

        kwargs: dict[str, Any] = {"project": project, "name": run_name, "config": config,
                                  "dir": os.environ.get("WANDB_DIR") or str(run_dir),
                                  # leave stdout/stderr alone: the run's own log stays as it is
                                  "settings": wandb.Settings(console="off")}
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        self.run_id = str(self.run.id)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """``run.log(metrics, step=step)``."""
        self.run.log(metrics, step=step)

    def close(self, status: str) -> None:
        """``run.finish`` with exit code 0 (finished), 1 (failed), or marked preempting first (stopped)."""
        if status == "stopped":
            self.run.mark_preempting()
        self.run.finish(exit_code=1 if status == "failed" else 0)


_MLFLOW_STATUS = {"finished": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
_MLFLOW_BAD_CHARS = re.compile(r"[^/\w.\- :]")


def _mlflow_key(name: str) -> str:
    """A metric or param name MLflow accepts (alphanumerics, ``_ - . / : space``); others become ``_``."""
    return _MLFLOW_BAD_CHARS.sub("_", name)


class MlflowTracker:
    """An MLflow run through ``MlflowClient`` (no global active run is set, so user code keeps its own)."""

    name = "mlflow"

    def __init__(self, experiment: str, run_name: str, uri: str, params: dict[str, Any],
                 resume_id: str | None = None, run_dir: Path | None = None) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri or None)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(experiment)
        run = None
        if resume_id:
            try:
                run = self.client.get_run(resume_id)
            except MlflowException:  # deleted, or another tracking URI now: start a new run
                run = None
        if run is not None:
            self.client.update_run(run.info.run_id, status="RUNNING")
            known = set(run.data.params)
        else:
            tags = {"medfoundry.run_dir": str(run_dir.resolve())} if run_dir is not None else None
            run = self.client.create_run(exp_id, run_name=run_name, tags=tags)
            known = set()
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        # a resumed run keeps its params (MLflow refuses to change one); config.yaml holds the current config
        new = [Param(_mlflow_key(k), str(v)[:_PARAM_VALUE_LIMIT]) for k, v in params.items()
               if _mlflow_key(k) not in known]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """One ``log_batch`` with every metric at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(_mlflow_key(k), v, now, step) for k, v in metrics.items()])

    def close(self, status: str) -> None:
        """``set_terminated`` as FINISHED, FAILED or KILLED (pre-emption)."""
        self.client.set_terminated(self.run_id, status=_MLFLOW_STATUS[status])
