"""The benchmarks that the README's claims rest on, run for real at smoke size: they finish, their JSON parses, and
their rows say what they measured (never a timing or quality threshold: those belong in the benchmarks' output)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})


def test_quality_benchmark_compares_pretrained_models_with_the_random_init(synthetic_shards, tmp_path):
    r = run_script(REPO / "benchmarks" / "quality.py", "--data", synthetic_shards, "--steps", "2", "--seeds", "0",
                   "--test-clips", "1", "--finetune-epochs", "1", "--work", tmp_path, "crop=32", "batch_size=4", "num_threads=1",
                   "queue_size=16")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "quality" and out["steps"] == 2 and out["seeds"] == [0]
    assert out["preset"] == "cpu_small"                        # --data given: the CPU-scale recipe
    for probe in ("linear", "knn", "finetune"):
        for model in ("random", "moco", "fima"):
            v = out["top1"][probe][model]
            assert len(v["per_seed"]) == 1 and 0 <= v["mean"] <= 1 and v["spread"] == 0
        g = out["gain"][probe]
        assert abs(g["fima"]["minus_random"] - (out["top1"][probe]["fima"]["mean"] -
                                              out["top1"][probe]["random"]["mean"])) < 1e-12
        assert "fima_minus_moco" in g
    # each pretraining really ran (a checkpoint at step 2) and the random init is the run's own seed
    for obj in ("moco", "fima"):
        ckpt = sorted((tmp_path / "runs" / f"{obj}-s0" / "checkpoints").glob("ckpt-*.pt"))
        assert ckpt and ckpt[-1].name == "ckpt-00000002.pt"
    assert "random" in r.stdout and "fima" in r.stdout       # the printed table


def test_acceptance_run_executes_here_with_its_gpu_rows_skipped(tmp_path):
    r = run_script(REPO / "benchmarks" / "acceptance.py", "--quick", "--videos", "6", "--work", tmp_path, "--json",
                   tmp_path / "acceptance.json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "acceptance.json").read_text())
    rows = {x["row"]: x for x in report["rows"]}
    assert report["device"] == "cpu" and rows["env"]["measured"]["dali"] == "2.4.0"
    for name in ("doctor.env.driver", "doctor.env.gpus", "doctor.decode.gpu", "doctor.decode.match",
                 "decode.h264.align16.whole", "decode.h264.align2.whole", "dist.allreduce"):
        assert rows[name]["status"] == "SKIP" and rows[name]["figure"], name
    for name in ("decode.vp9.align16.trimmed", "decode.vp9.align16.whole", "decode.vp9.align2.trimmed",
                 "decode.vp9.align2.whole"):
        assert rows[name]["status"] == "PASS" and rows[name]["measured"]["videos_per_s"] > 0, name
        assert rows[name]["measured"]["decoded_frames_per_s"] > 0
    assert rows["doctor.decode.cache.align16"]["measured"]["cache_friendly"]
    assert not rows["doctor.decode.cache.align2"]["measured"]["cache_friendly"]
    assert rows["doctor.train.step"]["status"] == "PASS" and rows["train.data_stall"]["status"] == "PASS"
    assert rows["train.data_stall"]["measured"]["data_stall_ratio"] > 0
