"""Data-parallel replicas of one model in separate processes (the Ray backend's actor and critic
groups): a torch.distributed process group at an address the driver chooses, the gradient
all-reduce, and sums of per-replica figures.

Why by hand and not DDP: the replicas run the RL update (`controller.minibatch_updates`), whose
micro-batches differ in number between ranks; one coalesced all-reduce of the summed gradients
after the last backward is all the synchronisation it needs, works the same for the actor and
for the critic (whose forward does not go through its module's `forward`), and keeps accelerate
in its single-process mode. Each rank scales its micro-batch losses by the *global* token count,
so the SUM of the ranks' gradients is exactly the one-process gradient of the whole minibatch.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterable

import torch
import torch.distributed as dist


def init_group(addr: str, port: int, rank: int, world: int, timeout_s: float = 300.0) -> str:
    """Join the process group of `world` replicas whose TCP store rank 0 serves at addr:port;
    NCCL when this process has a GPU, gloo otherwise. Returns the backend."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; one replica per process")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return backend


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum every trainable parameter's gradient over the group, one flat all-reduce per dtype and
    device (a parameter without a gradient on this rank counts as zeros, so every rank sends the
    same layout)."""
    buckets: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in params:
        if p.requires_grad:
            buckets.setdefault((p.dtype, p.device), []).append(p)
    for group in buckets.values():
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n


def all_reduce_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the group (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_max(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def shard(n: int, rank: int, world: int) -> list[int]:
    """This rank's contiguous share of n rows (sizes differ by at most one), as `Batch.split`."""
    return list(range(round(rank * n / world), round((rank + 1) * n / world)))
