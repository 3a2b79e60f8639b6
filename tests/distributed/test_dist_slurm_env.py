"""SLURM without torchrun: rank, world size, local rank and master address come from SLURM_* variables."""

from __future__ import annotations

import os

import pytest

from medfoundry.distributed import setup

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NODELIST")


@pytest.fixture()
def slurm_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for var in TORCHRUN_VARS:  # set then delete, so monkeypatch restores (removes) what init_distributed sets
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "12")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[03-05]")
    return monkeypatch


def test_slurm_rank_world_and_master(slurm_env: pytest.MonkeyPatch) -> None:
    info = setup.env_dist_info()
    assert (info.rank, info.world_size, info.local_rank) == (5, 12, 1)
    assert info.enabled and not info.is_main
    assert setup._slurm_master() == "node03"


@pytest.mark.parametrize(
    ("nodelist", "first"),
    [
        ("node[03-05]", "node03"),
        ("node07", "node07"),
        ("node01,node02", "node01"),
        ("node[03,05-07]", "node03"),
        ("gpu-a[01-02],gpu-b07", "gpu-a01"),
        ("rack[1-2]-n[01-03]", "rack1-n01"),
    ],
)
def test_first_host_of_nodelist(slurm_env: pytest.MonkeyPatch, nodelist: str, first: str) -> None:
    slurm_env.setenv("SLURM_JOB_NODELIST", nodelist)
    assert setup._slurm_master() == first


def test_torchrun_variables_win_over_slurm(slurm_env: pytest.MonkeyPatch) -> None:
    slurm_env.setenv("RANK", "2")
    slurm_env.setenv("WORLD_SIZE", "4")
    slurm_env.setenv("LOCAL_RANK", "0")
    info = setup.env_dist_info()
    assert (info.rank, info.world_size, info.local_rank) == (2, 4, 0)


def test_single_task_srun_is_not_distributed(slurm_env: pytest.MonkeyPatch) -> None:
    slurm_env.setenv("SLURM_NTASKS", "1")
    slurm_env.setenv("SLURM_PROCID", "0")
    assert not setup.env_dist_info().enabled


def test_init_distributed_exports_slurm_rendezvous(slurm_env: pytest.MonkeyPatch) -> None:
    """``init_distributed`` under srun fills the torch variables and calls init_process_group with SLURM's ranks."""
    calls: dict = {}
    slurm_env.setattr(setup.dist, "is_initialized", lambda: False)
    slurm_env.setattr(setup.dist, "init_process_group", lambda **kw: calls.update(kw))
    info = setup.init_distributed("gloo")
    assert info.rank == 5 and info.world_size == 12
    assert calls == {"backend": "gloo", "rank": 5, "world_size": 12}
    assert os.environ["MASTER_ADDR"] == "node03"
    assert os.environ["MASTER_PORT"] == "29500"
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "12", "1")
