"""Shared fixtures: real videos and real shards, made once per test session.

* `sample_videos`: the project's synthetic motion videos (OUT/{train,test}/<class>/*.mp4), small.
* `synthetic_shards`: those videos sharded by `python -m preprocess` (OUT/train, OUT/test).
* `ucf_shards`: ../shared/data/ucf101-mini sharded with its official split-1 files (skipped when absent).
* `coded_shards`: small shards of videos whose frames carry their own index in their colour (`frame_codes`).
* `damaged_shards`: a copy of `synthetic_shards` with three kinds of damage in train/ (`damage`), and the keys hit.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from preprocess import shard_format as fmt
from preprocess.cli import main as preprocess_main
from preprocess.sample_videos import encode, make_sample_videos

REPO = Path(__file__).resolve().parents[1]
UCF_MINI = Path(os.environ.get("UCF101_MINI", REPO.parent / "shared" / "data" / "ucf101-mini"))

# the synthetic set used across the suite: 6 motion classes, 4 train + 2 test videos each, 64 frames at 320x240
SAMPLE_KW = dict(train_per_class=4, test_per_class=2, frames=64, progress=False)


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample_videos")
    make_sample_videos(out, **SAMPLE_KW)
    return out


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory, sample_videos) -> Path:
    out = tmp_path_factory.mktemp("synthetic_shards")
    rc = preprocess_main([str(sample_videos), str(out), "--name", "synthetic", "--max-per-shard", "8", "--no-progress"])
    assert rc == 0
    return out


# frame k of a coded video is one flat colour that spells k: red = CODE0 + CODE_STEP * (k // 8), green = CODE0 +
# CODE_STEP * (k % 8), blue 128. Any crop, flip or resize of a frame keeps its colour, so a decoded clip's frames
# name their own indices (codec and colour-conversion error are a few levels, the step is 28).
CODE0, CODE_STEP, CODED_FRAMES = 24, 28, 64


def coded_frames(n: int = CODED_FRAMES, h: int = 120, w: int = 160) -> np.ndarray:
    k = np.arange(n)
    rgb = np.stack([CODE0 + CODE_STEP * (k // 8), CODE0 + CODE_STEP * (k % 8), np.full(n, 128)], 1)
    return np.broadcast_to(rgb[:, None, None, :], (n, h, w, 3)).astype(np.uint8)


def frame_codes(clip: torch.Tensor) -> list[int]:
    """The frame indices a decoded clip [3, T, S, S] on 0..1 (no colour augmentation, not normalised) shows."""
    r, g = (clip[:2] * 255).mean(dim=(2, 3)).tolist()
    return [8 * round((a - CODE0) / CODE_STEP) + round((b - CODE0) / CODE_STEP) for a, b in zip(r, g)]


@pytest.fixture(scope="session")
def coded_shards(tmp_path_factory) -> Path:
    """Shards of 8 videos (2 classes x 3 train, 1 test) of CODED_FRAMES frames that carry their own index."""
    videos = tmp_path_factory.mktemp("coded_videos")
    for split, n in (("train", 3), ("test", 1)):
        for c in ("a", "b"):
            (videos / split / c).mkdir(parents=True)
            for i in range(n):
                encode(coded_frames(), videos / split / c / f"{c}_{i}.mp4")
    out = tmp_path_factory.mktemp("coded_shards")
    assert preprocess_main([str(videos), str(out), "--name", "coded", "--max-per-shard", "8", "--no-progress"]) == 0
    return out


def index_rows(tar: Path) -> list[dict]:
    """Per sample of a tar's DALI index: {ext: (data offset, size), "__key__": key}, read without the project's parser."""
    rows = []
    for line in fmt.index_path(tar).read_text().splitlines()[1:]:
        f = line.split(" ")
        row = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
        row["__key__"] = fmt.sample_key(f[3])
        rows.append(row)
    return rows


def damage(split: Path) -> set[str]:
    """Three kinds of damage in one shard set (at least two shards); returns the damaged samples' keys:
    1. 4 KB overwritten in the middle of one sample's video (shard 0, sample 1);
    2. the last sample of shard 1 cut short (the copy lost the tar's tail), its index left as it was;
    3. one index line pointing 512 bytes past its video's offset (shard 0, sample 3)."""
    t0, t1 = fmt.shard_paths(split)[:2]
    s0, s1 = index_rows(t0), index_rows(t1)
    off, size = s0[1][fmt.VIDEO_EXT]
    data = bytearray(t0.read_bytes())
    data[off + size // 2: off + size // 2 + 4096] = bytes(4096)
    t0.write_bytes(bytes(data))
    off, size = s1[-1][fmt.VIDEO_EXT]
    with open(t1, "r+b") as f:
        f.truncate(off + size // 2)
    idx = fmt.index_path(t0)
    lines = idx.read_text().splitlines()
    f = lines[1 + 3].split(" ")
    f[f.index(fmt.VIDEO_EXT) + 1] = str(int(f[f.index(fmt.VIDEO_EXT) + 1]) + 512)
    lines[1 + 3] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    return {s0[1]["__key__"], s1[-1]["__key__"], s0[3]["__key__"]}


@pytest.fixture(scope="session")
def damaged_shards(tmp_path_factory, synthetic_shards) -> tuple[Path, set[str]]:
    out = tmp_path_factory.mktemp("damaged") / "shards"
    shutil.copytree(synthetic_shards, out)
    return out, damage(out / "train")


@pytest.fixture(scope="session")
def ucf_mini() -> Path:
    if not (UCF_MINI / "classInd.txt").is_file():
        pytest.skip(f"ucf101-mini not found at {UCF_MINI} (set UCF101_MINI)")
    return UCF_MINI


@pytest.fixture(scope="session")
def ucf_shards(tmp_path_factory, ucf_mini) -> Path:
    out = tmp_path_factory.mktemp("ucf_shards")
    rc = preprocess_main([str(ucf_mini), str(out), "--format", "ucf101", "--shard-size-mb", "8", "--no-progress"])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Toy sizes: one intra-op thread is as fast and does not thrash on a shared machine.
    Opt in per module with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# `pytest -m unit`: the fast subset for the development loop. What it means, test by test: no video rendered,
# encoded or decoded, no subprocess or spawned process group, no full-size network run (the whole subset well under a
# minute on an idle 2-core box); `./run test` stays the full suite. Modules whose every test is such a test are
# listed here (a new pure module opts in here) with the exceptions named one by one; pure tests in other modules
# carry `@pytest.mark.unit` themselves.
UNIT_MODULES = {"test_model_backbones", "test_model_heads", "test_model_queue", "test_model_fima_losses", "test_model_fame",
                "test_model_objectives", "test_multilevel_losses", "test_multilevel_model", "test_evaluate_metrics",
                "test_preprocess_formats"}
NOT_UNIT = {
    "test_model_backbones.py::test_full_size_shapes_and_parameter_counts",       # three backbones at 16x224^2
    "test_model_queue.py::test_two_process_gather_shuffle_and_queue",            # spawns two gloo processes
    "test_multilevel_losses.py::test_two_process_gather_gives_the_single_process_gradient",   # ditto
    "test_multilevel_model.py::test_two_process_ddp_across_split",               # ditto
    "test_model_objectives.py::test_bf16_autocast_matches_fp32",                 # CPU bf16 FIMA: slow kernels
    "test_preprocess_formats.py::test_unlabelled_list_end_to_end",               # renders, encodes, decodes videos
}


VIDEO_FIXTURES = {"sample_videos", "synthetic_shards", "coded_shards", "ucf_mini", "ucf_shards", "damaged_shards"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in UNIT_MODULES and f"{module}.py::{item.originalname}" not in NOT_UNIT:
            item.add_marker(pytest.mark.unit)
        videos = VIDEO_FIXTURES & set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("unit") and videos:   # the rule, checked where it can be: no video fixtures
            raise pytest.UsageError(f"{item.nodeid} is marked unit but uses {sorted(videos)}")
