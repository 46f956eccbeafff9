"""Two gloo processes on CPU must train the same Uni-RCM as one process with the same global batches."""

from __future__ import annotations

import socket
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mmiad.methods.unircm import UniRCM
from mmiad.utils import distributed as ddp

GRID = 8
CONFIG = {
    "grid_size": GRID,
    "image_size": 16,
    "hidden": 16,
    "num_blocks": 1,
    "epochs": 2,
    "batch_size": 3,
    "learning_rate": 3e-3,
    "orq_layers": 2,
    "codebook_size_2d": 4,
    "codebook_size_3d": 4,
    "orq_iterations": 3,
    "orq_max_points": 60,  # the ORQ subsample is drawn across ranks
    "device": "cpu",
    "seed": 5,
}


def samples() -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    store = {}
    for i in range(5):
        mask = torch.rand(GRID * GRID, generator=generator) > 0.3 + 0.1 * i  # unequal foreground per sample
        rows_3d = torch.randn(GRID * GRID, 4, generator=generator) * mask[:, None]
        rows_2d = torch.randn(GRID * GRID, 6, generator=generator) * mask[:, None]
        store[i] = (rows_2d, rows_3d, mask)
    return store


def _worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        shard = {i: g for i, g in samples().items() if ddp.owned(i)}
        model = UniRCM(**CONFIG).fit_grids(shard)
        torch.save({"state": model.state_tensors(), "loss": model.loss_history_}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return int(handle.getsockname()[1])


def test_two_processes_match_one(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    single = UniRCM(**CONFIG).fit_grids(samples())
    expected = single.state_tensors()
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        assert result["state"].keys() == expected.keys()
        for name, tensor in expected.items():
            torch.testing.assert_close(result["state"][name], tensor, atol=2e-5, rtol=1e-4, msg=name)
        assert result["loss"] == [pytest_approx(v) for v in single.loss_history_]
    # The shards really differed: rank 0 owned samples 0, 2, 4 and rank 1 samples 1, 3.
    assert ddp.world_size() == 1 and not ddp.is_distributed()


def pytest_approx(value: float):  # small local alias keeps the comparison readable
    import pytest

    return pytest.approx(value, rel=1e-5)
