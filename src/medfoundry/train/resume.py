"""Before a run writes anything: refuse to resume under another config, pick the newest good checkpoint.

A run folder belongs to one configuration. :func:`check_resume_config` compares the config about to run
with the folder's ``config.yaml`` and refuses (before anything is overwritten) when keys that change what
is trained differ; keys that only change how the run is watched or how long it goes on
(:data:`RESUME_MUTABLE`) may differ. :func:`select_checkpoint` walks the checkpoints newest first, verifies
each (:mod:`medfoundry.checkpoints.integrity`), moves a bad one aside as ``*.corrupt`` with its reason
in the log and ``error.log``, and returns the newest good one.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import yaml

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.checkpoints.integrity import quarantine, verify_checkpoint
from medfoundry.config.loader import to_dict
from medfoundry.config.schema import RunConfig
from medfoundry.errors import CorruptFileError, UserError
from medfoundry.safe_load import load_torch_file

#: Keys (or prefixes ending in ".") that may differ between a run folder's config.yaml and a resumed run.
RESUME_MUTABLE: tuple[str, ...] = (
    "output_dir",
    "train.steps",
    "train.log_every",
    "train.checkpoint_every",
    "train.keep_last",
    "train.max_nonfinite_steps",
    "train.nonfinite_check",
    "train.progress",
    "train.tensorboard",
    "train.tracking",
    "train.tracking_project",
    "train.tracking_name",
    "train.tracking_uri",
    "train.device",
    "train.allow_config_change",
    "data.num_workers",
    "data.max_bad_fraction",
    "dist.",
    "eval.",
)


class ConfigMismatchError(UserError):
    """The run folder was written by a different configuration."""


def flatten(data: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists kept as values)."""
    out: dict[str, object] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[tuple[str, object, object]]:
    """``(key, saved value, current value)`` for every key that differs and is not in :data:`RESUME_MUTABLE`.

    With ``defaults`` (the schema's default config, nested like ``current``), a key the folder's file does not
    have but whose current value is its schema default is not a difference: it was added to the schema after the
    folder was written, and the old run behaved as that default. Without this, every new config key would stop
    every older run folder from resuming.
    """
    a, b = flatten(saved), flatten(current)
    base = flatten(defaults) if defaults else {}
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == m or (m.endswith(".") and key.startswith(m)) for m in RESUME_MUTABLE):
            continue
        if key not in a and key in base and b.get(key) == base[key]:
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append((key, a.get(key, "<absent>"), b.get(key, "<absent>")))
    return diffs


def check_resume_config(run_dir: Path, cfg: RunConfig) -> None:
    """Raise :class:`ConfigMismatchError` if ``run_dir/config.yaml`` was written by a different run config.

    Nothing is written or overwritten before this check. ``train.allow_config_change=true`` resumes anyway
    (for a deliberate change, e.g. a longer schedule with ``train.schedule_steps``).
    """
    path = Path(run_dir) / "config.yaml"
    if not path.is_file() or cfg.train.allow_config_change:
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigMismatchError(f"{path} is not readable YAML ({err}); move the folder aside or pick another "
                                  "output_dir") from err
    current = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # same normalisation as the file
    defaults = yaml.safe_load(yaml.safe_dump(to_dict(type(cfg)()), sort_keys=False))
    diffs = config_differences(saved, current, defaults)
    if not diffs:
        return
    listed = "\n  ".join(f"{k}: {_short(old)} in the folder, {_short(new)} now" for k, old, new in diffs[:12])
    more = f"\n  ... and {len(diffs) - 12} more" if len(diffs) > 12 else ""
    raise ConfigMismatchError(
        f"{run_dir} holds a run with a different configuration ({path}); resuming it would mix two runs:\n"
        f"  {listed}{more}\nUse a new output_dir=... for this configuration, or pass "
        "train.allow_config_change=true to resume the folder's run with the changed keys on purpose. "
        "Nothing in the folder was changed."
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def select_checkpoint(run_dir: Path, report: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of ``run_dir`` that verifies; bad newer ones are quarantined and reported.

    A checkpoint without a checksum record (written before records existed) is verified by reading it with
    the safe loader. A file that would run code (:class:`~medfoundry.errors.UnsafeFileError`) is not
    skipped: it is raised, because it was not written by medfoundry. Call on the main rank only.
    """
    for path in reversed(list_checkpoints(run_dir)):
        try:
            if verify_checkpoint(path) == "unrecorded":
                load_torch_file(path / "meta.pt" if path.is_dir() else path, "checkpoint")
            return path
        except CorruptFileError as err:
            moved = quarantine(path)
            report(f"warning: checkpoint {path} is unusable: {err}; moved to {moved.name}, "
                   "falling back to the previous checkpoint")
    return None
