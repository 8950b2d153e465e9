"""pipeline: DALI decode and augmentation of the shards written by ``python -m preprocess`` (DESIGN.md §3).

Public API (everything a trainer or evaluator needs):

* ``pretrain_loader(shard_dir, outputs="fima"|"moco"|"fame"|"multilevel"|(keys...), batch_size=...,
  config=AugConfig(...), seed=, rank=, world_size=, backend="cpu"|"gpu", device_id=)`` -> ``VideoLoader``
* ``eval_loader(shard_dir, mode="train"|"test", batch_size=..., config=..., outputs=("video", "label", "index"), ...)``
* ``VideoLoader``: ``for batch in loader`` (one epoch of dicts of torch tensors), ``len(loader)`` (steps per
  epoch, equal on every rank), ``set_epoch(e)``, ``state_dict()`` / ``load_state_dict(state)``, ``stats``.
* ``AugConfig`` (all parameters, DESIGN defaults) and the output sets ``FIMA_OUTPUTS``, ``MOCO_OUTPUTS``,
  ``FAME_OUTPUTS``, ``MULTILEVEL_OUTPUTS`` (clips A, B, G of the multi-level method: pipeline/multilevel.py,
  whose ``REFERENCE_AUG`` holds that method's augmentation settings).

Clips are float32 [B, 3, T, S, S] views of DALI's FHWC output (``permute(0, 4, 1, 2, 3)``), so they are
``channels_last_3d`` without a copy; on the gpu backend they live on ``cuda:device_id``.
"""
from pipeline.config import (FAME_OUTPUTS, FIMA_OUTPUTS, KINETICS_MEAN, KINETICS_STD, MOCO_OUTPUTS,
                             MULTILEVEL_OUTPUTS, OBJECTIVE_OUTPUTS, AugConfig)
from pipeline.loader import VideoLoader, eval_loader, pretrain_loader
from pipeline.multilevel import REFERENCE_AUG
from pipeline.shards import CodecError, ShardSet

__all__ = ["AugConfig", "CodecError", "FAME_OUTPUTS", "FIMA_OUTPUTS", "KINETICS_MEAN", "KINETICS_STD", "MOCO_OUTPUTS",
           "MULTILEVEL_OUTPUTS", "OBJECTIVE_OUTPUTS", "REFERENCE_AUG", "ShardSet", "VideoLoader", "eval_loader",
           "pretrain_loader"]
