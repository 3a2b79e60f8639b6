"""The training loop: step-based, method-agnostic, resumable.

The loop builds the method and its loader by name, applies parallelism from outside, and runs
``method(batch, step) -> {"loss", metrics}`` with schedules, clipping, non-finite-loss guarding,
metric logging and atomic checkpoints. Everything method-specific lives in the method. With
``train.grad_accum_steps`` = N an optimizer step runs N micro-batches (:mod:`medfoundry.train.accumulate`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from medfoundry.checkpoints.format import (
    capture_rng,
    checkpoint_dir,
    latest_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
    save_sharded_checkpoint,
)
from medfoundry.checkpoints.integrity import remove_stale_temporaries
from medfoundry.config.checks import check_names
from medfoundry.config.loader import save_config, to_dict
from medfoundry.config.schema import RunConfig
from medfoundry.distributed.parallelize import is_sharded, parallelize, unwrap
from medfoundry.distributed.setup import DistInfo, init_distributed
from medfoundry.errors import UserError
from medfoundry.eval.hooks import wants_step
from medfoundry.methods import get_method_entry
from medfoundry.methods.input_paths import check_paths, needed_paths
from medfoundry.precision import resolve_device, resolve_precision
from medfoundry.safe_load import load_torch_file
from medfoundry.train import step as train_step
from medfoundry.train.accumulate import StepOutputs
from medfoundry.train.hooks import build_hooks
from medfoundry.train.nonfinite import (  # NonFiniteLossError: raised by the guard, imported from here by callers
    DeferredFlags,
    NonfiniteGuard,
    NonFiniteLossError,
    StepFlags,
    resolve_check,
)
from medfoundry.train.optim import apply_schedules, build_optimizer
from medfoundry.train.preemption import PREEMPTED_EXIT_CODE, StopFlag
from medfoundry.train.resume import check_resume_config, flatten, select_checkpoint
from medfoundry.train.run_logger import RunLogger
from medfoundry.train.run_summary import ParamCount, RunSummary, parameter_counts, source_counts, write_summary
from medfoundry.train.tracking import check_available, flat_params, start_trackers

__all__ = ["BadDataError", "NonFiniteLossError", "train"]


class BadDataError(UserError, RuntimeError):
    """Raised when the share of unreadable files passes ``data.max_bad_fraction``."""


def train(cfg: RunConfig, on_signal_stop: Callable[[int], None] | None = None) -> Path:
    """Run (or resume) training as configured; returns the run folder.

    SIGTERM/SIGUSR1 (pre-emption) on any rank make every rank write the checkpoint at the end of the same
    step and return early (:mod:`medfoundry.train.preemption`); ``on_signal_stop``, when given, is then called
    with that step, so a caller can tell a stopped run from a finished one (running the same config again
    resumes it from that checkpoint). Before anything is written, a folder holding another config's run is
    refused (:func:`~medfoundry.train.resume.check_resume_config`), stale temporary files of an interrupted
    save are removed and the newest checkpoint that verifies is chosen (a bad one is moved aside and named).
    """
    check_names(cfg)  # registered names, now that the method's packages (models, data) are imported
    check_paths(cfg)  # missing data, weights, teacher or anchor: a named error before any process group or file
    check_available(cfg.train.tracking)  # a selected tracker's package is installed (the same, for train.tracking)
    info = init_distributed(cfg.dist.backend)
    device = resolve_device(cfg.train.device)
    precision = resolve_precision(cfg.train.precision, device)
    run_dir = Path(cfg.output_dir)
    check_resume_config(run_dir, cfg)  # every rank: read-only, raises before anything is written
    notes: list[str] = []
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in [*remove_stale_temporaries(checkpoint_dir(run_dir)), *remove_stale_temporaries(run_dir)]:
            notes.append(f"removed a temporary file left by an interrupted save: {stale}")
        save_config(cfg, run_dir / "config.yaml")
    _barrier(info)
    ckpt_path = _choose_checkpoint(run_dir, info, notes)

    torch.manual_seed(cfg.train.seed)
    entry = get_method_entry(cfg.method)
    method = entry.build(cfg).to(device)
    counts = parameter_counts(method, method.backbones())  # before wrapping or sharding: whole tensors
    depth = max((b.depth for b in method.backbones().values()), default=None)
    model = parallelize(method, cfg.dist, device, precision)
    optimizer = build_optimizer(method, cfg.optim, depth, fused=True if cfg.train.nonfinite_check == "device" else None)
    deferred = resolve_check(cfg.train.nonfinite_check, device, optimizer, is_sharded(method)) == "device"
    horizon = cfg.train.schedule_steps or cfg.train.steps

    start_step, nonfinite, bad_files = 0, 0, {}
    if ckpt_path is not None:
        meta = _restore(ckpt_path, method, optimizer)
        rng = meta["rng"]
        restore_rng(rng[min(info.rank, len(rng) - 1)] if isinstance(rng, list) else rng)
        start_step, nonfinite = meta["step"], meta.get("nonfinite_in_a_row", 0)
        bad_files = meta.get("bad_files", {})

    n_micro = cfg.train.grad_accum_steps
    loader = entry.build_loader(cfg, method, start_step * n_micro, info.rank, info.world_size)  # counts micro-batches
    logger = _open_logger(cfg, run_dir, info, start_step)  # truncates the step records: before the hooks read them
    for note in notes:
        logger.write(note)
    if ckpt_path is not None:
        logger.write(f"resumed from {ckpt_path} at step {start_step}")
    hooks = build_hooks(cfg)
    if info.is_main:
        summary = _summary(cfg, counts, device, precision, info, loader.dataset, start_step, ckpt_path, logger)
        logger.write(write_summary(run_dir, summary))
    stop = StopFlag()
    guard = NonfiniteGuard(cfg.train.max_nonfinite_steps, nonfinite, logger.write, lambda: latest_checkpoint(run_dir))
    flags = DeferredFlags(device)  # train.nonfinite_check=device: each step's flags, read a step late
    params = [p for p in method.parameters() if p.requires_grad]
    data_iter = iter(loader)
    step = start_step
    stopped_at: int | None = None
    status = "failed"  # until the loop ends without an exception (a second Ctrl-C included)
    try:
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            sched = apply_schedules(optimizer, cfg.optim, step, horizon)
            method.start_step(step)
            acc = StepOutputs(n_micro, defer=deferred)
            for micro in range(n_micro):
                batch = _to_device(next(data_iter), device)
                _track_bad(batch.pop("bad", []), bad_files, cfg, logger, loader)
                if step == start_step and micro == 0:
                    logger.log_inputs(step, batch)  # TensorBoard: a grid of this batch's crops (no random draw)
                acc.images += _batch_images(batch)
                if acc.finite:  # a skipped step still reads all its micro-batches: the data position stays step x N
                    acc.forward_backward(model, batch, step, micro == n_micro - 1, stop.requested, precision, device)
                    stop.requested = stop.requested or acc.stop  # a stop agreed from another rank's signal counts too
            done = step + 1
            log_step = done % cfg.train.log_every == 0 or done == cfg.train.steps
            called = [h for h in hooks if wants_step(h, done, log_step)]  # e.g. evaluation steps only
            save_step = done % cfg.train.checkpoint_every == 0 or done == cfg.train.steps
            out = acc.mean()  # the loss and metrics: means over the micro-batches
            if deferred:  # the update is skipped on the device; the host hears of this step now or a step later
                device_metrics = train_step.update(method, optimizer, params, out, step, cfg.optim.clip_grad, device,
                                                   skip=acc.skip)
                flags.push(done, acc.flags)
                heard = flags.pop(done - 1)
                stop_now = any(f.stop for f in heard)
                if stop_now or log_step or called or save_step:  # the host acts on this step: it waits for its flags
                    heard += flags.pop(done)
                    stop_now = any(f.stop for f in heard)
                for f in heard:
                    guard.record(f)
                finite = all(f.finite for f in heard if f.step == done)
            else:
                finite, stop_now = acc.finite, acc.stop
                guard.record(StepFlags(done, finite, stop_now))
            nonfinite = guard.in_a_row
            if not finite:
                optimizer.zero_grad(set_to_none=True)
                if stop_now:
                    _save(run_dir, done, method, optimizer, cfg, info, nonfinite, bad_files)
                    stopped_at = done
                    break
                continue
            if not deferred:
                device_metrics = train_step.update(method, optimizer, params, out, step, cfg.optim.clip_grad, device)

            loss_value: float | None = None
            if log_step or called:  # one host read of all of the step's values; none on the other steps
                metrics = train_step.read_metrics(device_metrics)
                loss_value = metrics.pop("_local_loss")
                grad_norm = metrics.pop("grad_norm")
                metrics.update(sched)
                metrics["grad_norm"] = grad_norm  # the key order of metrics.jsonl as before
                metrics.update(method.metrics_after_step(step))
                n_images = acc.images * info.world_size
                metrics["images_per_s"] = n_images / max(1e-9, time.perf_counter() - t0)
                evaluated: dict[str, float] = {}
                for hook in called:
                    evaluated.update(hook.on_step_end(done, metrics, method, run_dir) or {})
                metrics.update(evaluated)
                if log_step or evaluated:
                    logger.log(done, metrics)
            logger.advance(1, loss_value, sched.get("lr"))
            if save_step or stop_now:
                _save(run_dir, done, method, optimizer, cfg, info, nonfinite, bad_files)
            if stop_now:
                stopped_at = done
                break
        status = "finished"
    except Exception as err:
        if info.is_main:
            with open(run_dir / "error.log", "a") as fh:
                fh.write(f"step {step + 1}: {type(err).__name__}: {err}\n")
        raise
    finally:
        stop.restore()
        if stopped_at is not None:
            status = "stopped"
            logger.write(f"stopped by a pre-emption signal after step {stopped_at}; checkpoint written on every "
                         f"rank, exit code {PREEMPTED_EXIT_CODE}; resume with the same command")
        logger.close(status)
    if stopped_at is not None and on_signal_stop is not None:
        on_signal_stop(stopped_at)
    return run_dir


def _open_logger(cfg: RunConfig, run_dir: Path, info: DistInfo, start_step: int) -> RunLogger:
    """The run's logger: metrics.jsonl, TensorBoard (with the config as hparams), progress, and on the main rank the
    trackers of ``train.tracking`` (started here, closed with the logger)."""
    t = cfg.train
    config = to_dict(cfg)
    trackers = None
    if info.is_main and t.tracking:
        trackers = start_trackers(t.tracking, run_dir, t.tracking_project, t.tracking_name, t.tracking_uri, config)
    logger = RunLogger(run_dir, info.is_main, start_step, t.steps, t.tensorboard, t.progress, t.log_every,
                       flat_params(config), trackers)
    if trackers is not None:
        trackers.warn = logger.write
    return logger


def _summary(cfg: RunConfig, counts: list[ParamCount], device: torch.device, precision: str, info: DistInfo,
             dataset, start_step: int, ckpt_path: Path | None, logger: RunLogger) -> RunSummary:
    """The start-of-run summary's values, read from the run config, the built method and the loader's dataset."""
    flat = flatten(to_dict(cfg))
    kinds = sorted((k for k in flat if k == "data.kind" or k.endswith(".data.kind")), key=len)  # the training data
    samples, skipped = source_counts(dataset)
    outputs = ["metrics.jsonl", *(["tensorboard"] if logger.tb is not None else []),
               *(logger.trackers.names if logger.trackers is not None else [])]
    where = f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)
    return RunSummary(
        run_dir=str(cfg.output_dir), method=cfg.method, backbone=cfg.model.name, parameters=counts, device=where,
        precision=precision, world_size=info.world_size, data_kind=str(flat[kinds[0]]) if kinds else "",
        inputs={key: str(path) for key, path, _ in needed_paths(cfg)}, samples=samples, skipped=skipped,
        batch_size=cfg.train.batch_size, steps=cfg.train.steps, start_step=start_step,
        resumed_from=str(ckpt_path) if ckpt_path is not None else None, outputs=outputs)


def _choose_checkpoint(run_dir: Path, info: DistInfo, notes: list[str]) -> Path | None:
    """The newest good checkpoint, chosen on the main rank (bad ones reported, moved aside), told to all ranks."""
    chosen: list = [None]
    if info.is_main:
        def report(message: str) -> None:
            notes.append(message)
            with open(run_dir / "error.log", "a") as fh:
                fh.write(message + "\n")

        chosen[0] = select_checkpoint(run_dir, report)
    if info.enabled and torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(chosen, src=0)
    return chosen[0]


def _save(run_dir: Path, step: int, method: nn.Module, optimizer, cfg: RunConfig, info: DistInfo,
          nonfinite: int, bad_files: dict) -> None:
    rng = capture_rng()
    if info.enabled:
        gathered: list = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, rng)
        rng = gathered
    meta = {
        "step": step,
        "rng": rng,
        "config": to_dict(cfg),
        "nonfinite_in_a_row": nonfinite,
        "bad_files": bad_files,
        "format": "medfoundry-train-v1",
        "eval_tower": get_method_entry(cfg.method).eval_tower,  # which tower models/eval load from this file
    }
    if is_sharded(method):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(method, optimizer)
        save_sharded_checkpoint(run_dir, step, {"method": msd, "optimizer": osd}, meta, cfg.train.keep_last,
                                info.is_main)
        return
    if info.is_main:
        state = {**meta, "method": unwrap(method).state_dict(), "optimizer": optimizer.state_dict()}
        save_checkpoint(run_dir, step, state, cfg.train.keep_last)
    _barrier(info)


def _restore(path: Path, method: nn.Module, optimizer) -> dict:
    """Load model and optimizer state from a single-file or sharded checkpoint; returns its metadata."""
    if path.is_dir():
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(method, optimizer)
        dcp.load({"method": msd}, checkpoint_id=str(path))  # every weight must be there
        # parameters that never had a gradient (e.g. a frozen prototype layer) have no optimizer state yet
        dcp.load({"optimizer": osd}, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(method, optimizer, model_state_dict=msd, optim_state_dict=osd)
        return load_torch_file(path / "meta.pt", "checkpoint metadata")
    if is_sharded(method):
        raise RuntimeError(
            f"{path} is a single-file (DDP/one-process) checkpoint; an FSDP run resumes only from sharded "
            "checkpoints. Resume with dist.strategy=ddp, or start a new run with model.pretrained pointing to it."
        )
    state = load_checkpoint(path)
    method.load_state_dict(state["method"])
    optimizer.load_state_dict(state["optimizer"])
    return state


def _track_bad(bad: list, bad_files: dict, cfg: RunConfig, logger: RunLogger, loader) -> None:
    for path, reason in bad:
        if path not in bad_files:
            bad_files[path] = reason
            logger.write(f"warning: unreadable sample skipped: {path}: {reason}")
    if not bad:
        return
    total = len(loader.dataset)
    limit = get_method_entry(cfg.method).max_bad_fraction(cfg)
    if len(bad_files) / max(1, total) > limit:
        listed = "\n  ".join(f"{p}: {r}" for p, r in list(bad_files.items())[:20])
        raise BadDataError(
            f"{len(bad_files)} of {total} files are unreadable, more than data.max_bad_fraction="
            f"{limit}:\n  {listed}\nFix or remove them (medfoundry prepare reports them)."
        )


def _to_device(batch, device: torch.device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list) and batch and isinstance(batch[0], torch.Tensor):
        return [_to_device(v, device) for v in batch]
    return batch


def _batch_images(batch: dict) -> int:
    for key in ("global_crops", "images"):
        if key in batch:
            t = batch[key]
            return int(t.shape[1] if key == "global_crops" else t.shape[0])
    return 0


def _barrier(info: DistInfo) -> None:
    if info.enabled and torch.distributed.is_initialized():
        torch.distributed.barrier()
