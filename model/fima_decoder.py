"""FIMA's motion decoder: RGB tokens of clip a query RGB tokens of clip b by cross-attention.

E1 (1x1 conv C -> d_model) turns a feature map into one token sequence per time slice, plus a
fixed 1-D sinusoidal position encoding over the H'*W' raster positions (the same for every slice,
any length). A zero-initialised learnable cls token is prepended to the targets; `layers` pre-LN
cross-attention-only layers (no self-attention, so each output depends only on its own target token
and the memory; memory is not layer-normed; no final LayerNorm); E2 (d_model -> C) maps back to the
backbone width so the shared projector can be applied per token.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def sinusoidal_encoding(n: int, d: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] = cos(same); n x d."""
    pos = torch.arange(n, device=device, dtype=torch.float32)[:, None]  # n x 1
    freq = torch.exp(torch.arange(0, d, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / d))  # d/2
    pe = torch.zeros(n, d, device=device, dtype=torch.float32)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe.to(dtype)


class CrossAttentionLayer(nn.Module):
    """x <- x + Drop(MHA(LN1(x), mem, mem)); x <- x + Drop(FFN(LN2(x)))."""

    def __init__(self, d_model: int, heads: int, ffn_dim: int, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
        self.drop1 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(
            nn.Linear(d_model, ffn_dim), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(ffn_dim, d_model)
        )
        self.drop2 = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor) -> torch.Tensor:
        x = x + self.drop1(self.attn(self.norm1(x), mem, mem, need_weights=False)[0])  # N x L x d
        return x + self.drop2(self.ffn(self.norm2(x)))  # N x L x d


class MotionDecoder(nn.Module):
    def __init__(
        self, feature_dim: int, d_model: int = 512, heads: int = 4, ffn_dim: int = 512, layers: int = 2,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.e1 = nn.Linear(feature_dim, d_model)  # 1x1 conv C -> d
        self.cls = nn.Parameter(torch.zeros(1, 1, d_model))
        self.layers = nn.ModuleList(CrossAttentionLayer(d_model, heads, ffn_dim, dropout) for _ in range(layers))
        self.e2 = nn.Linear(d_model, feature_dim)  # 1x1 conv d -> C
        self.d_model = d_model

    def tokens(self, fmap: torch.Tensor) -> torch.Tensor:
        """[B, C, T, H, W] -> [B, T, H*W, d]: E1 per location plus the position encoding (raster order)."""
        x = self.e1(fmap.flatten(3).movedim(1, -1))  # B x T x HW x d
        return x + sinusoidal_encoding(x.shape[2], self.d_model, x.device, x.dtype)  # B x T x HW x d

    def forward(self, target: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """target [N, L, d] (tokens of clip a), memory [N, M, d] (tokens of clip b) -> [N, 1+L, C].

        Output 0 is the cls prediction; outputs 1..L are the predictions at a's token positions.
        """
        x = torch.cat([self.cls.expand(target.shape[0], -1, -1).to(target.dtype), target], dim=1)  # N x 1+L x d
        for layer in self.layers:
            x = layer(x, memory)  # N x 1+L x d
        return self.e2(x)  # N x 1+L x C
