"""Benchmark the objectives on synthetic tensors: training-step videos/s of MoCo, FAME, FIMA (on --backbone) and
the multi-level model (on its R3D-18 variant, every loss term on: past `split` and the prototype-queue start),
fp32 vs bf16 autocast + channels_last_3d (+ torch.compile of the backbones with --compile), in one run, as ratios.

    python benchmarks/model.py                                     # CPU: a small size (16x64^2, batch 2)
    python benchmarks/model.py --crop 224 --ml-crop 112 --batch 8  # on a GPU: the papers' sizes
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import timed_steps  # noqa: E402
from model import build_objective  # noqa: E402


def synthetic_batch(keys, b: int, t: int, s: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batch = {}
    for k in keys:
        if k.startswith("box"):   # valid boxes: x1 < x2, y1 < y2 in [0, 1]
            lo = torch.rand(b, 2, generator=g) * 0.4
            batch[k] = torch.cat([lo, lo + 0.5], 1)[:, [0, 1, 2, 3]]
        elif k == "frame_hw":
            batch[k] = torch.tensor([[256.0, 340.0]]).repeat(b, 1)
        else:
            x = torch.rand(b, 3, t, s, s, generator=g)
            batch[k] = x if k.startswith("raw") else (x - 0.45) / 0.225
    return {k: v.to(device) for k, v in batch.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="i3d")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--queue", type=int, default=4096)
    p.add_argument("--ml-crop", type=int, default=None, help="multi-level clips' crop (default --crop; paper: 112)")
    p.add_argument("--objectives", default="moco,fame,fima,multilevel", help="comma-separated objectives to time")
    p.add_argument("--compile", action="store_true", help="also time bf16 + channels_last_3d + torch.compile")
    a = p.parse_args()
    ml_crop = a.ml_crop or a.crop
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {"benchmark": "model", "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
           "backbone": a.backbone, "clip": f"{a.frames}x{a.crop}x{a.crop}", "batch": a.batch,
           "multilevel_clip": f"{a.frames}x{ml_crop}x{ml_crop} (clips A, B, G; r3d18_ml)"}
    variants = [("fp32", "fp32", False, False), ("bf16_cl3d", "bf16", True, False)]
    if a.compile:
        variants.append(("bf16_cl3d_compile", "bf16", True, True))
    for name in a.objectives.split(","):
        speeds = {}
        for vname, precision, cl, comp in variants:
            torch.manual_seed(0)
            if name == "multilevel":   # the heaviest step: graph heads (epoch >= split) and the prototype queue on
                model = build_objective(name, backbone="r3d18_ml").to(device).train()
                model.set_epoch(max(model.split, model.proto_queue_start))
            else:
                model = build_objective(name, backbone=a.backbone, queue_size=a.queue).to(device).train()
            if cl:
                model = model.to(memory_format=torch.channels_last_3d)
            if comp:                                     # what the trainer compiles (train/recipe.py wrap)
                for module in model.compile_targets():
                    module.compile()
            crop = ml_crop if name == "multilevel" else a.crop
            batch = synthetic_batch(model.required_inputs, a.batch, a.frames, crop, device)
            if cl:
                batch = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.dim() == 5 else v
                         for k, v in batch.items()}
            opt = torch.optim.SGD([q for q in model.parameters() if q.requires_grad], lr=1e-4, momentum=0.9)

            def forever():
                while True:
                    yield batch
            speeds[vname] = a.batch / timed_steps(model, opt, forever(), a.steps, precision, device)
        out[name] = {f"{k}_videos_per_s": round(v, 3) for k, v in speeds.items()}
        out[name].update({f"{k}_over_fp32": round(v / speeds["fp32"], 3) for k, v in speeds.items() if k != "fp32"})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
