"""The only place in model/ that touches torch.distributed.

Each helper is an identity when no process group is initialised (world size 1), so CPU tests and
single-GPU runs take the same code path. model/ never initialises a process group; train/ does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def concat_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` ([N, ...], the same N on every rank) from all ranks along dim 0, in rank order.

    Warning: no gradient flows through the gather.
    """
    if world_size() == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(out, x)
    return torch.cat(out, dim=0)  # (W*N) x ...


@torch.no_grad()
def batch_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shuffle-BN, step 1: gather the batch of all ranks, permute it by one permutation drawn on rank 0
    and broadcast, and return this rank's slice plus the index that undoes the permutation.

    On one process it is a no-op (BN statistics over the whole batch do not depend on order) and the
    returned index is None.
    """
    W = world_size()
    if W == 1:
        return x, None
    n = x.shape[0]
    x_all = concat_all_gather(x)  # (W*n) x ...
    perm = torch.randperm(x_all.shape[0], device=x.device)  # W*n
    dist.broadcast(perm, src=0)
    idx_unshuffle = torch.argsort(perm)  # W*n
    mine = perm.view(W, n)[rank()]  # n
    return x_all[mine], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor | None) -> torch.Tensor:
    """Shuffle-BN, step 2: put the key encoder's per-sample outputs back in this rank's original order."""
    if idx_unshuffle is None:
        return x
    W, n = world_size(), x.shape[0]
    x_all = concat_all_gather(x)  # (W*n) x ...
    mine = idx_unshuffle.view(W, n)[rank()]  # n
    return x_all[mine]
