"""``medfoundry launch --slurm ... --dry-run`` writes a valid sbatch script without a cluster; torchrun commands."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from medfoundry.recipes import recipes_dir
from medfoundry_cli.cli import main
from medfoundry_cli.slurm import (
    LaunchError,
    SlurmSpec,
    parse_slurm_opts,
    parse_time_minutes,
    split_launch_tokens,
    torchrun_command,
)

RECIPE = recipes_dir() / "tiny_dino_cpu.yaml"


def _dry_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *extra: str, settings=()) -> tuple[int, Path]:
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "runs" / "big"
    argv = ["launch", "--slurm", *settings, str(RECIPE), f"output_dir={run_dir}", "train.steps=100",
            "crops.global_scale=[0.3,1.0]", "--dry-run", *extra]
    return main(argv), run_dir


def test_dry_run_writes_valid_sbatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    rc, run_dir = _dry_run(tmp_path, monkeypatch, "--slurm-opt", "qos=high", "--setup", "module load cuda/12.4",
                           settings=("nodes=2", "gpus_per_node=4", "time=1:30:00", "partition=gpu",
                                     "account=proj1", "cpus_per_task=8", "mem=200G"))
    assert rc == 0
    script_path = run_dir / "launch" / "submit.sbatch"
    assert script_path.is_file()
    text = script_path.read_text()
    assert text.startswith("#!/bin/bash\n")
    assert text.strip() in capsys.readouterr().out  # the dry run also prints the script
    flags = dict(re.findall(r"^#SBATCH --([a-z-]+)(?:=(.*))?$", text, flags=re.M))
    assert flags["nodes"] == "2"
    assert flags["ntasks-per-node"] == "4"
    assert flags["gpus-per-node"] == "4" or flags.get("gres") == "gpu:4"
    assert flags["time"] == "90"
    assert flags["partition"] == "gpu" and flags["account"] == "proj1"
    assert flags["cpus-per-task"] == "8" and flags["mem"] == "200G" and flags["qos"] == "high"
    assert flags["signal"] == "USR1@120"  # the training loop checkpoints on SIGUSR1
    assert flags["chdir"] == str(tmp_path)
    assert "module load cuda/12.4" in text
    srun = [line for line in text.splitlines() if line.startswith("srun ")]
    assert len(srun) == 1
    args = shlex.split(srun[0])
    i = args.index("medfoundry_cli")
    assert args[i - 1] == "-m" and args[i + 1] == "train"
    assert args[i + 2] == str(RECIPE.resolve())
    assert args[i + 3:] == [f"output_dir={run_dir}", "train.steps=100", "crops.global_scale=[0.3,1.0]"]
    bash = shutil.which("bash")
    assert bash is not None
    check = subprocess.run([bash, "-n", str(script_path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr


def test_gres_option_replaces_gpus_per_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rc, run_dir = _dry_run(tmp_path, monkeypatch, "--slurm-opt", "gres=gpu:a100:2",
                           settings=("nodes=1", "gpus_per_node=2", "time=30"))
    assert rc == 0
    text = (run_dir / "launch" / "submit.sbatch").read_text()
    assert "#SBATCH --gres=gpu:a100:2" in text and "--gpus-per-node" not in text
    assert "#SBATCH --ntasks-per-node=2" in text and "#SBATCH --time=30" in text


def test_bad_setting_and_bad_config_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    rc, _ = _dry_run(tmp_path, monkeypatch, settings=("nodes=2", "gpu_per_node=4"))
    assert rc == 2 and "gpus_per_node" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)
    rc = main(["launch", "--slurm", "nodes=1", str(RECIPE), "train.stepz=3", "output_dir=x", "--dry-run"])
    assert rc == 2 and "train.steps" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("text", "minutes"),
    [("90", 90), ("1:30:00", 90), ("10:30", 11), ("2-00", 2880), ("1-02:03", 1563), ("0-00:00:30", 1)],
)
def test_time_formats(text: str, minutes: int) -> None:
    assert parse_time_minutes(text) == minutes


def test_parsing_helpers() -> None:
    assert split_launch_tokens(["nodes=2", "r.yaml", "a.b=1"]) == (["nodes=2"], "r.yaml", ["a.b=1"])
    with pytest.raises(LaunchError):
        split_launch_tokens(["nodes=2"])
    with pytest.raises(LaunchError):
        parse_time_minutes("soon")
    assert parse_slurm_opts(["--exclusive", "mail_type=END"]) == {"exclusive": True, "mail-type": "END"}
    spec = SlurmSpec(nodes=3, gpus_per_node=0)
    assert spec.ntasks_per_node == 1 and spec.world_size == 3 and "gpus_per_node" not in spec.parameters("j")


def test_torchrun_commands(tmp_path: Path, capsys) -> None:
    single = torchrun_command("r.yaml", ["train.steps=5"], gpus_per_node=2, python="python")
    assert single == ["python", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--standalone",
                      "-m", "medfoundry_cli", "train", "r.yaml", "train.steps=5"]
    multi = torchrun_command("r.yaml", [], nodes=2, gpus_per_node=8, node_rank=1, rdzv_endpoint="n0:29400")
    assert "--nnodes=2" in multi and "--node-rank=1" in multi and "--rdzv-endpoint=n0:29400" in multi
    with pytest.raises(LaunchError):
        torchrun_command("r.yaml", [], nodes=2, gpus_per_node=8)
    rc = main(["launch", "nodes=2", "gpus_per_node=4", "node_rank=0", "rdzv_endpoint=host0:29400", str(RECIPE),
               f"output_dir={tmp_path / 'r'}", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "torch.distributed.run --nnodes=2 --nproc-per-node=4 --node-rank=0" in out


def test_submit_through_submitit_with_fake_sbatch(tmp_path: Path, fake_slurm: Path, capsys) -> None:
    """A real (non dry-run) submission goes through submitit's SlurmExecutor; sbatch and srun are stand-ins."""
    calls = fake_slurm
    run_dir = tmp_path / "run"
    rc = main(["launch", "--slurm", "nodes=1", "gpus_per_node=2", "time=10", str(RECIPE), f"output_dir={run_dir}"])
    assert rc == 0 and "submitted SLURM job 4242" in capsys.readouterr().out
    assert calls.read_text().count("\n") == 1
    text = (run_dir / "launch" / "submit.sbatch").read_text()
    assert "#SBATCH --ntasks-per-node=2" in text and "-m medfoundry_cli train" in text
    assert '"job_id": "4242"' in (run_dir / "launch" / "job.json").read_text()


@pytest.mark.parametrize(("task_exit", "requeued"), [(75, True), (0, False), (1, False)])
def test_sbatch_script_requeues_a_preempted_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_exit: int,
                                                requeued: bool) -> None:
    """The written script itself, run by bash with stand-in srun/scontrol: exit 75 (pre-empted) requeues the job."""
    from medfoundry.train.preemption import PREEMPTED_EXIT_CODE

    assert PREEMPTED_EXIT_CODE == 75
    rc, run_dir = _dry_run(tmp_path, monkeypatch)
    assert rc == 0
    script = run_dir / "launch" / "submit.sbatch"
    assert "#SBATCH --requeue" in script.read_text()
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(f"#!/bin/sh\nexit {task_exit}\n")
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    for exe in ("srun", "scontrol"):
        (bin_dir / exe).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node1"}
    proc = subprocess.run([shutil.which("bash"), str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == task_exit
    recorded = calls.read_text() if calls.exists() else ""
    assert ("requeue 4242" in recorded) == requeued, recorded
