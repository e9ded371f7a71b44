"""Pretraining under DistributedDataParallel: the step's loss must go through the DDP wrapper, or each rank keeps
its own gradients and the ranks' encoders drift apart (two CPU processes, gloo)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medssl.config import load_config
from medssl.methods import build_method
from medssl.models import build_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _step(rank: int, world: int, port: int, through_wrapper: bool, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # the same start weights on both ranks
        cfg = load_config("demo", overrides=["pretrain.method=simclr", "model.features=4"])
        seg = build_model("unet", in_channels=1, n_classes=2, features=4)
        method = build_method("simclr", seg.encoder, cfg.pretrain, cfg.aug)
        net = torch.nn.parallel.DistributedDataParallel(method)
        g = torch.Generator().manual_seed(rank)
        batch = {"image": torch.randn(4, 1, 32, 32, generator=g)}  # each rank its own data
        loss, _ = net(batch, g) if through_wrapper else method.loss(batch, g)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in method.encoder.parameters() if p.grad is not None])
        both = [torch.zeros_like(grad) for _ in range(world)]
        dist.all_gather(both, grad)
        if rank == 0:
            torch.save(both, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("through_wrapper", [True, False])
def test_pretraining_gradients_are_averaged_over_ranks(tmp_path, through_wrapper):
    out = str(tmp_path / "grads.pt")
    mp.spawn(_step, args=(2, _free_port(), through_wrapper, out), nprocs=2, join=True)
    a, b = torch.load(out, weights_only=True)
    if through_wrapper:  # what the engine does: the ranks end the step with the same (averaged) gradients
        assert torch.allclose(a, b, atol=1e-6)
    else:  # calling the method's loss around the wrapper, as the engine once did: no averaging
        assert not torch.allclose(a, b, atol=1e-6)
