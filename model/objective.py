"""What every objective offers the run machinery, so the trainer names no objective's attributes.

An objective is an nn.Module with ``required_inputs`` (the batch keys it reads: the loader is built from
them) and forward(batch) -> {"loss", loss terms, metrics}. The hooks below have do-nothing defaults.
"""
from __future__ import annotations

import torch.nn as nn


class Objective(nn.Module):
    required_inputs: tuple[str, ...] = ()

    def compile_targets(self) -> list[nn.Module]:
        """Modules worth torch.compile (compiled in place, so state_dict keys do not change): the encoders."""
        return [m for name in ("encoder_q", "encoder_k") if isinstance(m := getattr(self, name, None), nn.Module)]

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (objectives with epoch-dependent terms)."""

    def after_backward(self) -> None:
        """Called between backward and the optimiser step (e.g. to drop gradients of frozen parts)."""

    def run_warnings(self, *, global_batch: int, steps_per_epoch: int, total_steps: int, num_videos: int) -> list[str]:
        """What this objective's settings mean for a run of this size, said before it starts (the trainer prints
        them as warnings): e.g. a queue that outlives an epoch. Empty by default."""
        return []
