"""Ring-buffer queue of L2-normalised keys, all-gathered across ranks (MoCo-style memory).

Unlike the reference there is no "K divisible by the batch" assertion: writes wrap around the end of
the buffer, and a write larger than K keeps only its newest K rows. Rows are stored oldest-overwritten
first (FIFO). The keys and the write pointer are buffers, so they move with the module and are saved
in its state_dict.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import concat_all_gather


class KeyQueue(nn.Module):
    """K x dim ring buffer; K = 0 gives an empty queue whose `enqueue` is a no-op."""

    def __init__(self, K: int, dim: int = 128):
        super().__init__()
        self.K, self.dim = int(K), int(dim)
        self.register_buffer("keys", F.normalize(torch.randn(self.K, self.dim), dim=1))  # K x dim
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    def snapshot(self) -> torch.Tensor:
        """A copy of the keys (K x dim) that later in-place enqueues cannot change under autograd."""
        return self.keys.clone()

    @torch.no_grad()
    def enqueue(self, k: torch.Tensor, gather: bool = True) -> None:
        """Write N x dim keys (this rank's; gathered across ranks first unless gather=False)."""
        if self.K == 0:
            return
        if gather:
            k = concat_all_gather(k)  # (W*N) x dim
        k = k.detach().to(self.keys.dtype).reshape(-1, self.dim)  # N x dim
        N = k.shape[0]
        skip = max(N - self.K, 0)  # rows that would be overwritten within this same write
        offs = torch.arange(skip, N, device=self.keys.device)  # n = min(N, K)
        self.keys[(self.ptr + offs) % self.K] = k[skip:]  # device-side pointer: no host sync
        self.ptr.copy_((self.ptr + N) % self.K)
