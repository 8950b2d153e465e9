"""The R3D-18 variant of the multi-level method (Qian et al., ICCV 2021) and its motion-excitation block.

Backbone ("r3d18_ml" in the registry): R3D-18 (BasicBlocks [2, 2, 2, 2], strides 1, 2, 2, 2) with the
reference's stem: Conv 7x7x7, stride (1, 2, 2), padding 3, 3 -> 64, BN, ReLU, then a *spatial-only*
max-pool (1x3x3, stride (1, 2, 2), padding (0, 1, 1)). Time is therefore only halved by layer2/3/4:

| level | layer  | C   | 16x112x112 -> | 16x224x224 -> |
|-------|--------|-----|---------------|---------------|
| low   | layer2 | 128 | 8 x 14 x 14   | 8 x 28 x 28   |
| mid   | layer3 | 256 | 4 x 7 x 7     | 4 x 14 x 14   |
| high  | layer4 | 512 | 2 x 4 x 4     | 2 x 7 x 7     |

`forward(x)` returns the layer4 map (the registry contract, so evaluation treats it like every other
backbone); `forward_levels(x)` (= `forward(x, all_levels=True)`) returns (layer2, layer3, layer4).
33.20 M parameters. The motion-excitation blocks and heads belong to the objective (model/multilevel.py),
not to the backbone, so a checkpoint's `encoder_q.*` loads into `build_backbone("r3d18_ml")` exactly.

Motion excitation (the reference's MEBlock, written with 3D convolutions of temporal extent 1, which is
the same computation as its per-frame 2D convolutions, BatchNorm statistics included):
    r = reduce(x)                      1x1x1 conv C -> C/16, BN                        [N, C/16, T, H, W]
    m_t = dw(r)_{t+1} - r_t            depth-wise 1x3x3 conv; m_{T-1} = 0 (zero pad)    [N, C/16, T, H, W]
    g = sigmoid(BN(expand(pool(m)))) - 0.5   spatial mean, 1x1x1 conv C/16 -> C, BN     [N, C, T, 1, 1]
    out = x + g * x
The zero-padded last step still passes the final BN, so its gate is not exactly 0 (as in the reference).
The block keeps PyTorch's default init (the reference's Kaiming init covers only the backbone's 3D layers).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet3d import VideoResNet18, _conv3x3x3, scaled_widths


class R3D18Levels(VideoResNet18):
    """VideoResNet18 that also exposes its layer2/3/4 maps; `level_dims` = their channel counts."""

    def __init__(self, *, stem: nn.Module, widths=(64, 128, 256, 512)):
        super().__init__(stem=stem, conv=_conv3x3x3, widths=widths, stem_out=widths[0])
        self.level_dims = tuple(widths[1:])

    def forward(self, x: torch.Tensor, all_levels: bool = False):
        """[B, 3, T, H, W] -> layer4 [B, C4, T/8, H/32, W/32], or with all_levels=True the tuple
        (layer2 [B, C2, T/2, H/8, W/8], layer3 [B, C3, T/4, H/16, W/16], layer4)."""
        x = self.layer1(self.stem(x))  # B x C1 x T x H/4 x W/4
        low = self.layer2(x)  # B x C2 x T/2 x H/8 x W/8
        mid = self.layer3(low)  # B x C3 x T/4 x H/16 x W/16
        high = self.layer4(mid)  # B x C4 x T/8 x H/32 x W/32
        return (low, mid, high) if all_levels else high

    def forward_levels(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer2, layer3, layer4) maps; goes through __call__, so hooks, DDP and Module.compile() apply."""
        return self(x, all_levels=True)


def create_r3d18_ml(*, width: float = 1.0, widths=None) -> R3D18Levels:
    widths = scaled_widths(width, widths)
    c0 = widths[0]
    stem = nn.Sequential(
        nn.Conv3d(3, c0, 7, stride=(1, 2, 2), padding=3, bias=False),
        nn.BatchNorm3d(c0),
        nn.ReLU(inplace=True),
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
    )
    return R3D18Levels(stem=stem, widths=widths)


def time_reversed_batch(x: torch.Tensor) -> torch.Tensor:
    """Feature-level time reversal: [N, C, T, H, W] -> [2N, C, T, H, W] = [x; x flipped along T]."""
    return torch.cat([x, x.flip(2)])


class MotionExcitation(nn.Module):
    """[N, C, T, H, W] -> same shape; see the module docstring. reduction 16 (C/16 at least 1 channel)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        r = max(1, channels // reduction)
        self.reduce = nn.Conv3d(channels, r, 1, bias=False)
        self.bn1 = nn.BatchNorm3d(r)
        self.depthwise = nn.Conv3d(r, r, (1, 3, 3), padding=(0, 1, 1), groups=r, bias=False)
        self.expand = nn.Conv3d(r, channels, 1, bias=False)
        self.bn3 = nn.BatchNorm3d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.bn1(self.reduce(x))  # N x r x T x H x W
        m = self.depthwise(r)[:, :, 1:] - r[:, :, :-1]  # N x r x T-1 x H x W: step t+1 (after dw) - step t
        m = F.pad(m, (0, 0, 0, 0, 0, 1))  # N x r x T x H x W, last step zero
        m = m.mean(dim=(3, 4), keepdim=True)  # N x r x T x 1 x 1
        gate = torch.sigmoid(self.bn3(self.expand(m))) - 0.5  # N x C x T x 1 x 1
        return x + gate * x
