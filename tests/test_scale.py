"""Kinetics-scale behaviour on real shards (issue 28): the default bad-sample limit, one sharding run per OUT.

Real videos, real `python -m preprocess` and `python -m train` processes, DALI on CPU; no timing assertions
(the costs at 1k..650k samples are measured by benchmarks/scale.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import index_rows
from preprocess import shard_format as fmt
from preprocess.cli import EXIT_LOCKED
from preprocess.sample_videos import make_sample_videos
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


# ---------------------------------------------------------------- one sharding run per OUT (preprocess/lock.py)
def preprocess_cmd(src: Path, out: Path, *extra) -> list[str]:
    return [sys.executable, "-m", "preprocess", str(src), str(out), "--short-side", "64", "--workers", "1",
            "--max-per-shard", "3", "--no-progress", *map(str, extra)]


@pytest.fixture(scope="module")
def small_videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lock_videos")
    make_sample_videos(out, classes=("right", "left"), train_per_class=3, test_per_class=1, frames=32, progress=False)
    return out


def started(cmd: list[str], lock: Path) -> subprocess.Popen:
    """A run started in its own process group, returned once it holds ``lock`` (it is then mid-transcode)."""
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    while (json.loads(lock.read_text() or "{}") if lock.is_file() else {}).get("pid") != p.pid:
        assert p.poll() is None, f"the run ended before it was seen holding {lock}: {p.communicate()}"
        time.sleep(0.01)
    return p


def refused(r: subprocess.CompletedProcess, holder: subprocess.Popen) -> bool:
    return (r.returncode == EXIT_LOCKED and f"pid {holder.pid} on host {socket.gethostname()}" in r.stderr
            and "Traceback" not in r.stderr + r.stdout)


def verified(out: Path) -> bool:
    r = subprocess.run([sys.executable, "-m", "preprocess", "verify", str(out), "--no-progress"], cwd=REPO,
                       capture_output=True, text=True)
    return r.returncode == 0


def contents(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "verify.json"}


def test_two_runs_on_one_out_the_second_is_refused_naming_the_first(small_videos, tmp_path):
    out = tmp_path / "out"
    first = started(preprocess_cmd(small_videos, out), out / ".preprocess.lock")
    os.killpg(first.pid, signal.SIGSTOP)              # held mid-run: the second run surely meets it
    try:
        second = subprocess.run(preprocess_cmd(small_videos, out), cwd=REPO, capture_output=True, text=True)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert refused(second, first), (second.returncode, second.stderr)
    _, err = first.communicate()
    assert first.returncode == 0, err[-2000:]
    assert not (out / ".preprocess.lock").exists() and verified(out)
    # a run after it is done is not refused, and changes nothing
    before = contents(out)
    again = subprocess.run(preprocess_cmd(small_videos, out), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and contents(out) == before


def test_a_killed_runs_lock_is_taken_over_and_the_result_is_whole(small_videos, tmp_path):
    ref = tmp_path / "ref"
    assert subprocess.run(preprocess_cmd(small_videos, ref), cwd=REPO, capture_output=True).returncode == 0
    out = tmp_path / "out"
    killed = started(preprocess_cmd(small_videos, out), out / ".preprocess.lock")
    os.killpg(killed.pid, signal.SIGKILL)             # the run and its ffmpeg: no clean-up ran
    killed.wait()
    holder = json.loads((out / ".preprocess.lock").read_text())
    assert holder["pid"] == killed.pid and holder["host"] == socket.gethostname()
    r = subprocess.run(preprocess_cmd(small_videos, out), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"took over the lock {out / '.preprocess.lock'}" in r.stderr and f"pid {killed.pid}" in r.stderr
    assert contents(out) == contents(ref) and verified(out)


def test_array_parts_run_side_by_side_but_the_same_part_twice_or_a_merge_is_refused(small_videos, tmp_path):
    out = tmp_path / "out"
    part = lambda i: preprocess_cmd(small_videos, out, "--num-jobs", 2, "--job-index", i)   # noqa: E731
    first = started(part(0), out / ".preprocess.job-0-of-2.lock")
    os.killpg(first.pid, signal.SIGSTOP)
    try:
        twice = subprocess.run(part(0), cwd=REPO, capture_output=True, text=True)
        other = subprocess.run(part(1), cwd=REPO, capture_output=True, text=True)
        merge = subprocess.run(preprocess_cmd(small_videos, out, "--merge"), cwd=REPO, capture_output=True, text=True)
    finally:
        os.killpg(first.pid, signal.SIGCONT)
    assert refused(twice, first), (twice.returncode, twice.stderr)
    assert other.returncode == 0, other.stderr[-2000:]
    assert refused(merge, first), (merge.returncode, merge.stderr)
    _, err = first.communicate()
    assert first.returncode == 0, err[-2000:]
    merge = subprocess.run(preprocess_cmd(small_videos, out, "--merge"), cwd=REPO, capture_output=True, text=True)
    assert merge.returncode == 0, merge.stderr[-2000:]
    assert verified(out) and not list(out.glob(".preprocess*.lock"))


def test_a_lock_from_another_host_is_not_guessed_at(small_videos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".preprocess.lock").write_text(json.dumps({"host": "node-17", "pid": 4242, "since": 0, "command": "x"}))
    r = subprocess.run(preprocess_cmd(small_videos, out), cwd=REPO, capture_output=True, text=True)
    assert r.returncode == EXIT_LOCKED and "pid 4242 on host node-17" in r.stderr and "delete the lock file" in r.stderr
    assert "Traceback" not in r.stderr and sorted(p.name for p in out.iterdir()) == [".preprocess.lock"]


# ---------------------------------------------------------------- the lean index (pipeline/shards.py)
def test_the_lean_index_agrees_with_the_index_files_and_leaves_the_per_sample_list_unread(damaged_shards):
    from pipeline import ShardSet
    out, damaged = damaged_shards
    split = out / "train"
    s = ShardSet(split)
    # opened without the manifest's per-sample list; it is read the first time something asks for it
    assert not dict.__contains__(s.manifest, "samples") and s._index.lines is None
    full = json.loads((split / "manifest.json").read_text())
    assert {k: v for k, v in full.items() if k != "samples"} == dict(s.manifest)
    assert s.manifest.get("samples") == full["samples"] and s.manifest["samples"] == full["samples"]
    # every sample's members, tar and key as the general parser reads them from the .idx files
    rows = [(t, comps, key) for t, tar in enumerate(fmt.shard_paths(split))
            for comps, key in fmt.parse_index(fmt.index_path(tar))]
    assert len(s) == len(rows) == full["num_samples"]
    for i, (t, comps, key) in enumerate(rows):
        assert s._index.entry(i) == (t, comps) and s.key(i) == key
        assert s.location(i) == (str(fmt.shard_paths(split)[t]), comps[fmt.VIDEO_EXT][0])
    assert s.find_keys(damaged | {"not-a-key"}) == {k: i for i, (_, _, k) in enumerate(rows) if k in damaged}
    s.close()


def test_the_manifest_head_is_read_without_parsing_the_per_sample_list(synthetic_shards, tmp_path):
    text = (synthetic_shards / "train" / "manifest.json").read_text()
    full = json.loads(text)
    start = text.index('\n "samples": [') + len('\n "samples": [')
    end = text.index('\n ],\n "shards": [')
    (tmp_path / "manifest.json").write_text(text[:start] + "\n  not JSON at all" + text[end:])   # never parsed
    head = fmt.manifest_head(tmp_path / "manifest.json")
    assert head == {k: v for k, v in full.items() if k != "samples"}


def test_the_manifest_labels_are_read_as_numbers_and_other_layouts_are_left_to_the_parser(synthetic_shards, tmp_path):
    for split in ("train", "test"):
        path = synthetic_shards / split / "manifest.json"
        full = json.loads(path.read_text())
        labels = fmt.manifest_labels(path)
        assert labels.dtype == np.int64 and labels.tolist() == [r["label"] for r in full["samples"] if "label" in r]
    full = json.loads((synthetic_shards / "train" / "manifest.json").read_text())
    odd = tmp_path / "manifest.json"
    # a record without a label is left out (as the list comprehension does); a nested "label" is not a record's
    full["samples"][0].pop("label")
    full["samples"][1]["extra"] = {"label": 99}
    odd.write_text(json.dumps(full, indent=1, sort_keys=True))
    assert fmt.manifest_labels(odd).tolist() == [r["label"] for r in full["samples"] if "label" in r]
    # a label that is not a plain integer, another layout, an empty file: None, the caller parses the list
    full["samples"][2]["label"] = None
    odd.write_text(json.dumps(full, indent=1, sort_keys=True))
    assert fmt.manifest_labels(odd) is None
    odd.write_text(json.dumps(full))
    assert fmt.manifest_labels(odd) is None
    odd.write_text("")
    assert fmt.manifest_labels(odd) is None


def test_the_manifest_records_of_a_few_keys_are_found_without_parsing_the_list(synthetic_shards, tmp_path):
    full = json.loads((synthetic_shards / "train" / "manifest.json").read_text())
    by_key = {r["key"]: r for r in full["samples"]}
    keys = list(by_key)[:3] + ["not-a-key"]
    found, any_record = fmt.manifest_records(synthetic_shards / "train" / "manifest.json", keys)
    assert any_record and found == {k: by_key[k] for k in keys[:3]}
    # a key listed twice: the last record (as a dict built from the list); a key with non-ASCII letters, written
    # as preprocess writes it (ensure_ascii=False) or escaped; a nested "key" is not a record's
    odd = tmp_path / "manifest.json"
    dup = dict(full["samples"][0], label=5)
    full["samples"] += [dup, dict(full["samples"][1], key="café-1"), {"frames": 1, "nested": {"key": "x"}}]
    for ascii_only in (False, True):
        odd.write_text(json.dumps(full, indent=1, sort_keys=True, ensure_ascii=ascii_only))
        ref = {r.get("key"): r for r in full["samples"] if isinstance(r, dict)}
        found, any_record = fmt.manifest_records(odd, [dup["key"], "café-1", "x"])
        assert any_record and found == {k: ref[k] for k in (dup["key"], "café-1")}
    # no records; another layout: None, the caller parses the list
    full["samples"] = []
    odd.write_text(json.dumps(full, indent=1, sort_keys=True))
    assert fmt.manifest_records(odd, ["x"]) == ({}, False)
    odd.write_text(json.dumps(full))
    assert fmt.manifest_records(odd, ["x"]) is None
