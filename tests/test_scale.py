"""Kinetics-scale behaviour on real shards (issue 28): the default bad-sample limit, one sharding run per OUT.

Real videos, real `python -m preprocess` and `python -m train` processes, DALI on CPU; no timing assertions
(the costs at 1k..650k samples are measured by benchmarks/scale.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import index_rows
from preprocess import shard_format as fmt
from train.bad_samples import limit

REPO = Path(__file__).resolve().parents[1]
# the trainer at its cheapest, with the DEFAULT max_bad_samples: 24 videos, batch 4 -> 6 steps an epoch
TINY = ["crop=32", "frames=16", "batch_size=4", "num_threads=1", "precision=fp32", "channels_last=false", "backend=cpu",
        "queue_size=16", "log_every=1", "epochs=1", "warmup_epochs=0", "lr=0.01", "objective=moco", "ckpt_every=100"]


def run_train(*args):
    return subprocess.run([sys.executable, "-m", "train", "--no-progress", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True)


def test_the_default_limit_tolerates_one_bad_sample_in_any_set():
    assert [limit(0.01, n) for n in (1, 24, 48, 99, 100, 101, 650_000)] == [1, 1, 1, 1, 1, 2, 6500]
    assert limit(0, 48) == 0 and limit(5, 48) == 5 and limit(1, 48) == 1


def test_a_default_run_with_one_damaged_sample_finishes_and_names_it(synthetic_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(synthetic_shards, out)
    tar = fmt.shard_paths(out / "train")[0]
    row = index_rows(tar)[2]
    off, size = row[fmt.VIDEO_EXT]
    data = bytearray(tar.read_bytes())
    data[off + size // 2: off + size // 2 + 1024] = bytes(1024)      # the CRC-32 check catches it at the read
    tar.write_bytes(bytes(data))
    r = run_train(*TINY, f"data={out / 'train'}", f"out_dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bad sample set aside" in r.stdout and row["__key__"] in r.stdout + r.stderr
    logged = [json.loads(line) for line in (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()]
    assert [x["key"] for x in logged] == [row["__key__"]]
    ckpt = sorted((tmp_path / "run" / "checkpoints").glob("ckpt-*.pt"))[-1]
    assert torch.load(ckpt, weights_only=True)["step"] == 6         # every step of the epoch ran

