"""I3D: Inception-v1 inflated to 3-D (Carreira & Zisserman, CVPR 2017), trunk only, random init.

TF-style "same" padding as in the reference port: a kernel k with stride s is padded by max(k - s, 0)
in total, floor half in front and the rest behind (explicit zero padding when that is asymmetric);
max-pools use the same zero padding and ceil mode. Every unit is Conv3d (no bias) -> BN -> ReLU.
Output: the last feature map [B, 1024, T/8, ceil(H/32), ceil(W/32)], e.g. [B,1024,2,7,7] for
16x224x224 and [B,1024,2,4,4] for 16x112x112.

`width` scales every channel count (1.0 = the published network); tiny widths are for tests.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F


def _same_pad(kernel: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """F.pad order (W front, W back, H front, H back, T front, T back) of TF "same" padding."""
    pad = []
    for k, s in reversed(list(zip(kernel, stride))):
        total = max(k - s, 0)
        pad += [total // 2, total - total // 2]
    return tuple(pad)


class Unit3D(nn.Module):
    """Conv3d (no bias) -> BatchNorm3d -> ReLU with TF "same" padding."""

    def __init__(self, cin: int, cout: int, kernel=(1, 1, 1), stride=(1, 1, 1)):
        super().__init__()
        pad = _same_pad(kernel, stride)
        symmetric = pad[0::2] == pad[1::2]
        # Symmetric padding goes into the conv itself; asymmetric padding is an explicit F.pad.
        self.pad = None if symmetric else pad
        conv_pad = tuple(reversed(pad[0::2])) if symmetric else 0  # (T, H, W)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=stride, padding=conv_pad, bias=False)
        self.bn = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return F.relu(self.bn(self.conv(x)))


class MaxPoolSame(nn.Module):
    """Max-pool with TF "same" zero padding and ceil mode (inputs are post-ReLU, so zero = -inf here)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride, self.pad = kernel, stride, _same_pad(kernel, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(F.pad(x, self.pad), self.kernel, self.stride, ceil_mode=True)


class Mixed(nn.Module):
    """Inception block: 1x1 | 1x1->3x3x3 | 1x1->3x3x3 | maxpool3x3x3->1x1, concatenated on channels."""

    def __init__(self, cin: int, c: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(cin, c[0])
        self.b1 = nn.Sequential(Unit3D(cin, c[1]), Unit3D(c[1], c[2], (3, 3, 3)))
        self.b2 = nn.Sequential(Unit3D(cin, c[3]), Unit3D(c[3], c[4], (3, 3, 3)))
        self.b3 = nn.Sequential(MaxPoolSame((3, 3, 3), (1, 1, 1)), Unit3D(cin, c[5]))
        self.out_channels = c[0] + c[2] + c[4] + c[5]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1(x), self.b2(x), self.b3(x)], dim=1)


# (name, branch widths [b0, b1a, b1b, b2a, b2b, b3]) in order; "pool" entries are (kernel, stride).
_MIXED = {
    "3b": (64, 96, 128, 16, 32, 32),
    "3c": (128, 128, 192, 32, 96, 64),
    "4b": (192, 96, 208, 16, 48, 64),
    "4c": (160, 112, 224, 24, 64, 64),
    "4d": (128, 128, 256, 24, 64, 64),
    "4e": (112, 144, 288, 32, 64, 64),
    "4f": (256, 160, 320, 32, 128, 128),
    "5b": (256, 160, 320, 32, 128, 128),
    "5c": (384, 192, 384, 48, 128, 128),
}


class I3D(nn.Module):
    """Inception-v1 I3D trunk. forward: [B, in_channels, T, H, W] -> [B, feature_dim, T', H', W']."""

    def __init__(self, *, in_channels: int = 3, width: float = 1.0):
        super().__init__()

        def w(c: int) -> int:
            return max(1, round(c * width))

        layers: list[tuple[str, nn.Module]] = [
            ("conv1a", Unit3D(in_channels, w(64), (7, 7, 7), (2, 2, 2))),
            ("pool2a", MaxPoolSame((1, 3, 3), (1, 2, 2))),
            ("conv2b", Unit3D(w(64), w(64))),
            ("conv2c", Unit3D(w(64), w(192), (3, 3, 3))),
            ("pool3a", MaxPoolSame((1, 3, 3), (1, 2, 2))),
        ]
        cin = w(192)
        for name in _MIXED:
            if name == "4b":
                layers.append(("pool4a", MaxPoolSame((3, 3, 3), (2, 2, 2))))
            if name == "5b":
                layers.append(("pool5a", MaxPoolSame((2, 2, 2), (2, 2, 2))))
            block = Mixed(cin, tuple(w(c) for c in _MIXED[name]))
            layers.append(("mixed" + name, block))
            cin = block.out_channels
        self.layers = nn.Sequential(OrderedDict(layers))
        self.feature_dim = cin  # 1024 at width 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)  # B x 1024 x T/8 x H/32 x W/32 (ceil)


def create_i3d(*, in_channels: int = 3, width: float = 1.0) -> I3D:
    return I3D(in_channels=in_channels, width=width)
