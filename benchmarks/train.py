"""Benchmark the training step: the real loop on the real pipeline vs the same loop on in-memory batches.

* data-stall ratio = videos/s with the DALI pipeline feeding / videos/s on one cached batch (goal >= 0.95);
* precision: videos/s of fp32 vs bf16 autocast + channels_last_3d, on the cached batch.
All in one run (machines here are noisy); prints one JSON line. Same config presets and overrides as training:

    python benchmarks/train.py                      # demo preset: demo_out/shards/train, or the synthetic sample
    python benchmarks/train.py --config demo data=demo_out/shards/train crop=64 [--steps 6]
    python benchmarks/train.py --config k400_i3d_fima data=shards/k400/train batch_size=16   # on a GPU
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model import build_objective  # noqa: E402
from pipeline import pretrain_loader  # noqa: E402
from train.config import load_config  # noqa: E402
from train.recipe import aug_config, build_optimizer, device_and_backend, objective_kwargs  # noqa: E402
from benchmarks._common import sample_shards, timed_steps  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="demo", help="preset or YAML file, as for `python -m train`")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after one warm-up step)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = p.parse_args()
    cfg = load_config(a.config, a.overrides)
    if not (Path(cfg["data"]) / "manifest.json").is_file():   # a fresh checkout: make the data, as the demo does
        made = sample_shards(Path(tempfile.mkdtemp(prefix="bench-train-")), short_side=128, train_per_class=2,
                             test_per_class=1)
        print(f"{cfg['data']} holds no shard set: using the synthetic sample in {made}", file=sys.stderr)
        cfg["data"] = str(made / "train")
    cuda, backend = device_and_backend(cfg)                  # the trainer's rule and CUDA switches
    device = torch.device("cuda" if cuda else "cpu")
    required = build_objective(cfg["objective"], **objective_kwargs(cfg)).required_inputs   # the model's contract
    loader = pretrain_loader(cfg["data"], tuple(required), batch_size=cfg["batch_size"], config=aug_config(cfg),
                             seed=cfg["seed"], backend=backend, device_id=0 if cuda else None,
                             num_threads=cfg["num_threads"])

    def real_batches():
        while True:
            yield from loader

    cached = next(iter(real_batches()))
    cached = {k: v.clone(memory_format=torch.preserve_format) for k, v in cached.items()}

    def cached_batches(channels_last: bool):
        b = {k: (v.contiguous(memory_format=torch.channels_last_3d) if channels_last and v.dim() == 5
                 else v.contiguous()) for k, v in cached.items()}
        while True:
            yield b

    torch.manual_seed(0)
    results = {}
    for name, precision, channels_last, batches in (
            ("real_data_fp32", "fp32", False, real_batches()),
            ("cached_fp32", "fp32", False, cached_batches(False)),
            ("cached_bf16_cl3d", "bf16", True, cached_batches(True))):
        model = build_objective(cfg["objective"], **objective_kwargs(cfg)).to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last_3d)
        model.train()
        opt = build_optimizer(cfg, [q for q in model.parameters() if q.requires_grad], lr=1e-4)
        results[name] = cfg["batch_size"] / timed_steps(model, opt, batches, a.steps, precision, device)
    loader.close()
    print(json.dumps({
        "benchmark": "train", "device": torch.cuda.get_device_name(0) if cuda else "cpu", "backend": backend,
        "objective": cfg["objective"], "backbone": cfg["backbone"], "clip": f"{cfg['frames']}x{cfg['crop']}x{cfg['crop']}",
        "batch_size": cfg["batch_size"], "steps": a.steps,
        **{f"{k}_videos_per_s": round(v, 3) for k, v in results.items()},
        "data_stall_ratio": round(results["real_data_fp32"] / results["cached_fp32"], 3),
        "bf16_cl3d_over_fp32": round(results["cached_bf16_cl3d"] / results["cached_fp32"], 3)}))


if __name__ == "__main__":
    main()
