"""Shared pieces of the fault-injection tests: a tiny training run launched as real processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from medfoundry.recipes import recipes_dir

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"
FAST = ["crops.global_size=32", "crops.local_size=16", "model.img_size=32", "train.batch_size=4",
        "train.progress=false", "train.tensorboard=false", "train.log_every=1"]
TERMS = ("loss", "dino_loss", "ibot_loss", "koleo_loss")
RUNNER = Path(__file__).with_name("fault_runner.py")


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a child run: one thread (identical numerics in every process), no stray ranks."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MF_FAULT")}
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", **extra})
    return env


def train_args(out: Path, root: Path, *extra: str) -> list[str]:
    """``medfoundry train`` arguments of the tiny run."""
    return ["train", str(RECIPE), *FAST, f"output_dir={out}", f"data.root={root}", *extra]


def start(args: list[str], fault: str = "", **env: str) -> subprocess.Popen:
    """Start ``medfoundry`` (through the fault runner, which injects ``fault``) as a child process."""
    return subprocess.Popen([sys.executable, str(RUNNER), *args], env=child_env(MF_FAULT=fault, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(args: list[str], fault: str = "", timeout: float = 240, **env: str) -> subprocess.CompletedProcess:
    """Run ``medfoundry`` to the end in a child process."""
    return subprocess.run([sys.executable, str(RUNNER), *args], env=child_env(MF_FAULT=fault, **env),
                          capture_output=True, text=True, timeout=timeout)


def logged_steps(run_dir: Path) -> list[int]:
    """Steps in ``metrics.jsonl`` so far (a partly written last line is ignored)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return steps


def wait_for_step(run_dir: Path, step: int, procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Block until ``metrics.jsonl`` reaches ``step`` (fails if a process ends first)."""
    t0 = time.monotonic()
    while max(logged_steps(run_dir), default=0) < step:
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process ended early ({p.returncode}): {p.stderr.read()[-3000:]}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"step {step} not reached in {timeout} s")
        time.sleep(0.05)


def stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files of interrupted writes anywhere under the run folder."""
    return [p for p in Path(run_dir).rglob("*") if ".tmp" in p.name]


def rank_env(rank: int, world: int, port: int) -> dict[str, str]:
    """The variables a launcher (srun, torchrun) gives each rank."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port)}


def start_ranks(args: list[str], world: int, port: int) -> list[subprocess.Popen]:
    """Start ``world`` gloo ranks of ``medfoundry`` directly (as srun does; no torchrun agent in between)."""
    procs = []
    for rank in range(world):
        env = child_env(**rank_env(rank, world, port))
        procs.append(subprocess.Popen([sys.executable, str(RUNNER), *args], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 240) -> list[int]:
    """Wait for every process; returns their exit codes (kills them all on timeout)."""
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return codes
