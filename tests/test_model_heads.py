"""Heads and the motion decoder: any grid, per-location projector, zero cls, no self-attention."""

import math

import pytest
import torch

from model import Classifier, MotionDecoder, Projector
from model.fima_decoder import sinusoidal_encoding


@pytest.mark.parametrize("grid", [4, 7, 14])
def test_projector_any_grid_is_depth_pool_then_per_location_mlp(grid):
    torch.manual_seed(0)
    C = 64
    proj = Projector(C, 128)
    x = torch.randn(2, C, 2, grid, grid)
    out = proj(x)
    assert out.shape == (2, 128, grid, grid)
    pooled = x.mean(dim=2)
    for i, j in [(0, 0), (grid - 1, grid // 2)]:
        v = pooled[1, :, i, j]
        ref = proj.fc2.weight @ torch.relu(proj.fc1.weight @ v + proj.fc1.bias) + proj.fc2.bias
        torch.testing.assert_close(out[1, :, i, j], ref, atol=1e-5, rtol=1e-5)
    assert proj(pooled[:, :, 0, 0]).shape == (2, 128)  # pooled features
    assert proj.mlp(torch.randn(3, 5, C)).shape == (3, 5, 128)  # token sequences


def test_projector_parameter_count():
    assert sum(p.numel() for p in Projector(1024).parameters()) == 1024 * 1024 + 1024 + 1024 * 128 + 128


def test_classifier():
    clf = Classifier(32, 101, dropout=0.5).eval()
    x = torch.randn(3, 32, 2, 4, 4)
    torch.testing.assert_close(clf(x), clf.fc(x.mean(dim=(2, 3, 4))))


def test_sinusoidal_encoding_formula():
    pe = sinusoidal_encoding(200, 16)
    pos, i = 150, 3
    assert math.isclose(pe[pos, 2 * i].item(), math.sin(pos / 10000 ** (2 * i / 16)), abs_tol=1e-5)
    assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(pos / 10000 ** (2 * i / 16)), abs_tol=1e-5)


@pytest.mark.parametrize("grid", [4, 7, 14])
def test_decoder_any_grid(grid):
    torch.manual_seed(0)
    dec = MotionDecoder(feature_dim=64, d_model=32, heads=4, ffn_dim=32)
    tok = dec.tokens(torch.randn(2, 64, 2, grid, grid))
    assert tok.shape == (2, 2, grid * grid, 32)
    out = dec(tok[:, 0], tok[:, 1])
    assert out.shape == (2, 1 + grid * grid, 64)


def test_decoder_structure_and_parameters():
    dec = MotionDecoder(1024)  # reference sizes: d 512, 4 heads, FFN 512, 2 layers
    assert torch.count_nonzero(dec.cls) == 0 and dec.cls.shape == (1, 1, 512)
    body = sum(p.numel() for n, p in dec.named_parameters() if not n.startswith(("e1.", "e2.")))
    assert body == 3_156_480  # 2 cross-attention layers + cls (notes: 3.16 M)
    assert dec.layers[0].attn.num_heads == 4 and dec.layers[0].attn.dropout == 0.1


def test_decoder_is_cross_attention_only():
    # No self-attention: each output depends only on its own target token and the memory.
    torch.manual_seed(0)
    dec = MotionDecoder(feature_dim=16, d_model=16, heads=4, ffn_dim=16).eval()
    target, memory = torch.randn(2, 5, 16), torch.randn(2, 6, 16)
    out = dec(target, memory)
    target2 = target.clone()
    target2[:, 2] += 1.0
    out2 = dec(target2, memory)
    changed = (out2 - out).abs().amax(dim=(0, 2)) > 1e-6  # per output position (0 = cls)
    assert changed.tolist() == [False, False, False, True, False, False]
    memory2 = memory + 0.5
    assert not torch.allclose(dec(target, memory2)[:, 0], out[:, 0])  # cls reads the memory
