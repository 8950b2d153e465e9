"""Heads on a backbone's feature map [B, C, T', H', W'].

* Projector: depth (time) average-pool, then a per-location MLP C -> C -> ReLU -> 128 (a 1x1 conv
  pair, written as Linear layers on the channel axis). The same module serves pooled clip features
  ([B, C]), feature maps ([B, C, T', H', W'] -> [B, 128, H', W']) and token sequences ([..., C]).
  No normalisation inside; callers L2-normalise.
* Classifier: global average pool, dropout, linear -> logits (not log-probabilities).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int = 128, hidden_dim: int | None = None):
        super().__init__()
        hidden_dim = hidden_dim or in_dim
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)
        self.out_dim = out_dim

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """Per-location MLP on the last axis: [..., C] -> [..., out_dim]."""
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C] -> [B, out]; [B, C, H, W] -> [B, out, H, W]; [B, C, T, H, W] -> [B, out, H, W] (mean over T)."""
        if x.dim() == 2:
            return self.mlp(x)  # B x out
        if x.dim() == 5:
            x = x.mean(dim=2)  # B x C x H x W
        if x.dim() != 4:
            raise ValueError(f"Projector expects [B,C], [B,C,H,W] or [B,C,T,H,W], got {tuple(x.shape)}")
        return self.mlp(x.movedim(1, -1)).movedim(-1, 1)  # B x out x H x W


class Classifier(nn.Module):
    """[B, C, T', H', W'] (or pooled [B, C]) -> [B, num_classes] logits."""

    def __init__(self, in_dim: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 5:
            x = x.mean(dim=(2, 3, 4))  # B x C
        return self.fc(self.dropout(x))  # B x num_classes
