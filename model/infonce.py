"""Generic contrastive helpers shared by the objectives (MoCo, FAME, FIMA, multi-level): InfoNCE logits and loss,
top-1 of the positive, and the fp32 guard they all run under.

Everything here runs in fp32 with autocast switched off, and every normaliser is a log-sum-exp, so
bf16/fp16 training cannot overflow the sums of exp(s / tau) (reference pitfall 9).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def fp32(device: torch.device):
    """Context that disables autocast on `device`, so the loss math really runs in fp32."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def info_nce_logits(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """MoCo logits: q, k [B, D] unit vectors, negatives [M, D] -> [B, 1+M] = [q.k, q.n_1..q.n_M] / tau.

    The positive is class 0.
    """
    with fp32(q.device):
        q, k, negatives = q.float(), k.float(), negatives.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # B x 1
        l_neg = q @ negatives.T  # B x M
        return torch.cat([l_pos, l_neg], dim=1) / tau  # B x (1+M)


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy with the positive at class 0 (mean over rows)."""
    with fp32(logits.device):
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # B
        return F.cross_entropy(logits.float(), labels)


def top1(logits: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose positive (class 0) has the largest logit."""
    return (logits.detach().argmax(dim=1) == 0).float().mean()
