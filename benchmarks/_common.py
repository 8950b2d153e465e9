"""Shared by the benchmarks: the data they make when none is given, and timing training steps as the trainer runs them."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from train.distributed import Dist
from train.recipe import precision_context, train_step


def timed_steps(model, opt, batches, steps: int, precision: str, device) -> float:
    """Seconds per optimiser step over `steps` steps after one warm-up step; `batches` yields batch dicts. The step
    is the trainer's own (train/recipe.py train_step: the non-finite guard, the objective's after-backward hook,
    the gradient check, the update), so what is timed is what a run does."""
    amp = precision_context(precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    one_process = Dist(device=device)

    def one(batch):
        train_step(model, batch, opt, scaler, amp, one_process)

    it = iter(batches)
    one(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        one(next(it))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def sample_shards(root: Path, short_side: int = 256, **sample_kw) -> Path:
    """The embedded synthetic sample (preprocess.sample_videos, ``sample_kw`` passed on) sharded into root/shards,
    made once: a fresh checkout benchmarks without the demo's output or a download. Returns root/shards (train/,
    test/)."""
    from preprocess.cli import main as preprocess_main
    from preprocess.sample_videos import make_sample_videos
    root = Path(root)
    if not (root / "shards" / "test" / "manifest.json").is_file():
        make_sample_videos(root / "videos", progress=False, **sample_kw)
        rc = preprocess_main([str(root / "videos"), str(root / "shards"), "--name", "synthetic", "--max-per-shard",
                              "32", "--short-side", str(short_side), "--no-progress"])
        if rc != 0:
            raise SystemExit(f"sharding the synthetic sample into {root / 'shards'} failed")
    return root / "shards"
