"""A bad sample never kills a run: real damaged shards (three kinds of damage), real DALI pipelines, real runs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import damage
from pipeline import AugConfig, eval_loader, pretrain_loader
from preprocess import shard_format

REPO = Path(__file__).resolve().parents[1]
CFG = AugConfig(num_frames=8, stride=2, crop_size=32)
OUTPUTS = ("rgb_m", "rgb_n", "label", "index")
# the trainer at its cheapest (FIMA needs 16 frames): 24 videos, batch 4 -> 6 steps per epoch, every damaged sample met in the first
TINY = ["crop=32", "frames=16", "batch_size=4", "num_threads=1", "precision=fp32", "channels_last=false", "backend=cpu",
        "queue_size=16", "log_every=1", "epochs=2", "warmup_epochs=0", "lr=0.01", "max_steps=7", "max_bad_samples=5"]


def stream(split: Path, epochs: int = 2, exclude: list[dict] | None = None, start: dict | None = None):
    loader = pretrain_loader(split, OUTPUTS, batch_size=4, config=CFG, num_threads=1)
    if exclude:
        loader.exclude(exclude)
    if start:
        loader.load_state_dict(start)
    batches = []
    while loader.epoch < epochs:
        batches += list(loader)
    loader.close()
    return loader, batches


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_the_loader_sets_damaged_samples_aside_and_the_stream_depends_only_on_which(damaged_shards, monkeypatch):
    out, damaged = damaged_shards
    loader, found = stream(out / "train")
    assert {r["key"] for r in loader.bad.values()} == damaged
    for r in loader.bad.values():     # where it sits, what went wrong, when it was met
        assert r["shard"].endswith(".tar") and r["offset"] > 0 and r["error"] and r["epoch"] == 0 and r["rank"] == 0
    errors = " ".join(r["error"] for r in loader.bad.values())
    assert "CRC-32" in errors and "truncated" in errors and "index" in errors
    assert len(found) == 2 * len(loader) and all(b["rgb_m"].shape == (4, 3, 8, 32, 32) for b in found)
    bad = {r["index"] for r in loader.bad.values()}
    fed = torch.cat([b["index"] for b in found]).tolist()
    assert not bad & set(fed)
    # the stand-in rule: the next good sample of the epoch's order, so the other 21 videos are all fed
    assert set(range(24)) - bad <= set(fed)

    # told the bad set up front (a resumed run), the loader feeds exactly the same tensors, finding nothing
    told, again = stream(out / "train", exclude=list(loader.bad.values()))
    assert same(found, again) and told.take_new_bad() == []
    # ... and resumed mid-epoch 1 it continues the same stream
    _, rest = stream(out / "train", exclude=[{"key": k} for k in damaged], start={"epoch": 1, "step": 2})
    assert same(found[len(loader) + 2:], rest)

    # without the per-sample CRC (shards of older versions) the overwritten video reaches the decoder, which
    # fails the whole DALI batch; the loader finds the culprit by decoding alone and feeds the same stream
    monkeypatch.setattr(shard_format, "VIDEO_CRC_FIELD", "not-recorded")
    old, old_found = stream(out / "train")
    assert {r["key"] for r in old.bad.values()} == damaged
    assert any("does not decode" in r["error"] for r in old.bad.values())
    assert same(found, old_found)


def test_a_test_split_leaves_bad_videos_out_and_reports_them(synthetic_shards, tmp_path):
    out = tmp_path / "shards"
    shutil.copytree(synthetic_shards, out)
    damaged = damage(out / "test")
    loader = eval_loader(out / "test", "test", batch_size=4, config=AugConfig(num_frames=8, stride=2, crop_size=32,
                                                                                 test_clips=2), num_threads=1)
    rows = list(loader)
    loader.close()
    seen = set(torch.cat([b["index"] for b in rows]).tolist()) - {-1}
    bad = {r["index"] for r in loader.bad.values()}
    assert {r["key"] for r in loader.bad.values()} == damaged and seen == set(range(12)) - bad

    r = subprocess.run([sys.executable, "-m", "evaluate", "linear", "--random-init", "--backbone-width", "0.25",
                        "--data", str(out), "--frames", "8", "--crop", "32", "--test-clips", "1", "--epochs", "5",
                        "--out", str(tmp_path / "lin"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
                        "--num-threads", "1"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "undecodable test videos (left out)           3" in r.stdout
    result = json.loads((tmp_path / "lin" / "results.json").read_text())["result"]
    assert set(result["undecodable"]["test"]["keys"]) == damaged and result["undecodable"]["train"]["count"] == 0
    assert result["test_videos"] == 9                   # the metrics say over how many videos they were taken


def run_train(*args, env=None):
    return subprocess.run([sys.executable, "-m", "train", "--no-progress", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


def final_state(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)


def logged_bad(run: Path) -> set[str]:
    return {json.loads(line)["key"] for line in (run / "bad_samples.jsonl").read_text().splitlines()}


@pytest.mark.parametrize("objective", ["fima", "moco"])
def test_pretraining_on_damaged_shards_finishes_and_resumes_exactly(damaged_shards, tmp_path, objective):
    out, damaged = damaged_shards
    common = [*TINY, f"data={out / 'train'}", f"objective={objective}", "ckpt_every=100"]
    ref = run_train(*common, f"out_dir={tmp_path / 'ref'}")
    assert ref.returncode == 0, ref.stderr[-2000:]
    assert logged_bad(tmp_path / "ref") == damaged and ref.stdout.count("bad sample set aside") == 3
    state = final_state(tmp_path / "ref")
    assert state["step"] == 7
    # stopped after step 2 (before any damaged sample was met in this order? the file says what was met) and
    # resumed: the same final weights, queues, BN statistics and loader position
    cut = run_train(*common, "max_steps=2", "ckpt_every=1", f"out_dir={tmp_path / 'cut'}")
    assert cut.returncode == 0, cut.stderr[-2000:]
    resumed = run_train(*common, f"out_dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert logged_bad(tmp_path / "cut") == damaged
    b = final_state(tmp_path / "cut")
    assert b["loader"] == state["loader"]
    for k in state["model"]:
        assert torch.equal(state["model"][k], b["model"][k]), k
    # a resumed run starts with the logged samples set aside and never meets them again
    again = run_train(*common, "max_steps=8", f"out_dir={tmp_path / 'cut'}")
    assert again.returncode == 0 and "3 samples set aside from the start" in again.stdout
    assert "step 8: bad sample" not in again.stdout and len(logged_bad(tmp_path / "cut")) == 3
    # and it continued from the checkpoints (a fresh start that sets the logged samples aside from its first step
    # ends with the same tensors, so the end state alone cannot tell a resume from a restart)
    assert "at step 2 " in resumed.stdout and "at step 7 " in again.stdout, (resumed.stdout[-2000:], again.stdout[-2000:])
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
             if "loss/loss" in x]
    assert steps == list(range(1, 9)), steps                # each step logged once: 1-2 cut, 3-7 resumed, 8 again


def test_too_many_bad_samples_stop_with_a_checkpoint_and_the_command_that_checks(damaged_shards, tmp_path):
    out, damaged = damaged_shards
    r = run_train(*TINY, f"data={out / 'train'}", "objective=moco", "max_bad_samples=1", f"out_dir={tmp_path / 'run'}")
    assert r.returncode != 0
    assert "max_bad_samples allows 1" in r.stderr and f"python -m preprocess verify {out}" in r.stderr
    assert "A checkpoint was saved" in r.stderr and final_state(tmp_path / "run")["step"] >= 1
    assert len(logged_bad(tmp_path / "run")) == 2
    # the verify command's key list, given up front, sets them aside before the run meets them
    keys = tmp_path / "bad_keys.txt"
    keys.write_text("\n".join(sorted(damaged)) + "\n")
    r = run_train(*TINY, f"data={out / 'train'}", "objective=moco", "max_bad_samples=5", "max_steps=2",
                  f"exclude_samples={keys}", f"out_dir={tmp_path / 'excluded'}")
    assert r.returncode == 0 and "3 samples set aside from the start" in r.stdout and "bad sample set aside" not in r.stdout


def test_two_ranks_on_damaged_shards_take_the_same_steps_and_agree(damaged_shards, tmp_path):
    out, damaged = damaged_shards
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "train", "--no-progress", *TINY, "batch_size=2", f"data={out / 'train'}", "objective=moco",
                        "ckpt_every=3", f"out_dir={tmp_path / 'two'}"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    state = final_state(tmp_path / "two")
    assert state["step"] == 7 and state["world_size"] == 2
    assert logged_bad(tmp_path / "two") == damaged
    assert len(set(state["rank_checksums"])) == 1        # both ranks ended with identical weights
