"""Kill -9 anywhere, disk full while checkpointing: nothing is lost, reruns end where an uninterrupted run ends.

The kill points are drawn from a seeded generator, so a failure reproduces. CI runs a few
(``KILL_POINTS``, default 2 per stage); run many more with e.g.

    KILL_POINTS=40 KILL_SEED=1 .venv/bin/python -m pytest -q -s tests/test_kill_anywhere.py

which prints how many kill points were survived per stage. A kill lands wherever the clock says: inside the
transcoding pool, while packing a tar, between a tar and its index, inside a checkpoint write, between steps.
The process group is killed (SIGKILL), as a node failure would, so ffmpeg children die too.
"""
from __future__ import annotations

import errno
import filecmp
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
POINTS = int(os.environ.get("KILL_POINTS", 2))
SEED = int(os.environ.get("KILL_SEED", 0))
TRAIN = ["crop=32", "frames=8", "batch_size=4", "num_threads=1", "precision=fp32", "channels_last=false",
         "backend=cpu", "objective=moco", "queue_size=16", "log_every=1", "epochs=2", "warmup_epochs=0", "lr=0.01",
         "max_steps=6", "ckpt_every=1", "keep_ckpts=2"]


def kill_after(cmd: list[str], delay: float) -> bool:
    """Run cmd in its own process group and SIGKILL the group after delay seconds. True if it was still running."""
    return kill_when(cmd, lambda: True, delay)


def kill_when(cmd: list[str], ready, delay: float, timeout: float = 900) -> bool:
    """Run cmd in its own process group; once ready() holds, wait delay seconds and SIGKILL the group. True if it
    was still running then."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        proc.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def steps_logged(run: Path) -> int:
    """Training steps in a run's metrics.jsonl so far (a line being written is not counted)."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    except FileNotFoundError:
        return 0
    return sum(1 for x in lines if x.endswith("\n") and '"loss/loss"' in x)


def latest_step(run: Path) -> int:
    """The step of the newest complete checkpoint (0 if none)."""
    names = sorted(p.name for p in (run / "checkpoints").glob("ckpt-*.pt")) if (run / "checkpoints").is_dir() else []
    return int(names[-1][5:13]) if names else 0


def timed(cmd: list[str]) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return time.perf_counter() - t


def epoch_seconds(cmd: list[str], run: Path, steps_per_epoch: int) -> float:
    """Run cmd to its end and return the wall time between its first two epoch checkpoints: a kill delay scaled
    by the whole run's time would be mostly start-up (imports, pipeline builds) and could land after the end."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, float] = {}
    while proc.poll() is None:
        step = latest_step(run)
        if step and step not in seen:
            seen[step] = time.perf_counter()
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    first, second = steps_per_epoch, 2 * steps_per_epoch
    assert first in seen and second in seen, seen
    return seen[second] - seen[first]


def same_tree(a: Path, b: Path) -> list[str]:
    """Files that differ between two folders (or exist in one only)."""
    cmp = filecmp.dircmp(a, b)
    diff = [str(Path(a.name) / n) for n in cmp.left_only + cmp.right_only + cmp.diff_files + cmp.funny_files]
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    diff += mismatch + errors
    for sub in cmp.common_dirs:
        diff += same_tree(a / sub, b / sub)
    return diff


def test_preprocess_killed_anywhere_reruns_to_byte_identical_shards(sample_videos, tmp_path):
    """Every kill counted here landed before the run ended (the process was still running and the top-level
    manifest, written last, was not there yet), and each kill point has at least one: the first kill on a fresh
    folder (again on another, earlier, if the run outpaced the reference). A rerun does less work, so a later kill
    may come after it finished: that one is not counted, and the point goes on to its clean finish."""
    cmd = [sys.executable, "-m", "preprocess", str(sample_videos), "--name", "k", "--max-per-shard", "8",
           "--no-progress", "--workers", "2"]
    full = timed([*cmd[:4], str(tmp_path / "ref"), *cmd[4:]])
    rng = random.Random(SEED)
    survived, landed_total = 0, 0
    for point in range(POINTS):
        landed = []
        for retry in range(4):        # a run faster than the reference may finish first: a fresh folder, earlier
            out = tmp_path / f"cut{point}-{retry}"
            for attempt in range(3):  # up to three kills in a row on the same folder, then a clean finish
                frac = (rng.uniform(0.05, 0.7) / 2 ** retry if attempt == 0 else
                        rng.uniform(0.05, 0.95) / (attempt + 1))   # a rerun does less work: earlier still
                killed = kill_after([*cmd[:4], str(out), *cmd[4:]], frac * full)
                done = (out / "manifest.json").exists()
                if not killed:
                    assert done, (point, attempt)     # it finished by itself
                    break
                if done:                              # killed after its last write: not a mid-run kill
                    break
                landed.append(round(frac, 3))
            if landed:
                break
        assert landed, (point, "no kill landed before the run ended")
        r = subprocess.run([*cmd[:4], str(out), *cmd[4:]], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        diff = same_tree(tmp_path / "ref", out)
        assert not diff, (point, landed, diff)
        survived += 1
        landed_total += len(landed)
    print(f"\npreprocess: {survived}/{POINTS} kill points survived, {landed_total} kills mid-run (seed {SEED})")


def state(run: Path) -> dict:
    return torch.load(sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)


def losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss/loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss/loss" in r}


def test_training_killed_anywhere_resumes_bit_identically(damaged_shards, tmp_path):
    """On the shard set with three damaged samples (tests/conftest.py `damage`): the uninterrupted run sets them
    aside as it meets them; a run killed anywhere (before or after it logged them) and resumed ends the same."""
    data, damaged = damaged_shards
    cmd = [sys.executable, "-m", "train", "--no-progress", *TRAIN, "max_bad_samples=5", f"data={data / 'train'}"]
    full = timed([*cmd, f"out_dir={tmp_path / 'ref'}"])
    ref = state(tmp_path / "ref")
    logged = lambda run: {json.loads(x)["key"] for x in (run / "bad_samples.jsonl").read_text().splitlines()}  # noqa: E731
    assert logged(tmp_path / "ref") == damaged
    rng = random.Random(SEED + 1)
    survived = 0
    for point in range(POINTS):
        out = tmp_path / f"cut{point}"
        for _ in range(2):
            # kill at a seeded point of the run's own progress, not of the clock (a rerun does less work): once it
            # has logged `after` steps, plus up to one step's time (inside a step, or inside its checkpoint write)
            after = rng.randint(0, 3)
            killed = kill_when([*cmd, f"out_dir={out}"], lambda: steps_logged(out) >= after,
                               rng.uniform(0.0, 1.0) * full / 20)
            cut = latest_step(out)
            assert killed and cut < 6, (point, after, cut)   # the kill landed before the run's end
        r = subprocess.run([*cmd, f"out_dir={out}"], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        got = state(out)
        assert got["step"] == ref["step"] == 6 and got["loader"] == ref["loader"]
        for k in ref["model"]:                                    # weights, BN statistics, queues and pointers
            assert torch.equal(ref["model"][k], got["model"][k]), (point, k)
        for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a), point
        assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(ref["rng"], got["rng"]))
        assert losses(out) == losses(tmp_path / "ref")            # one line per step, the same numbers
        assert logged(out) == damaged
        assert not list((out / "checkpoints").glob(".*.tmp"))      # what a kill mid-save left was cleaned up
        survived += 1
    print(f"\ntrain: {survived}/{POINTS} kill points survived (seed {SEED})")


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(synthetic_shards, tmp_path):
    """A patched write (ENOSPC once 4 KB of the checkpoint of step 3 are written): the run stops with a message
    that says what is left, nothing half-written stays, and the previous checkpoint resumes to the same end."""
    out = tmp_path / "run"
    args = ["--no-progress", *TRAIN, "max_steps=4", f"data={synthetic_shards / 'train'}", f"out_dir={out}"]
    inject = (
        "import errno, os, sys, torch\n"
        "real = torch.save\n"
        "def save(obj, f, *a, **k):\n"
        "    if isinstance(obj, dict) and obj.get('step') == 3:\n"
        "        f.write(b'x' * 4096)\n"
        "        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "    return real(obj, f, *a, **k)\n"
        "torch.save = save\n"
        "from train.cli import main\n"
        f"sys.exit(main({args!r}))\n")
    r = subprocess.run([sys.executable, "-c", inject], cwd=REPO, capture_output=True, text=True)
    assert r.returncode != 0
    assert os.strerror(errno.ENOSPC) in r.stderr and "nothing half-written was left" in r.stderr, r.stderr[-2000:]
    assert "ckpt-00000002.pt is intact" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt-00000001.pt", "ckpt-00000002.pt"]
    assert state(out)["step"] == 2                                # loadable
    resumed = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0 and "at step 2" in resumed.stdout, resumed.stderr[-2000:]
    ref = subprocess.run([sys.executable, "-m", "train", *args[:-1], f"out_dir={tmp_path / 'ref'}"], cwd=REPO,
                         capture_output=True, text=True)
    assert ref.returncode == 0
    a, b = state(out), state(tmp_path / "ref")
    assert a["step"] == b["step"] == 4 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_finetuning_killed_anywhere_resumes_bit_identically(synthetic_shards, tmp_path):
    """Fine-tuning runs the same loop (train/loop.py): killed at seeded points of its progress (SIGKILL, mid-epoch
    or inside a checkpoint write) and rerun, it ends with the weights, optimiser state, RNG, per-epoch history and
    test result of the uninterrupted run. Its checkpoints come once per epoch, so a kill mid-epoch redoes that
    epoch's steps from the epoch's start: the same samples, augmentations and dropout masks."""
    cmd = [sys.executable, "-m", "evaluate", "finetune", "--random-init", "--backbone", "i3d", "--backbone-width",
           "0.25", "--data", str(synthetic_shards), "--frames", "8", "--crop", "32", "--test-clips", "1",
           "--batch-size", "4", "--epochs", "3", "--milestones", "2", "--num-threads", "1", "--no-progress"]
    epoch_s = epoch_seconds([*cmd, "--out", str(tmp_path / "ref")], tmp_path / "ref", steps_per_epoch=6)
    ref, ref_result = state(tmp_path / "ref"), json.loads((tmp_path / "ref" / "results.json").read_text())["result"]
    rng = random.Random(SEED + 2)
    for point in range(POINTS):
        after = rng.randint(0, 2)                  # epochs checkpointed before the kill may land
        frac = rng.uniform(0.0, 1.0)               # then up to one epoch's time (start-up is not in it)
        for retry in range(4):                     # a run faster than the reference may finish first: earlier
            out = tmp_path / f"cut{point}-{retry}"
            killed = kill_when([*cmd, "--out", str(out)], lambda: latest_step(out) >= 6 * after,
                               frac * epoch_s / 2 ** retry)
            if killed and not (out / "results.json").exists():
                break
        assert killed and not (out / "results.json").exists(), (point, after)   # the kill landed mid-run
        r = subprocess.run([*cmd, "--out", str(out)], cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 0, (point, r.stderr[-2000:])
        got = state(out)
        assert got["step"] == ref["step"] == 18 and got["epoch"] == 3 and got["loader"] == ref["loader"]
        for k in ref["model"]:
            assert torch.equal(ref["model"][k], got["model"][k]), (point, k)
        for a, b in zip(ref["optimizer"]["state"].values(), got["optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a), point
        assert all(torch.equal(x["torch"], y["torch"]) for x, y in zip(ref["rng"], got["rng"]))
        result = json.loads((out / "results.json").read_text())["result"]
        assert result["top1"] == ref_result["top1"] and result["clip_top1"] == ref_result["clip_top1"]
        keep = ("epoch", "train_loss", "train_clip_top1", "lr")     # the rest are timings
        assert [{k: h[k] for k in keep} for h in result["history"]] == [{k: h[k] for k in keep}
                                                                        for h in ref_result["history"]], point
