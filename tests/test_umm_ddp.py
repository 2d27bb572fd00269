"""UMM's losses under real 2-process DDP (gloo): candidates all-gathered with gradient, L_S on the whole
batch, L_R on each rank's share of the queries. After DDP's gradient averaging, every row gets exactly the
gradient that one process computing the full losses gives it."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.nn.functional import all_gather

from embedding_core.distances import l2_normalize
from lightning_modules.umm import ranking_loss, set_softmax_loss

WORLD, N, K, D = 2, 6, 3, 8  # N instances per rank


def candidates() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return tuple(l2_normalize(torch.randn(WORLD * N, K, D, generator=g)) for _ in range(2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    z1, z2 = (z[rank * N:(rank + 1) * N].clone().requires_grad_() for z in candidates())
    g1, g2 = (torch.cat(all_gather(z)) for z in (z1, z2))
    loss = set_softmax_loss(g1, g2) + ranking_loss(g1, g2, shard=(rank, WORLD))
    loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save((z1.grad / WORLD, z2.grad / WORLD, mean_loss / WORLD), f"{out}/{rank}.pt")  # DDP: mean over ranks
    dist.destroy_process_group()


def test_sharded_losses_give_the_single_process_gradient(tmp_path):
    z1, z2 = (z.clone().requires_grad_() for z in candidates())
    expected = set_softmax_loss(z1, z2) + ranking_loss(z1, z2)
    expected.backward()
    mp.spawn(rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        grad1, grad2, loss = torch.load(tmp_path / f"{rank}.pt")
        rows = slice(rank * N, (rank + 1) * N)
        assert torch.allclose(grad1, z1.grad[rows], atol=1e-6)
        assert torch.allclose(grad2, z2.grad[rows], atol=1e-6)
        assert abs(loss.item() - expected.item()) < 1e-6
