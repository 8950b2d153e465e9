"""pipeline/multilevel.py: the index rule, and what the DALI CPU backend produces for clips A, B and G checked
against PyAV frames at independently computed indices, cropped where the emitted boxes say. Small clips
(T = 8, so 16 indices; 32-40 px)."""
from __future__ import annotations

import io

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CODED_FRAMES, frame_codes
from model import MultiLevel
from pipeline import MULTILEVEL_OUTPUTS, AugConfig, ShardSet, pretrain_loader
from pipeline.multilevel import clip_frames, draw_step_and_start, multilevel_indices

CODEC_TOL = 2.5   # mean |DALI - PyAV| on 0..255 (as in test_pipeline_views.py)
T = 8


def pyav_frames(sample) -> np.ndarray:
    with av.open(io.BytesIO(sample.data.tobytes())) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def box_to_crop(box, H, W):
    """(i, j, h, w, mirrored) of a crop box (x1, y1, x2, y2) in the normalised convention, x1 > x2 = mirrored."""
    x1, y1, x2, y2 = box.tolist()
    j, i = round(min(x1, x2) * (W - 1)), round(y1 * (H - 1))
    return i, j, round(y2 * (H - 1)) - i + 1, round(max(x1, x2) * (W - 1)) - j + 1, x1 > x2


def crop_reference(frames: np.ndarray, crop, size: int) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> cropped, bilinear-resized, mirrored float [3, T, S, S] on 0..255."""
    i, j, h, w, mirrored = crop
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[:, :, i:i + h, j:j + w]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x.flip(-1) if mirrored else x).permute(1, 0, 2, 3)


def formula(F_: int, step: float, start: int, count: int = 2 * T) -> list[int]:
    """The reference's rule, written independently: min(F - 1, round-half-even(start + step * k))."""
    return [min(F_ - 1, round(start + step * k)) for k in range(count)]


@pytest.fixture(scope="module")
def syn_train(synthetic_shards):
    return synthetic_shards / "train"


# --- the index rule --------------------------------------------------------------------------------

@pytest.mark.parametrize("F_,step,start", [(64, 1.0, 0), (64, 1.5, 3), (100, 2.7, 11), (64, 2.5, 1), (20, 1.0, 0),
                                          (33, 1.9, 2)])
@pytest.mark.unit
def test_indices_and_clips_follow_the_formula(F_, step, start):
    """Given a video length and the drawn step/start: the 2T indices are the formula's (half-to-even rounding,
    clamped: never past the last frame), A the first T, B the next T, G every second of all 2T = A||B at
    half the rate."""
    idx = multilevel_indices(F_, step, start, 2 * T)
    assert idx.tolist() == formula(F_, step, start) and idx.max() <= F_ - 1
    parts = clip_frames(idx)
    assert parts["a"].tolist() == idx[:T].tolist() and parts["b"].tolist() == idx[T:].tolist()
    assert parts["g"].tolist() == idx[0::2].tolist() == parts["a"][::2].tolist() + parts["b"][::2].tolist()
    assert all(len(p) == T for p in parts.values())


@pytest.mark.unit
def test_step_and_start_draws():
    """r ~ U[1, min(3, F / 2T)] and s ~ U{0 .. int(F - 2T r)}: all 2T indices fit without clamping when the
    video is long enough; shorter videos get r = 1, s = 0 and edge padding."""
    rng = np.random.default_rng(0)
    for F_ in (16, 20, 32, 47, 64, 300):
        steps = []
        for _ in range(200):
            r, s = draw_step_and_start(rng, F_, 2 * T, (1.0, 3.0))
            assert 1.0 <= r <= max(1.0, min(3.0, F_ / (2 * T))) and 0 <= s <= max(int(F_ - 2 * T * r), 0)
            idx = multilevel_indices(F_, r, s, 2 * T)
            assert idx.max() <= F_ - 1 and np.all(np.diff(idx) >= 0)
            if F_ >= 2 * T:
                assert idx.tolist() == [round(s + r * k) for k in range(2 * T)]   # nothing clamped
            steps.append(r)
        if F_ >= 6 * T:
            assert min(steps) < 1.3 and max(steps) > 2.7                          # the whole range is used
    r, s = draw_step_and_start(rng, 10, 2 * T, (1.0, 3.0))
    assert (r, s) == (1.0, 0) and multilevel_indices(10, r, s, 2 * T).tolist() == [*range(10)] + [9] * 6


# --- the loader ------------------------------------------------------------------------------------

def test_clips_match_pyav_at_the_formula_frames(syn_train):
    """raw_a / raw_b / raw_g are PyAV's frames at the formula's indices (recomputed from ml_step/ml_start),
    cropped exactly where box_a / box_b / box_g say; every clip has its own crop and flip."""
    cfg = AugConfig(num_frames=T, crop_size=32, color_aug=False, antialias=False)
    keys = ("raw_a", "raw_b", "raw_g", "box_a", "box_b", "box_g", "frame_hw", "ml_frames", "ml_step", "ml_start",
            "index")
    batch = next(iter(pretrain_loader(syn_train, keys, batch_size=4, config=cfg, seed=2)))
    assert batch["raw_a"].shape == (4, 3, T, 32, 32) and batch["ml_frames"].shape == (4, 2 * T)
    assert batch["raw_g"].is_contiguous(memory_format=torch.channels_last_3d)
    shards = ShardSet(syn_train)
    boxes, flips = set(), []
    for s in range(4):
        frames = pyav_frames(shards.read(int(batch["index"][s])))
        H, W = (int(v) for v in batch["frame_hw"][s].tolist())
        idx = formula(len(frames), float(batch["ml_step"][s]), int(batch["ml_start"][s]))
        assert batch["ml_frames"][s].tolist() == idx
        assert 1.0 <= float(batch["ml_step"][s]) <= min(3.0, len(frames) / (2 * T))
        for c, want_idx in (("a", idx[:T]), ("b", idx[T:]), ("g", idx[::2])):
            crop = box_to_crop(batch[f"box_{c}"][s], H, W)
            ref = crop_reference(frames[want_idx], crop, 32)
            got = batch[f"raw_{c}"][s] * 255
            err = (got - ref).abs().mean().item()
            assert err < CODEC_TOL, f"sample {s} clip {c}: mean abs diff {err:.2f}"
            boxes.add(tuple(np.round(batch[f"box_{c}"][s].numpy(), 5)))
            flips.append(crop[4])
    assert len(boxes) == 12                  # 4 videos x 3 clips: 12 different crops
    assert 0 < sum(flips) < 12               # flips drawn per clip (p 0.5)


def test_clips_are_the_frames_at_the_formula_indices(coded_shards):
    """On videos whose every frame shows its own index (conftest `coded_frames`): raw_a / raw_b / raw_g are exactly
    the frames the formula names for the drawn step and start (A the first T, B the next T, G every second)."""
    cfg = AugConfig(num_frames=T, crop_size=32, color_aug=False, antialias=False)
    keys = ("raw_a", "raw_b", "raw_g", "ml_frames", "ml_step", "ml_start")
    steps = []
    for seed in (2, 3):
        batch = next(iter(pretrain_loader(coded_shards / "train", keys, batch_size=3, config=cfg, seed=seed)))
        for s in range(3):
            idx = formula(CODED_FRAMES, float(batch["ml_step"][s]), int(batch["ml_start"][s]))
            assert batch["ml_frames"][s].tolist() == idx
            for c, want in (("a", idx[:T]), ("b", idx[T:]), ("g", idx[::2])):
                assert frame_codes(batch[f"raw_{c}"][s]) == want, (seed, s, c)
            steps.append(float(batch["ml_step"][s]))
    assert max(steps) > 1.5 and len(set(steps)) == len(steps)     # non-integer steps: rounding is exercised


def test_output_sets_and_subsets(syn_train):
    """"multilevel" gives exactly clip_a/b/g, [B,3,T,S,S] float32 channels_last_3d; asking for fewer keys
    never changes the others (every draw is made for all clips); the same seed gives the same batch."""
    assert MultiLevel.required_inputs == MULTILEVEL_OUTPUTS == ("clip_a", "clip_b", "clip_g")
    cfg = AugConfig(num_frames=T, crop_size=32)
    full = next(iter(pretrain_loader(syn_train, MULTILEVEL_OUTPUTS, batch_size=2, config=cfg, seed=4)))
    assert set(full) == set(MULTILEVEL_OUTPUTS)
    for v in full.values():
        assert v.shape == (2, 3, T, 32, 32) and v.dtype == torch.float32 and torch.isfinite(v).all()
        assert v.is_contiguous(memory_format=torch.channels_last_3d)
    assert not torch.equal(full["clip_a"], full["clip_b"])
    only_g = next(iter(pretrain_loader(syn_train, ("clip_g", "index"), batch_size=2, config=cfg, seed=4)))
    assert torch.equal(only_g["clip_g"], full["clip_g"])
    with pytest.raises(ValueError):
        pretrain_loader(syn_train, ("clip_a", "rgb_m"), batch_size=2, config=cfg)   # two view families
    with pytest.raises(ValueError):
        pretrain_loader(syn_train, MULTILEVEL_OUTPUTS, batch_size=2, config=AugConfig(num_frames=T, ml_rate=(2.0, 1.0)))


def test_colour_clip_consistent_by_default_per_frame_as_a_switch(syn_train):
    """T = 40 on 64-frame videos: r = 1, so clip B ends in 16 copies of the last frame. Clip-consistent colour
    keeps those output frames identical; per_frame_colour draws jitter and grey per frame, so they differ
    (while raw_b, which has no colour augmentation, stays constant there in both modes)."""
    base = dict(num_frames=40, crop_size=32, antialias=False, grayscale_p=0.5, jitter_p=1.0, blur_p=0.0,
                brightness=(0.5, 1.5), contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=0.25)
    tails = {}
    for per_frame in (False, True):
        cfg = AugConfig(**base, per_frame_colour=per_frame)
        batch = next(iter(pretrain_loader(syn_train, ("clip_b", "raw_b", "ml_frames"), batch_size=2, config=cfg,
                                          seed=6)))
        assert (batch["ml_frames"][:, -17:] == 63).all()           # edge padding: the last frame repeats
        raw, clip = batch["raw_b"][:, :, -16:], batch["clip_b"][:, :, -16:]
        assert torch.equal(raw, raw[:, :, :1].expand_as(raw))
        tails[per_frame] = clip
    same = tails[False]
    assert torch.equal(same, same[:, :, :1].expand_as(same))
    per_frame = tails[True]
    frame_means = per_frame.mean(dim=(1, 3, 4))                     # B x 16: one value per output frame
    assert all(len(set(np.round(row.numpy(), 4))) >= 12 for row in frame_means)
