"""Shared by the benchmarks: time training steps of an objective the way the trainer runs them."""
from __future__ import annotations

import time

import torch

from train.trainer import precision_context


def timed_steps(model, opt, batches, steps: int, precision: str, device) -> float:
    """Seconds per optimiser step over `steps` steps after one warm-up step; `batches` yields batch dicts."""
    amp = precision_context(precision, device)

    def one(batch):
        with amp:
            loss = model(batch)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
