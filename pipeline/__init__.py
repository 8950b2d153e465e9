"""pipeline: DALI decode and augmentation of the shards written by ``python -m preprocess`` (DESIGN.md §3).

Public API (everything a trainer or evaluator needs):

* ``pretrain_loader(shard_dir, outputs=(keys...), batch_size=...,   # keys: a built objective's required_inputs
  config=AugConfig(...), seed=, rank=, world_size=, backend="cpu"|"gpu", device_id=)`` -> ``VideoLoader``
* ``eval_loader(shard_dir, mode="train"|"test", batch_size=..., config=..., outputs=("video", "label", "index"), ...)``
* ``VideoLoader``: ``for batch in loader`` (one epoch of dicts of torch tensors), ``len(loader)`` (steps per
  epoch, equal on every rank), ``set_epoch(e)``, ``state_dict()`` / ``load_state_dict(state)``, ``stats``.
* ``AugConfig`` (all parameters, DESIGN defaults), the keys a loader can produce (``PRETRAIN_CLIPS``,
  ``PRETRAIN_META``; ``MULTILEVEL_OUTPUTS`` = clips A, B, G of the multi-level method: pipeline/multilevel.py,
  whose ``REFERENCE_AUG`` holds that method's augmentation settings). Which keys an objective needs is the
  objective's to say (``required_inputs``); the pipeline knows no objective names.

Clips are float32 [B, 3, T, S, S] views of DALI's FHWC output (``permute(0, 4, 1, 2, 3)``), so they are
``channels_last_3d`` without a copy; on the gpu backend they live on ``cuda:device_id``.
"""
from pipeline.config import (KINETICS_MEAN, KINETICS_STD, MULTILEVEL_OUTPUTS, PRETRAIN_CLIPS, PRETRAIN_META,
                             AugConfig)
from pipeline.loader import VideoLoader, eval_loader, pretrain_loader
from pipeline.multilevel import REFERENCE_AUG
from pipeline.shards import CodecError, ShardSet

__all__ = ["AugConfig", "CodecError", "KINETICS_MEAN", "KINETICS_STD", "MULTILEVEL_OUTPUTS", "PRETRAIN_CLIPS",
           "PRETRAIN_META", "REFERENCE_AUG", "ShardSet", "VideoLoader", "eval_loader", "pretrain_loader"]
