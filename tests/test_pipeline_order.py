"""pipeline/: sample order across ranks and epochs, resume, evaluation coverage, GOP trimming, errors."""
from __future__ import annotations

import collections
import io

import av
import numpy as np
import pytest
import torch

from model import OBJECTIVES
from pipeline import AugConfig, CodecError, ShardSet, eval_loader, pretrain_loader
from preprocess.cli import main as preprocess_main

TINY = AugConfig(num_frames=4, crop_size=32)


def epoch_indices(loader) -> list[int]:
    return [i for batch in loader for i in batch["index"].tolist()]


def test_two_ranks_see_each_sample_once(synthetic_shards):
    """World size 2: same step count on both ranks, the union of an epoch is every sample exactly once plus
    the stated padding (repeats), and the next epoch is a different order."""
    train = synthetic_shards / "train"
    n = len(ShardSet(train))
    for batch_size, outputs in ((5, ("index",)), (3, ("raw_m", "index"))):
        ranks = [pretrain_loader(train, outputs, batch_size=batch_size, config=TINY, seed=7, rank=r, world_size=2)
                 for r in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == -(-n // (2 * batch_size))
        orders = []
        for epoch in range(2):
            seen = [epoch_indices(loader) for loader in ranks]
            assert len(seen[0]) == len(seen[1]) == len(ranks[0]) * batch_size     # equal steps, full batches
            counts = collections.Counter(seen[0] + seen[1])
            assert set(counts) == set(range(n))                                    # nothing dropped
            assert sum(counts.values()) - n == ranks[0].padding_per_epoch          # repeats = stated padding
            assert sum(c - 1 for c in counts.values()) == ranks[0].padding_per_epoch
            orders.append(seen[0] + seen[1])
        assert orders[0] != orders[1]                                              # reshuffled per epoch
        assert ranks[0].state_dict()["epoch"] == 2 and ranks[0].stats["padding"] == ranks[0].padding_per_epoch


def test_resume_continues_the_same_stream(synthetic_shards):
    """state_dict() after k batches, load_state_dict() in a new loader (or the same one, mid-epoch) gives the
    same next batches bit for bit: same samples, windows, crops and colours."""
    train = synthetic_shards / "train"
    make = lambda: pretrain_loader(train, OBJECTIVES["fima"].required_inputs, batch_size=2, config=TINY, seed=3)   # noqa: E731
    a = make()
    it = iter(a)
    for _ in range(3):
        next(it)
    state = a.state_dict()
    assert state["epoch"] == 0 and state["step"] == 3
    want = [next(it) for _ in range(3)]
    for loader in (make(), a):
        loader.load_state_dict(state)
        got = [b for _, b in zip(range(3), loader)]
        for w, g in zip(want, got):
            assert w.keys() == g.keys() and all(torch.equal(w[k], g[k]) for k in w)
    # resuming at the end of an epoch continues with the next one
    b = make()
    b.load_state_dict({**state, "step": len(b)})
    assert b.state_dict()["epoch"] == 1 and b.state_dict()["step"] == 0


def test_eval_test_mode_yields_every_clip_once(synthetic_shards):
    """Test mode on 2 ranks: each (video, clip, crop) exactly once, padding marked -1 and counted, clip
    starts uniformly spaced over the video (frame counts from PyAV), labels as in the shards."""
    test = synthetic_shards / "test"
    shards = ShardSet(test)
    cfg = AugConfig(num_frames=4, crop_size=32, test_clips=3, test_crops=3)
    keys = ("video", "label", "index", "clip", "crop", "start")
    ranks = [eval_loader(test, "test", batch_size=4, config=cfg, outputs=keys, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    rows = []
    for loader in ranks:
        for batch in loader:
            assert batch["video"].shape == (4, 3, 4, 32, 32)
            rows += list(zip(*(batch[k].tolist() for k in keys[1:])))
    valid = [r for r in rows if r[1] >= 0]
    assert len(rows) - len(valid) == ranks[0].padding_per_epoch
    assert all(r[:4] == (-1, -1, -1, -1) for r in rows if r[1] < 0)
    triples = collections.Counter((r[1], r[2], r[3]) for r in valid)
    assert len(triples) == len(shards) * 9 and max(triples.values()) == 1
    labels = shards.labels()
    for label, index, clip, crop, start in valid:
        sample = shards.read(index)
        with av.open(io.BytesIO(sample.data.tobytes())) as c:
            nf = sum(1 for _ in c.decode(video=0))
        assert start == int(np.floor(np.linspace(0, max(nf - 8, 0), 3))[clip])
        assert label == labels[index]


def test_eval_train_mode_one_clip_per_video(synthetic_shards):
    train = synthetic_shards / "train"
    loader = eval_loader(train, "train", batch_size=5, config=TINY, outputs=("video", "label", "index"))
    seen = epoch_indices(loader)
    assert set(seen) == set(range(len(ShardSet(train)))) and len(seen) - len(set(seen)) == loader.padding_per_epoch


def test_gop_trimming_is_lossless(ucf_shards):
    """Cutting each video to the GOPs its windows need (the default on both backends) decodes the same pixels as
    handing DALI the whole video."""
    cfg = AugConfig(num_frames=8, crop_size=32, color_aug=False)
    keys = ("raw_m", "raw_n", "index", "start_m", "start_n")
    full, cut = (next(iter(pretrain_loader(ucf_shards / "train", keys, batch_size=3, config=cfg, seed=9, trim=t)))
                 for t in (False, True))
    assert max(full["start_m"].max(), full["start_n"].max()) > 16          # windows past the first GOPs
    assert all(torch.equal(full[k], cut[k]) for k in keys)
    for backend in ("cpu", "gpu"):   # on by default on both (building a loader needs no GPU; running one does)
        loader = pretrain_loader(ucf_shards / "train", keys, batch_size=3, config=cfg, backend=backend, device_id=0)
        assert loader.trim
        loader.close()


def _reference_ivf(data, track, frames):
    """The IVF stream of the kept GOP segments built frame by frame (what pipeline.container.trim_to_ivf did before
    it was vectorised): the bytes the vectorised version must give."""
    import struct
    from pipeline.container import IVF_FOURCC, IVF_HEADER
    n = track.num_samples
    frames = np.clip(frames, 0, n - 1)
    keys = track.keyframes
    first_key = keys[np.maximum(np.searchsorted(keys, frames, side="right") - 1, 0)]
    keep = np.zeros(n, dtype=bool)
    for k, f in zip(first_key, frames):
        keep[min(k, f):f + 1] = True
    kept = np.flatnonzero(keep)
    parts = [IVF_HEADER.pack(b"DKIF", 0, IVF_HEADER.size, IVF_FOURCC[track.codec], track.width, track.height,
                             25, 1, len(kept), 0)]
    raw = np.ascontiguousarray(data, dtype=np.uint8)
    for pts, i in enumerate(kept):
        o, size = int(track.offsets[i]), int(track.sizes[i])
        parts += [struct.pack("<IQ", size, pts), raw[o:o + size].tobytes()]
    return b"".join(parts), np.searchsorted(kept, frames).astype(np.int32)


def test_the_trimmed_stream_is_the_frame_by_frame_one_byte_for_byte(synthetic_shards):
    from pipeline.container import trim_to_ivf
    shards, rng = ShardSet(synthetic_shards / "train"), np.random.default_rng(0)
    for i in range(len(shards)):
        sample = shards.read(i)
        n = sample.track.num_samples
        cases = [np.array([0]), np.array([n - 1]), np.arange(n), np.array([n + 5])]       # past the end: clipped
        cases += [np.unique(rng.integers(0, n, size=rng.integers(1, 80))) for _ in range(10)]
        for frames in cases:
            ivf, at = trim_to_ivf(sample.data, sample.track, frames)
            ref, ref_at = _reference_ivf(sample.data, sample.track, frames)
            assert ivf.dtype == np.uint8 and ivf.tobytes() == ref and at.dtype == np.int32 and np.array_equal(at, ref_at)
    shards.close()


def test_clear_errors(tmp_path, sample_videos):
    moco = OBJECTIVES["moco"].required_inputs
    with pytest.raises(FileNotFoundError, match="python -m preprocess"):
        pretrain_loader(tmp_path / "nope", moco, batch_size=2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shards"):
        pretrain_loader(tmp_path / "empty", moco, batch_size=2)
    with pytest.raises(TypeError, match="required_inputs"):        # the pipeline knows no objective names
        pretrain_loader(tmp_path / "nope", "moco", batch_size=2)
    with pytest.raises(ValueError, match="unknown pretraining outputs"):
        pretrain_loader(sample_videos, ("rgb_m", "rgb_local"), batch_size=2)
    # an H.264 shard set: the CPU backend names the codec and the fix
    src = tmp_path / "src" / "train" / "a"
    src.mkdir(parents=True)
    video = sorted(sample_videos.rglob("*.mp4"))[0]
    (src / video.name).write_bytes(video.read_bytes())
    assert preprocess_main([str(tmp_path / "src"), str(tmp_path / "h264"), "--codec", "h264", "--no-progress"]) == 0
    with pytest.raises(CodecError, match="--codec vp9"):
        pretrain_loader(tmp_path / "h264" / "train", OBJECTIVES["moco"].required_inputs, batch_size=1, config=TINY)


def test_config_errors(synthetic_shards):
    with pytest.raises(ValueError, match="stride 2"):
        pretrain_loader(synthetic_shards / "train", OBJECTIVES["fima"].required_inputs, batch_size=2,
                        config=AugConfig(stride=3))
    with pytest.raises(ValueError, match="frame0"):
        AugConfig(frame0="mirror")
    with pytest.raises(ValueError, match="unknown AugConfig keys"):
        AugConfig.from_dict({"num_frame": 8})
