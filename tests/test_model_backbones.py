"""Backbones: output shapes and parameter counts at 16x112^2 and 16x224^2, any clip size, padding rule."""

import pytest
import torch

from model import build_backbone
from model.i3d import MaxPoolSame, Unit3D
from model.resnet3d import create_r2plus1d18


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# name -> (feature_dim, parameters, grid at 16x112^2, grid at 16x224^2)
EXPECTED = {
    "i3d": (1024, 12_287_264, (2, 4, 4), (2, 7, 7)),
    "r3d18": (512, 33_166_272, (2, 7, 7), (2, 14, 14)),
    "r2plus1d18": (512, 31_300_125, (2, 7, 7), (2, 14, 14)),
}


@torch.no_grad()
def test_full_size_shapes_and_parameter_counts():
    torch.manual_seed(0)
    for name, (C, count, grid112, grid224) in EXPECTED.items():
        net = build_backbone(name).eval()
        assert net.feature_dim == C
        assert n_params(net) == count, (name, n_params(net))
        assert net(torch.randn(2, 3, 16, 112, 112)).shape == (2, C, *grid112)
        x = torch.randn(1, 3, 16, 224, 224).contiguous(memory_format=torch.channels_last_3d)
        assert net(x).shape == (1, C, *grid224)


@pytest.mark.parametrize("shape", [(8, 64, 96), (16, 48, 48), (12, 40, 72)])
@torch.no_grad()
def test_any_clip_size(shape):
    T, H, W = shape
    ceil = lambda a, b: -(-a // b)  # noqa: E731
    nets = {
        "i3d": (build_backbone("i3d", width=0.125), (ceil(T, 8), ceil(H, 32), ceil(W, 32))),
        "r3d18": (build_backbone("r3d18", widths=(8, 8, 16, 16)), (ceil(T, 8), ceil(H, 16), ceil(W, 16))),
        "r2plus1d18": (build_backbone("r2plus1d18", widths=(8, 8, 16, 16)), (ceil(T, 8), ceil(H, 16), ceil(W, 16))),
    }
    for name, (net, grid) in nets.items():
        out = net(torch.randn(2, 3, T, H, W))
        assert out.shape == (2, net.feature_dim, *grid), name


def test_unknown_backbone():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet50")


def test_tf_same_padding_rule():
    # Total pad max(k - s, 0), floor half in front: 7x7x7 stride 2 pads (2, 3) on every axis.
    unit = Unit3D(3, 4, (7, 7, 7), (2, 2, 2))
    assert unit.pad == (2, 3, 2, 3, 2, 3) and unit.conv.padding == (0, 0, 0)
    assert Unit3D(3, 4, (3, 3, 3)).conv.padding == (1, 1, 1)  # symmetric: inside the conv
    # Ceil-mode pools with that padding give TF's "same" output size ceil(n / s).
    x = torch.rand(1, 1, 9, 15, 14)
    assert MaxPoolSame((3, 3, 3), (2, 2, 2))(x).shape[2:] == (5, 8, 7)
    assert MaxPoolSame((2, 2, 2), (2, 2, 2))(x).shape[2:] == (5, 8, 7)
    assert MaxPoolSame((1, 3, 3), (1, 2, 2))(x).shape[2:] == (9, 8, 7)


def test_r2plus1d_mid_channels():
    net = create_r2plus1d18()
    block = net.layer2[0]  # in 64, out 128 -> floor(64*128*27 / (64*9 + 3*128)) = 230
    assert block.conv1[0][0].out_channels == (64 * 128 * 27) // (64 * 9 + 3 * 128) == 230
    assert block.conv2[0][0].out_channels == 230  # the block's mid width is shared by both convs
    assert net.layer4[1].conv1[0][0].out_channels == (512 * 512 * 27) // (512 * 9 + 3 * 512)
    assert net.stem[0].out_channels == 45 and net.stem[0].kernel_size == (1, 7, 7)
