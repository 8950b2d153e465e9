"""Shared fixtures: real videos and real shards, made once per test session.

* `sample_videos`: the project's synthetic motion videos (OUT/{train,test}/<class>/*.mp4), small.
* `synthetic_shards`: those videos sharded by `python -m preprocess` (OUT/train, OUT/test).
* `ucf_shards`: ../shared/data/ucf101-mini sharded with its official split-1 files (skipped when absent).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from preprocess.cli import main as preprocess_main
from preprocess.sample_videos import make_sample_videos

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


# `pytest -m unit`: the fast subset for the development loop (pure tensor maths, formats, metrics; no video decoding,
# no subprocesses); `./run test` stays the full suite. One list, by module, so a new module opts in here.
UNIT_MODULES = {"test_model_backbones", "test_model_heads", "test_model_queue", "test_model_losses", "test_model_fame",
                "test_model_objectives", "test_multilevel_losses", "test_multilevel_model", "test_evaluate_metrics",
                "test_preprocess_formats"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES:
            item.add_marker(pytest.mark.unit)
