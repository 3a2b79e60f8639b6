"""Two-process (gloo, CPU) checks that the loss statistics are computed over the global batch.

Each worker first computes the single-process reference on the *whole* batch (no process group
yet, so every collective is a no-op), then joins the group and recomputes on its own shard.
"""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medfoundry.losses import DINOLoss, IBOTPatchLoss, sinkhorn_knopp
from medfoundry.losses._dist import all_reduce_mean, all_reduce_sum, world_size

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1234)
    n_protos = 6
    cls_logits = torch.randn(2 * 5, n_protos, generator=g) * 3  # global batch of 10 rows
    # iBOT: rank 0 holds 7 masked patches, rank 1 holds 2 (unequal shards)
    patch_logits = torch.randn(9, n_protos, generator=g) * 3
    patch_split = [7, 2]
    # iBOT with an empty shard on rank 1
    empty_split = [4, 0]

    # ---- single-process references on the whole batch ----
    assert world_size() == 1
    dino_ref = DINOLoss(n_protos, center_momentum=0.7)
    dino_ref.update_center(cls_logits)
    dino_sk_ref = dino_ref.teacher_probs_sinkhorn(cls_logits, teacher_temp=0.1)
    ibot_ref = IBOTPatchLoss(n_protos, center_momentum=0.7)
    ibot_ref.update_center(patch_logits)
    ibot_sk_ref = ibot_ref.teacher_probs_sinkhorn(patch_logits, teacher_temp=0.1)
    empty_ref = sinkhorn_knopp(patch_logits[:4], 0.1, n_iterations=5)

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    try:
        assert world_size() == WORLD
        torch.testing.assert_close(all_reduce_sum(torch.tensor([float(rank + 1)])), torch.tensor([3.0]))
        torch.testing.assert_close(all_reduce_mean(torch.tensor([float(rank)])), torch.tensor([0.5]))

        # DINO: equal halves of the CLS batch
        cls_shard = cls_logits.chunk(WORLD)[rank]
        rows = slice(rank * 5, (rank + 1) * 5)
        dino = DINOLoss(n_protos, center_momentum=0.7)
        dino.update_center(cls_shard)
        torch.testing.assert_close(dino.center, dino_ref.center)
        torch.testing.assert_close(
            dino.teacher_probs_sinkhorn(cls_shard, teacher_temp=0.1), dino_sk_ref[rows]
        )
        torch.testing.assert_close(sinkhorn_knopp(cls_shard, 0.1, n_rows_global=10), dino_sk_ref[rows])

        # iBOT: unequal shards of masked patches
        start = sum(patch_split[:rank])
        patch_rows = slice(start, start + patch_split[rank])
        ibot = IBOTPatchLoss(n_protos, center_momentum=0.7)
        ibot.update_center(patch_logits[patch_rows])
        torch.testing.assert_close(ibot.center, ibot_ref.center)
        out = ibot.teacher_probs_sinkhorn(patch_logits[patch_rows], teacher_temp=0.1)
        torch.testing.assert_close(out, ibot_sk_ref[patch_rows])

        # A rank with no rows still takes part in the collectives.
        start = sum(empty_split[:rank])
        shard = patch_logits[start : start + empty_split[rank]]
        out = sinkhorn_knopp(shard, 0.1, n_iterations=5)
        assert out.shape == (empty_split[rank], n_protos)
        torch.testing.assert_close(out, empty_ref[start : start + empty_split[rank]])
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend unavailable")
def test_two_rank_statistics_match_single_process():
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD, join=True)
