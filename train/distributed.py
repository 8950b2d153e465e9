"""Distributed set-up in one place: torchrun's environment -> process group, device, rank flags.

`python -m train` (no RANK in the environment) is one process on one device; under `torchrun` every rank
joins a process group (NCCL on GPU, gloo on CPU) and drives `cuda:LOCAL_RANK`. Multi-node runs need nothing
here beyond what torchrun's c10d rendezvous puts in the environment.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(use_cuda: bool | None = None, timeout_min: float = 30) -> Dist:
    use_cuda = torch.cuda.is_available() if use_cuda is None else use_cuda
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda", 0) if use_cuda else torch.device("cpu"))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=timeout_min),
                                **({"device_id": device} if use_cuda else {}))
    return Dist(rank, world, local, device)


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every rank if it is True on any rank (e.g. a pre-emption signal that reached only some)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def max_over_ranks(values: list[int], d: Dist) -> list[int]:
    """Element-wise maximum of small integer flags/counts over ranks: one collective for several decisions."""
    if not d.enabled:
        return list(values)
    t = torch.tensor(values, device=d.device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def mean_over_ranks(values: dict[str, float], d: Dist) -> dict[str, float]:
    if not d.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], device=d.device, dtype=torch.float64)
    dist.all_reduce(t)
    return {k: v / d.world_size for k, v in zip(keys, t.tolist())}


def gather_objects(obj, d: Dist) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable Python objects, e.g. RNG states)."""
    if not d.enabled:
        return [obj]
    out = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
