"""Backbone builders by name. Each returns an nn.Module mapping [B, 3, T, H, W] to its last feature
map [B, feature_dim, T', H', W'] and exposing `feature_dim`.

| name         | builder            | C    | params   | 16x224x224 -> | 16x112x112 -> |
|--------------|--------------------|------|----------|---------------|---------------|
| "i3d"        | create_i3d         | 1024 | 12.29 M  | 2 x 7 x 7     | 2 x 4 x 4     |
| "r3d18"      | create_r3d18       | 512  | 33.17 M  | 2 x 14 x 14   | 2 x 7 x 7     |
| "r2plus1d18" | create_r2plus1d18  | 512  | 31.30 M  | 2 x 14 x 14   | 2 x 7 x 7     |
| "r3d18_ml"   | create_r3d18_ml    | 512  | 33.20 M  | 2 x 7 x 7     | 2 x 4 x 4     |

"r3d18_ml" is the multi-level method's R3D-18 (7x7x7 stem with temporal stride 1, spatial-only max-pool;
r3d_multilevel.py); it also has `forward_levels` (layer2/3/4 maps) and `level_dims`.
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from .i3d import create_i3d
from .r3d_multilevel import create_r3d18_ml
from .resnet3d import create_r2plus1d18, create_r3d18

BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "i3d": create_i3d,
    "r3d18": create_r3d18,
    "r2plus1d18": create_r2plus1d18,
    "r3d18_ml": create_r3d18_ml,
}


def build_backbone(name: str, **kwargs) -> nn.Module:
    """build_backbone("i3d") etc.; kwargs go to the builder (e.g. width=0.25 for I3D, widths=(...) for the ResNets)."""
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
    return BACKBONES[name](**kwargs)


def resolve_backbone(backbone: str | Callable[[], nn.Module], **kwargs) -> nn.Module:
    """A backbone from a registry name or from a zero-argument constructor (kwargs only with a name)."""
    if isinstance(backbone, str):
        return build_backbone(backbone, **kwargs)
    if kwargs:
        raise ValueError("backbone_kwargs are only accepted with a backbone name")
    return backbone()
