"""Saving an FSDP2 run never gathers the full state: each rank writes only its own shards.

Two gloo ranks shard a DINO method with :func:`medfoundry.distributed.parallelize.apply_fsdp`, take one
optimizer step and save through the training loop's own ``_save``. During the save nothing may call
``DTensor.full_tensor`` / ``redistribute`` or the all-gather FSDP2 unshards with; afterwards the
checkpoint's metadata must show every sharded weight and AdamW moment as one half per rank, each half in
that rank's own ``.distcp`` file. The best checkpoint of in-training evaluation (``eval/best.py``) is held
to the same: under FSDP it is the sharded ``RUN/best.dcp/``, written without a gather, and it loads back
(consolidated on the CPU) with the weights the ranks held.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow  # multi-process (see pyproject's markers)

OVERRIDES = ["model.name=vit_tiny_patch8", "model.img_size=32", "model.in_chans=1", "dino.head.out_dim=64",
             "dino.head.hidden_dim=32", "dino.head.bottleneck_dim=16", "dino.ibot_weight=1.0",
             "dist.strategy=fsdp", "train.keep_last=2"]


def _batch(b: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2, b, 16, generator=g) < 0.3
    masks[:, :, 0] = True
    return {"global_crops": torch.randn(2, b, 1, 32, 32, generator=g),
            "local_crops": torch.randn(2, b, 1, 16, 16, generator=g), "masks": masks}


def _worker(rank: int, port: int, run_dir: str, result_path: str) -> None:
    from unittest import mock

    from torch.distributed.tensor import DTensor

    from medfoundry.config import load_config
    from medfoundry.distributed.parallelize import apply_fsdp
    from medfoundry.distributed.setup import DistInfo
    from medfoundry.eval.best import BestCheckpoint
    from medfoundry.methods.dino.method import DINOMethod
    from medfoundry.train import loop

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        cfg = load_config(None, [*OVERRIDES, f"output_dir={run_dir}"])
        torch.manual_seed(0)
        method = DINOMethod(cfg.model, cfg.dino, total_steps=10)
        apply_fsdp(method)
        optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
        method(_batch(), 0)["loss"].backward()
        optimizer.step()
        calls = {"full_tensor": 0, "redistribute": 0, "all_gather_into_tensor": 0}

        def counting(name, original):
            def wrapper(*args, **kwargs):
                calls[name] += 1
                return original(*args, **kwargs)
            return wrapper

        with mock.patch.object(DTensor, "full_tensor", counting("full_tensor", DTensor.full_tensor)), \
                mock.patch.object(DTensor, "redistribute", counting("redistribute", DTensor.redistribute)), \
                mock.patch.object(dist, "all_gather_into_tensor",
                                  counting("all_gather_into_tensor", dist.all_gather_into_tensor)):
            loop._save(Path(run_dir), 1, method, optimizer, cfg, DistInfo(rank, 2, rank), 0, {})
            best = BestCheckpoint("val_knn_top1_k20", "max", {"method": "dino"}, "eval.best_metric")
            best.update(1, {"val_knn_top1_k20": 0.5}, method, Path(run_dir))
        sharded = {f"method.{n}": tuple(p.shape) for n, p in method.named_parameters()
                   if isinstance(p, DTensor) and p.shape[0] >= 2}
        moments = {f"optimizer.state.{n}.exp_avg": tuple(p.shape) for n, p in method.named_parameters()
                   if isinstance(p, DTensor) and p.requires_grad and p.shape[0] >= 2}
        cls = method.teacher.backbone.vit.cls_token.full_tensor()  # after the saves: what best.dcp must hold
        if rank == 0:
            torch.save(cls, f"{result_path}.cls.pt")
        Path(f"{result_path}.{rank}").write_text(json.dumps({"calls": calls, "sharded": sharded, "moments": moments}))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp_save_writes_per_rank_shards_without_gathering(tmp_path: Path, free_port: int) -> None:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

    run_dir, result = tmp_path / "run", tmp_path / "result.json"
    mp.spawn(_worker, args=(free_port, str(run_dir), str(result)), nprocs=2, join=True)
    ranks = [json.loads(Path(f"{result}.{r}").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["calls"] == {"full_tensor": 0, "redistribute": 0, "all_gather_into_tensor": 0}

    folder = run_dir / "checkpoints" / "step_00000001.dcp"
    files = sorted(p.name for p in folder.glob("*.distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]
    metadata = FileSystemReader(str(folder)).read_metadata()
    expected = {**ranks[0]["sharded"], **ranks[0]["moments"]}
    assert len(ranks[0]["sharded"]) > 20 and len(ranks[0]["moments"]) > 20
    for key, shape in expected.items():
        entry = metadata.state_dict_metadata[key]
        assert isinstance(entry, TensorStorageMetadata) and tuple(entry.size) == tuple(shape), key
        chunks = [c for c in entry.chunks if c.sizes[0] > 0]
        assert len(chunks) == 2, (key, chunks)  # one half per rank, never the whole tensor in one chunk
        assert all(c.sizes[0] < shape[0] for c in chunks), key
        homes = {metadata.storage_data[MetadataIndex(key, c.offsets)].relative_path for c in chunks}
        assert homes == set(files), (key, homes)  # each half in its own rank's file
    sizes = [(folder / f).stat().st_size for f in files]
    assert max(sizes) < 0.6 * sum(sizes)  # neither rank wrote (nearly) everything

    best = run_dir / "best.dcp"  # sharded too: no best.pt, one half of each weight per rank's file
    assert not (run_dir / "best.pt").exists() and sorted(p.name for p in best.glob("*.distcp")) == files
    assert json.loads((run_dir / "best.json").read_text())["checkpoint"] == "best.dcp"
    best_meta = FileSystemReader(str(best)).read_metadata()
    for key, shape in ranks[0]["sharded"].items():
        chunks = [c for c in best_meta.state_dict_metadata[key].chunks if c.sizes[0] > 0]
        assert len(chunks) == 2 and all(c.sizes[0] < shape[0] for c in chunks), key
    from medfoundry.checkpoints.format import load_checkpoint
    from medfoundry.checkpoints.integrity import verify_checkpoint
    from medfoundry.methods.checkpoint_backbone import resolve_checkpoint

    assert verify_checkpoint(best) == "checksum"
    assert resolve_checkpoint(run_dir, which="best") == best
    state = load_checkpoint(best)  # consolidated on the CPU, in one process
    assert state["step"] == 1 and state["value"] == 0.5 and state["format"] == "medfoundry-best-v1"
    assert torch.equal(state["method"]["teacher.backbone.vit.cls_token"], torch.load(f"{result}.cls.pt"))
