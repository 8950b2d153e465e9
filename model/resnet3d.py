"""R3D-18 and R(2+1)D-18 video ResNets (Tran et al., CVPR 2018), trunk only, random init.

Layout as in the usual VideoResNet: a stem, then four stages of two BasicBlocks with strides
1, 2, 2, 2 applied to T, H and W alike, no max-pool. Output: the last feature map
[B, 512, T/8, H/16, W/16], e.g. [B,512,2,7,7] for 16x112x112 and [B,512,2,14,14] for 16x224x224.
* R3D-18: stem Conv 3x7x7 stride (1,2,2) 3->64; 3x3x3 convs.
* R(2+1)D-18: stem Conv 1x7x7 stride (1,2,2) 3->45, Conv 3x1x1 45->64; every 3x3x3 conv is factored
  into 1x3x3 (spatial stride) -> BN -> ReLU -> 3x1x1 (temporal stride) with
  mid = floor(in*out*27 / (in*9 + 3*out)) channels, computed once per block from the block's
  (in, out) and used by both of its convs (as torchvision does; this gives 31.3 M parameters).
Init: kaiming-normal (fan_out) convs, BN weight 1 bias 0.

`width` scales the four stage widths (64, 128, 256, 512), as I3D's `width` does (the config's `backbone_width`);
`widths` sets them outright (tiny widths are for tests).
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _conv3x3x3(cin: int, cout: int, mid: int, stride: int) -> nn.Module:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _conv2plus1d(cin: int, cout: int, mid: int, stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv3d(cin, mid, (1, 3, 3), stride=(1, stride, stride), padding=(0, 1, 1), bias=False),
        nn.BatchNorm3d(mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(mid, cout, (3, 1, 1), stride=(stride, 1, 1), padding=(1, 0, 0), bias=False),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, conv):
        super().__init__()
        mid = (cin * cout * 27) // (cin * 9 + 3 * cout)  # only used by the (2+1)D factorisation
        self.conv1 = nn.Sequential(conv(cin, cout, mid, stride), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(conv(cout, cout, mid, 1), nn.BatchNorm3d(cout))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv3d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return torch.relu(self.conv2(self.conv1(x)) + shortcut)


class VideoResNet18(nn.Module):
    """forward: [B, 3, T, H, W] -> [B, feature_dim, T', H', W']."""

    def __init__(self, *, stem: nn.Module, conv, widths=(64, 128, 256, 512), stem_out: int = 64):
        super().__init__()
        self.stem = stem
        stages, cin = [], stem_out
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride, conv), BasicBlock(cout, cout, 1, conv)))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = cin
        for mod in self.modules():
            if isinstance(mod, nn.Conv3d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(mod, nn.BatchNorm3d):
                nn.init.ones_(mod.weight)
                nn.init.zeros_(mod.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # B x 64 x T x H/2 x W/2
        x = self.layer1(x)  # B x 64 x T x H/2 x W/2
        x = self.layer2(x)  # B x 128 x T/2 x H/4 x W/4
        x = self.layer3(x)  # B x 256 x T/4 x H/8 x W/8
        return self.layer4(x)  # B x 512 x T/8 x H/16 x W/16


def scaled_widths(width: float = 1.0, widths=None) -> tuple[int, ...]:
    """The four stage widths: `widths` as given, else (64, 128, 256, 512) times the multiplier `width` (the
    train config's `backbone_width`, as I3D's), at least one channel each."""
    if widths is not None:
        return tuple(widths)
    if width <= 0:
        raise ValueError(f"backbone width must be positive, got {width}")
    return tuple(max(1, round(c * width)) for c in (64, 128, 256, 512))


def create_r3d18(*, width: float = 1.0, widths=None) -> VideoResNet18:
    widths = scaled_widths(width, widths)
    c0 = widths[0]
    stem = nn.Sequential(
        nn.Conv3d(3, c0, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
        nn.BatchNorm3d(c0),
        nn.ReLU(inplace=True),
    )
    return VideoResNet18(stem=stem, conv=_conv3x3x3, widths=widths, stem_out=c0)


def create_r2plus1d18(*, width: float = 1.0, widths=None) -> VideoResNet18:
    widths = scaled_widths(width, widths)
    c0 = widths[0]
    c_mid = max(1, round(45 * c0 / 64))  # 45 at the published width
    stem = nn.Sequential(
        nn.Conv3d(3, c_mid, (1, 7, 7), stride=(1, 2, 2), padding=(0, 3, 3), bias=False),
        nn.BatchNorm3d(c_mid),
        nn.ReLU(inplace=True),
        nn.Conv3d(c_mid, c0, (3, 1, 1), stride=1, padding=(1, 0, 0), bias=False),
        nn.BatchNorm3d(c0),
        nn.ReLU(inplace=True),
    )
    return VideoResNet18(stem=stem, conv=_conv2plus1d, widths=widths, stem_out=c0)
