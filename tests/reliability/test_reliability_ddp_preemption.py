"""Pre-emption on two gloo DDP ranks: SIGTERM reaching one rank (or both, 400 ms apart) makes both ranks
checkpoint the same step and exit with the pre-emption code within 10 s; the resumed run equals an
uninterrupted one."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from reliability_testutil import TERMS, finish, start_ranks, train_args, wait_for_step

from medfoundry.checkpoints.format import list_checkpoints
from medfoundry.train.preemption import PREEMPTED_EXIT_CODE
from medfoundry.train.run_logger import read_metrics

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

STEPS = 20
EXTRA = [f"train.steps={STEPS}", "train.checkpoint_every=1000", "data.num_workers=0"]


def _preempt(out: Path, root: Path, port: int, delays: dict[int, float]) -> tuple[list[int], float]:
    """Start two ranks, signal the ranks in ``delays`` (seconds after the first signal); exit codes and seconds."""
    procs = start_ranks(train_args(out, root, *EXTRA), world=2, port=port)
    wait_for_step(out, 3, procs)
    t0 = time.monotonic()
    for rank, delay in sorted(delays.items(), key=lambda kv: kv[1]):
        time.sleep(max(0.0, t0 + delay - time.monotonic()))
        procs[rank].send_signal(signal.SIGTERM)
    codes = finish(procs, timeout=60)
    return codes, time.monotonic() - t0


@pytest.mark.parametrize("delays", [{1: 0.0}, {1: 0.0, 0: 0.4}], ids=["one-rank", "both-400ms-apart"])
def test_sigterm_checkpoints_every_rank_and_exits_with_the_preemption_code(tmp_path: Path, png_folder: Path,
                                                                         free_port: int, delays) -> None:
    out = tmp_path / "run"
    codes, seconds = _preempt(out, png_folder, free_port, delays)
    assert codes == [PREEMPTED_EXIT_CODE, PREEMPTED_EXIT_CODE]
    assert seconds < 10
    ckpts = list_checkpoints(out)
    assert len(ckpts) == 1 and 3 <= int(ckpts[0].stem.split("_")[1]) < STEPS
    stopped = int(ckpts[0].stem.split("_")[1])
    assert max(r["step"] for r in read_metrics(out)) == stopped
    print(f"pre-empted at step {stopped}; both ranks exited {codes} {seconds:.1f} s after the first signal")
    if len(delays) > 1:
        return
    # resume on two ranks: the run completes and matches an uninterrupted two-rank run
    resumed = finish(start_ranks(train_args(out, png_folder, *EXTRA), world=2, port=free_port + 1))
    assert resumed == [0, 0]
    ref = finish(start_ranks(train_args(tmp_path / "ref", png_folder, *EXTRA), world=2, port=free_port + 2))
    assert ref == [0, 0]
    a, b = read_metrics(out), read_metrics(tmp_path / "ref")
    assert [r["step"] for r in a] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in TERMS:
            assert x[key] == y[key], (x["step"], key)
