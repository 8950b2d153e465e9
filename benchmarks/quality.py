"""Benchmark representation quality: a fixed-budget pretraining of MoCo and FIMA against the random-init network.

For each seed: pretrain every objective for --steps steps (`python -m train --config PRESET`), then probe the
random-init backbone of that seed and each pretrained one with the linear probe and weighted kNN on the same
labelled shard set (`python -m evaluate linear|knn`), and fine-tune each of them with the same budget
(`python -m evaluate finetune`, --finetune-epochs, Adam 1e-3, the seed's data order: the papers' main probe). Prints a table and one JSON line with every figure, the
mean and spread (max - min over seeds) per model and probe, and the gains over random init as differences and
ratios (quality, like speed, as a ratio against a baseline measured in the same run).

    python benchmarks/quality.py                          # the synthetic sample, made in a temp folder
    python benchmarks/quality.py --data shards/ucf9 --steps 280 --finetune-epochs 0   # cpu_small, 10 epochs
    python benchmarks/quality.py --steps 20 --seeds 0     # a smoke run

--data OUT holds OUT/train (pretraining and the probes' training set) and OUT/test (the probes' test set).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import sample_shards  # noqa: E402

# The synthetic sample the benchmark makes when no --data is given (see README, "The embedded sample").
# The camera kind with 4 scenes shared by the videos (so scene identity cannot tell videos apart), as measured in
# the README's Status: there fine-tuning from FIMA converges on every seed, from random init on some.
SAMPLE = dict(kind="camera", scenes=4, train_per_class=16, test_per_class=8, height=96, width=128, frames=64)
SAMPLE_SHORT_SIDE = 96
# ... and its recipe on top of the demo preset: 96 videos at batch 8 are 12 steps per epoch, so 25 epochs put the
# cosine's end at step 300 (the default --steps); a 64-key queue spans under half an epoch
SAMPLE_OVERRIDES = ["queue_size=64", "epochs=25"]


def pretrain(preset: str, data: Path, objective: str, seed: int, steps: int, out: Path, overrides: list[str]) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "train", "--no-progress", "--config", preset, f"data={data / 'train'}",
           f"objective={objective}", f"seed={seed}", f"max_steps={steps}", f"out_dir={out}", "ckpt_every=100000",
           *overrides]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pretraining failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def probe(command: str, model: list[str], data: Path, out: Path, cache: Path, eval_flags: list[str]) -> float:
    from evaluate.cli import main as evaluate_main
    cached = ["--cache-dir", str(cache)] if command != "finetune" else []   # fine-tuning trains the backbone
    rc = evaluate_main([command, *model, "--data", str(data), "--out", str(out), *cached, "--no-progress",
                        *eval_flags])
    if rc != 0:
        raise SystemExit(f"evaluate {command} failed for {model}")
    return json.loads((out / "results.json").read_text())["result"]["top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="labelled shard folder with train/ and test/ (default: the synthetic "
                   "sample, made in --work)")
    p.add_argument("--preset", help="pretraining preset (default: demo plus the sample's recipe on the synthetic "
                   "sample, cpu_small, the CPU-scale recipe measured on real video, with --data)")
    p.add_argument("--objectives", nargs="+", default=["moco", "fima"], help="objectives to pretrain (default moco fima)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps per run (default 300: ~25 min for both seeds on a 2-core CPU)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds (default 0 1): pretraining, random init "
                   "and probes")
    p.add_argument("--test-clips", type=int, default=5, help="clips per video of the probes' features (default 5)")
    p.add_argument("--finetune-epochs", type=int, default=30, help="epochs of the fine-tuning probe, the same for "
                   "every model (default 30; 0 = no fine-tuning probe)")
    p.add_argument("--work", type=Path, help="folder for data, runs and results (default: a temp folder)")
    p.add_argument("overrides", nargs="*", help="key=value pretraining config overrides, for every run")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    data = a.data or sample_shards(work / "sample", short_side=SAMPLE_SHORT_SIDE, **SAMPLE)
    a.preset = a.preset or ("cpu_small" if a.data else "demo")
    if not a.data and a.preset == "demo":   # the sample's recipe, unless the command line sets those keys
        given = {o.split("=", 1)[0] for o in a.overrides}
        a.overrides = [o for o in SAMPLE_OVERRIDES if o.split("=", 1)[0] not in given] + a.overrides

    from train.config import load_config
    cfg = load_config(a.preset, a.overrides)
    eval_flags = ["--frames", str(cfg["frames"]), "--stride", str(cfg["stride"]), "--crop", str(cfg["crop"]),
                  "--test-clips", str(a.test_clips)]
    models = ["random", *a.objectives]
    probes = ("linear", "knn") + (("finetune",) if a.finetune_epochs else ())
    e = a.finetune_epochs
    flags = {"linear": eval_flags, "knn": eval_flags,   # fine-tuning: the CPU recipe (the demo's optimiser), same budget
             "finetune": [*eval_flags, "--optimizer", "adam", "--lr", "0.001", "--lr-batch", "0", "--batch-size",
                          str(cfg["batch_size"]), "--epochs", str(e), "--milestones", str(max(1, e * 4 // 5)),
                          "--flip-p", str(cfg["flip_p"]), "--num-threads", str(cfg["num_threads"]), "--resume", "none"]}
    top1 = {probe_name: {m: [] for m in models} for probe_name in probes}
    seconds = {m: [] for m in a.objectives}
    for seed in a.seeds:
        for obj in a.objectives:
            seconds[obj].append(pretrain(a.preset, data, obj, seed, a.steps, work / "runs" / f"{obj}-s{seed}",
                                         a.overrides))
        for m in models:
            spec = (["--random-init", "--backbone", cfg["backbone"], "--backbone-width", str(cfg["backbone_width"])]
                    if m == "random" else ["--checkpoint", str(work / "runs" / f"{m}-s{seed}")])
            for probe_name in top1:
                top1[probe_name][m].append(probe(probe_name, [*spec, "--seed", str(seed)], data,
                                                 work / "eval" / f"{m}-s{seed}-{probe_name}", work / "cache",
                                                 flags[probe_name]))

    def mean(v):
        return sum(v) / len(v)

    summary = {pr: {m: {"mean": mean(v), "spread": max(v) - min(v), "per_seed": v} for m, v in d.items()}
               for pr, d in top1.items()}
    gains = {pr: {m: {"minus_random": summary[pr][m]["mean"] - summary[pr]["random"]["mean"],
                      "over_random": summary[pr][m]["mean"] / max(summary[pr]["random"]["mean"], 1e-9)}
                  for m in a.objectives} for pr in top1}
    if "fima" in a.objectives and "moco" in a.objectives:
        for pr in top1:
            gains[pr]["fima_minus_moco"] = summary[pr]["fima"]["mean"] - summary[pr]["moco"]["mean"]

    print(f"\nquality: {a.preset} x {a.steps} steps, seeds {a.seeds}, data {data} (top-1 %, mean over seeds, spread)")
    print(f"{'model':<10}" + "".join(f"{pr:>22}" for pr in top1))
    for m in models:
        cells = "".join(f"{100 * summary[pr][m]['mean']:>14.1f} ±{100 * summary[pr][m]['spread'] / 2:>5.1f}  "
                        for pr in top1)
        print(f"{m:<10}{cells}")
    print(json.dumps({"benchmark": "quality", "data": str(data), "preset": a.preset, "overrides": a.overrides,
                      "steps": a.steps, "seeds": a.seeds, "test_clips": a.test_clips,
                      "finetune_epochs": a.finetune_epochs,
                      "pretrain_seconds": {m: [round(s, 1) for s in v] for m, v in seconds.items()},
                      "top1": summary, "gain": gains}))


if __name__ == "__main__":
    main()
