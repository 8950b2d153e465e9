"""model/: backbones, heads and self-supervised objectives. Takes tensors, imports no other project package.

Public API:
* build_backbone(name, **kw) -> nn.Module with `feature_dim`; names "i3d", "r3d18", "r2plus1d18".
* Projector, Classifier (heads.py); MotionDecoder (fima_decoder.py).
* build_objective(name, **kw) -> MoCo / FAME / FIMA. Every objective is an nn.Module with
  `required_inputs` (the batch keys it reads) and forward(batch: dict[str, Tensor]) -> dict[str, Tensor]
  holding "loss" (the total to backprop), each named loss term, and cheap metrics. EMA and queue
  updates happen inside forward in training mode; the queues are buffers (saved in state_dict).
"""

from __future__ import annotations

import torch.nn as nn

from .fame_augment import KINETICS_MEAN, KINETICS_STD, ColourAugment
from .backbones import BACKBONES, build_backbone
from .fima_decoder import MotionDecoder
from .fame import FAME
from .fima import FIMA
from .heads import Classifier, Projector
from .moco import MoCo
from .multilevel import MultiLevel

OBJECTIVES: dict[str, type[nn.Module]] = {"moco": MoCo, "fame": FAME, "fima": FIMA, "multilevel": MultiLevel}


def build_objective(name: str, **kwargs) -> nn.Module:
    """build_objective("fima", backbone="i3d", queue_size=2240, ...): keyword arguments go to the class."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    return OBJECTIVES[name](**kwargs)


__all__ = [
    "BACKBONES", "build_backbone", "Projector", "Classifier", "MotionDecoder", "MoCo", "FAME", "FIMA",
    "MultiLevel", "OBJECTIVES", "build_objective", "ColourAugment", "KINETICS_MEAN", "KINETICS_STD",
]
