"""ddp.sync_batchnorm=true: two ranks, each with half a batch, normalise as one process does with the
whole batch (outputs, gradients and running statistics), on CPUs over gloo."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from alexnet_dist.training.sync_batchnorm import GlobalBatchNorm, SyncBatchNorm


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))


def batch() -> torch.Tensor:
    return torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(1)) * 3 + 1


def rank_main(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    net = SyncBatchNorm().apply(network())
    assert isinstance(net[1], GlobalBatchNorm)
    x = batch()[rank * 4 : rank * 4 + 4]
    y = net(x)
    y.sum().backward()
    state = {"y": y.detach(), "grad": net[0].weight.grad, "bn": {k: v.clone() for k, v in net[1].state_dict().items()}}
    torch.save(state, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_with_half_a_batch_each_normalise_like_one_process_with_the_whole(tmp_path):
    from conftest import free_port

    mp.spawn(rank_main, args=(free_port(), str(tmp_path / "r")), nprocs=2)
    ranks = [torch.load(tmp_path / f"r.{rank}") for rank in range(2)]
    whole = network()
    y = whole(batch())
    y.sum().backward()
    assert torch.allclose(torch.cat([r["y"] for r in ranks]), y.detach(), atol=1e-5)
    # each rank's gradient is its half's share of the whole batch's (DDP then averages them)
    assert torch.allclose(ranks[0]["grad"] + ranks[1]["grad"], whole[0].weight.grad, atol=1e-4)
    for key, value in whole[1].state_dict().items():
        assert torch.allclose(ranks[0]["bn"][key].to(value.dtype), value, atol=1e-6), key
        assert torch.equal(ranks[0]["bn"][key], ranks[1]["bn"][key]), key
    assert set(ranks[0]["bn"]) == set(whole[1].state_dict())  # BatchNorm's names: checkpoints load as before
