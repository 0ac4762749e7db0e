"""DistributedDataParallel on 2 CPU processes (gloo) with the BR-NPA head agrees with one process
trained on the concatenated batch."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from brnpa_triton.nn import BRNPAClassifier

STEPS, BATCH, WORLD = 4, 8, 2


def make_model():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU())
    return BRNPAClassifier(backbone, 6, 3, num_parts=3)


def make_data():
    g = torch.Generator().manual_seed(1)
    return torch.rand(STEPS, BATCH, 1, 7, 7, generator=g), torch.randint(0, 3, (STEPS, BATCH), generator=g)


def train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for x, y in zip(xs, ys, strict=True):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _worker(rank, port, path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(make_model())
        xs, ys = make_data()
        half = BATCH // WORLD
        train(model, xs[:, rank * half : (rank + 1) * half], ys[:, rank * half : (rank + 1) * half])
        torch.save(model.module.state_dict(), f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)
def test_ddp_two_processes_match_single_process(tmp_path):
    path = os.fspath(tmp_path / "state")
    mp.spawn(_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    xs, ys = make_data()
    single = train(make_model(), xs, ys).state_dict()
    initial = make_model().state_dict()
    for rank in range(WORLD):
        ddp = torch.load(f"{path}.{rank}")
        for name, value in single.items():
            torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=f"rank {rank}: {name}")
    assert any(not torch.equal(initial[n], single[n]) for n in single)  # training moved the weights
