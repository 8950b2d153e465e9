"""pipeline/: what the DALI CPU backend produces, checked against independent computations.

PyAV decodes the same shard bytes (the reference decoder); crops are re-taken from the emitted boxes with
torch, differences and colour maps recomputed with numpy/torch formulas. Clips are small (T=8, S=64).
"""
from __future__ import annotations

import io
import math

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CODED_FRAMES, frame_codes
from model import OBJECTIVES
from pipeline import AugConfig, ShardSet, pretrain_loader

CODEC_TOL = 2.5   # mean |DALI - PyAV| on 0..255 (different YUV->RGB conversion; dali-facts measured ~1.3)
SMALL = dict(num_frames=8, crop_size=64)


def pyav_frames(sample) -> np.ndarray:
    """All frames of a shard sample, decoded by PyAV: uint8 [N, H, W, 3]."""
    with av.open(io.BytesIO(sample.data.tobytes())) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def box_to_crop(box, H, W):
    """(i, j, h, w, mirrored) of a crop box (x1, y1, x2, y2) in the reference's normalised convention."""
    x1, y1, x2, y2 = box.tolist()
    j = round(min(x1, x2) * (W - 1))
    i = round(y1 * (H - 1))
    w = round(max(x1, x2) * (W - 1)) - j + 1
    h = round(y2 * (H - 1)) - i + 1
    return i, j, h, w, x1 > x2


def crop_reference(frames: np.ndarray, crop, size: int) -> torch.Tensor:
    """frames uint8 [T, H, W, 3] -> cropped, resized (bilinear), mirrored float [3, T, S, S] on 0..255."""
    i, j, h, w, mirrored = crop
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()[:, :, i:i + h, j:j + w]
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    return (x.flip(-1) if mirrored else x).permute(1, 0, 2, 3)


def unnormalise(x: torch.Tensor, cfg: AugConfig) -> torch.Tensor:
    """[B, 3, T, S, S] normalised -> the [0, 1] values before normalisation."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1, 1)
    return x * std + mean


def diff_formula(x: torch.Tensor, frame0: str = "wrap") -> torch.Tensor:
    """D_t = (X_t - X_{t-1} + 1) / 2 over the T axis (dim -3) of a [0, 1] clip; frame 0 wraps or is zero."""
    prev = torch.roll(x, 1, dims=-3)
    if frame0 == "zero":
        prev[..., 0, :, :] = x[..., 0, :, :]
    return (x - prev + 1) / 2


def first_batch(loader):
    return next(iter(loader))


@pytest.fixture(scope="module")
def syn_train(synthetic_shards):
    return synthetic_shards / "train"


@pytest.fixture(scope="module")
def ucf_train(ucf_shards):
    return ucf_shards / "train"


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
@pytest.mark.parametrize("dataset", ["syn_train", "ucf_train"])
def test_windows_and_boxes_match_pyav(request, dataset, flip_p):
    """The decoded windows are PyAV's frames at start + stride*k, cropped exactly where box_m/box_n say
    (mirrored boxes included), and the batch has the contracted shapes, dtypes and memory format."""
    shard_dir = request.getfixturevalue(dataset)
    cfg = AugConfig(**SMALL, color_aug=False, antialias=False, flip_p=flip_p)
    keys = ("raw_m", "raw_n", "box_m", "box_n", "frame_hw", "index", "start_m", "start_n")
    batch = first_batch(pretrain_loader(shard_dir, keys, batch_size=3, config=cfg, seed=3))
    assert batch["raw_m"].shape == (3, 3, 8, 64, 64) and batch["raw_m"].dtype == torch.float32
    assert batch["raw_m"].is_contiguous(memory_format=torch.channels_last_3d)
    assert batch["box_m"].shape == (3, 4) and batch["frame_hw"].shape == (3, 2)
    shards = ShardSet(shard_dir)
    for s in range(3):
        sample = shards.read(int(batch["index"][s]))
        frames = pyav_frames(sample)
        H, W = batch["frame_hw"][s].tolist()
        assert (H, W) == frames.shape[1:3]
        for c in "mn":
            idx = np.clip(int(batch[f"start_{c}"][s]) + 2 * np.arange(8), 0, len(frames) - 1)
            crop = box_to_crop(batch[f"box_{c}"][s], int(H), int(W))
            assert crop[4] == bool(flip_p)                      # x1 > x2 exactly when mirrored
            ref = crop_reference(frames[idx], crop, 64)
            got = batch[f"raw_{c}"][s] * 255
            err = (got - ref).abs().mean().item()
            assert err < CODEC_TOL, f"sample {s} window {c}: mean abs diff {err:.2f}"
            if dataset == "ucf_train":                          # rich content: the other mirror image is far off
                assert (got - ref.flip(-1)).abs().mean().item() > err + 2


@pytest.mark.parametrize("flip_p", [0.0, 1.0])
def test_windows_are_the_frames_at_start_plus_stride_k(coded_shards, flip_p):
    """On videos whose every frame shows its own index (conftest `coded_frames`): frame k of window m / n is
    frame start + 2k, clamped at the last frame, for every sample, both windows, mirrored or not. (The PyAV
    comparison above cannot tell neighbouring frames apart on slowly moving content.)"""
    cfg = AugConfig(**SMALL, color_aug=False, antialias=False, flip_p=flip_p)
    starts = set()
    for seed in (3, 4):
        batch = first_batch(pretrain_loader(coded_shards / "train", ("raw_m", "raw_n", "start_m", "start_n"),
                                            batch_size=3, config=cfg, seed=seed))
        for s in range(3):
            for c in "mn":
                start = int(batch[f"start_{c}"][s])
                starts.add(start)
                want = np.minimum(start + 2 * np.arange(8), CODED_FRAMES - 1).tolist()
                assert frame_codes(batch[f"raw_{c}"][s]) == want, (seed, s, c)
    assert len(starts) >= 4                                       # windows drawn all over the video


def test_difference_clips_match_formula(syn_train):
    """diff_m is the numpy formula on the emitted RGB crop (exactly), and every difference clip matches the
    formula on PyAV's frames cropped by its box; frame-0 rules "wrap", "zero" and "prev"."""
    keys = ("raw_m", "diff_m", "diff_m1", "diff_m2", "diff_n2", "box_m1", "box_m2", "box_n2", "frame_hw", "index",
            "start_m", "start_n")
    shards = ShardSet(syn_train)
    for frame0 in ("wrap", "zero", "prev"):
        cfg = AugConfig(**SMALL, color_aug=False, antialias=False, frame0=frame0)
        batch = first_batch(pretrain_loader(syn_train, keys, batch_size=2, config=cfg, seed=5))
        if frame0 != "prev":
            exact = diff_formula(batch["raw_m"], frame0)
            assert torch.allclose(unnormalise(batch["diff_m"], cfg), exact, atol=1e-5)
        if frame0 == "zero":
            assert torch.allclose(unnormalise(batch["diff_m1"], cfg)[:, :, 0], torch.tensor(0.5), atol=1e-5)
        for s in range(2):
            frames = pyav_frames(shards.read(int(batch["index"][s]))).astype(np.float32) / 255
            H, W = (int(v) for v in batch["frame_hw"][s].tolist())
            for key, c, first in (("diff_m1", "m", 0), ("diff_m2", "m", 8), ("diff_n2", "n", 8)):
                start = int(batch[f"start_{c}"][s]) + first
                idx = np.clip(start + np.arange(-1, 8), 0, len(frames) - 1)     # predecessor + the clip
                crop = box_to_crop(batch[f"box_{c}{key[-1]}"][s], H, W)
                ref = crop_reference(frames[idx], crop, 64)                        # [3, 9, S, S] in [0, 1]
                clip = ref[:, 1:]
                if frame0 == "prev":
                    want = (clip - ref[:, :-1] + 1) / 2
                else:
                    want = diff_formula(clip, frame0)
                got = unnormalise(batch[key][s:s + 1], cfg)[0]
                err = (got - want).abs().mean().item() * 255
                assert err < CODEC_TOL, f"{frame0} {key} sample {s}: mean abs diff {err:.2f} (0..255 scale)"


def test_colour_shared_over_frames_differs_across_views_and_samples(syn_train):
    """A 64-frame video under an 80-frame window: the window is edge-padded (counted, never black), so the
    tail frames of every clip are the same decoded frame. With the full colour augmentation (jitter,
    grayscale, blur) they must stay identical (parameters shared over frames), while the constant 0.5 tails
    of the difference clips come out different per view and per sample (independent parameters)."""
    cfg = AugConfig(num_frames=40, crop_size=32, antialias=False)
    keys = ("raw_m", "rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m2", "diff_n2", "index", "frame_hw", "box_m")
    loader = pretrain_loader(syn_train, keys, batch_size=4, config=cfg, seed=11)
    batch = first_batch(loader)
    assert loader.stats["short"] >= 4 and loader.stats["same_window"] >= 4
    tails = {"rgb_m": 32, "rgb_n": 32, "raw_m": 32, "diff_m": 33, "diff_n": 33, "diff_m2": 24, "diff_n2": 24}
    for key, t0 in tails.items():
        x = batch[key]
        assert torch.equal(x[:, :, t0:], x[:, :, t0:t0 + 1].expand_as(x[:, :, t0:])), key
        assert not torch.equal(x[:, :, 0], x[:, :, t0]), key     # the rest of the clip does move
    # the padded frames are the last real frame (edge padding), not black
    shards = ShardSet(syn_train)
    for s in range(4):
        frames = pyav_frames(shards.read(int(batch["index"][s])))
        H, W = (int(v) for v in batch["frame_hw"][s].tolist())
        ref = crop_reference(frames[-1:], box_to_crop(batch["box_m"][s], H, W), 32)[:, 0]
        got = batch["raw_m"][s, :, -1] * 255
        assert (got - ref).abs().mean().item() < CODEC_TOL and ref.mean() > 5
    values = [tuple(np.round(unnormalise(batch[k], cfg)[s, :, -1].mean((-1, -2)).numpy(), 4))
              for k in ("diff_m", "diff_n", "diff_m2", "diff_n2") for s in range(4)]
    assert len(set(values)) >= 12, values      # 16 clips; only un-jittered ones (p 0.2) may coincide


def test_normalisation_and_colour_maps(syn_train):
    """Normalisation uses the configured mean/std; grayscale gives R=G=B (luma); a fixed brightness factor
    scales and clamps; a fixed blur equals a torch Gaussian; on both the RGB and the difference clips."""
    keys = ("raw_m", "rgb_m", "diff_m")
    base = dict(SMALL, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    cfg = AugConfig(**base, color_aug=False)
    b = first_batch(pretrain_loader(syn_train, keys, batch_size=2, config=cfg, seed=1))
    raw = b["raw_m"]
    assert torch.allclose(unnormalise(b["rgb_m"], cfg), raw, atol=1e-5)
    assert torch.allclose(unnormalise(b["diff_m"], cfg), diff_formula(raw), atol=1e-5)
    expect_mean = (raw.mean((0, 2, 3, 4)) - torch.tensor(cfg.mean)) / torch.tensor(cfg.std)
    assert torch.allclose(b["rgb_m"].mean((0, 2, 3, 4)), expect_mean, atol=1e-4)

    off = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    cases = {
        "gray": (dict(off, grayscale_p=1.0), None),
        "bright": (dict(off, jitter_p=1.0, brightness=(1.25, 1.25), contrast=(1, 1), saturation=(1, 1), hue=0.0),
                   lambda x: (1.25 * x).clamp(0, 1)),
        "blur": (dict(off, blur_p=1.0, blur_sigma=(1.5, 1.5)), "blur"),
    }
    for name, (kw, want_fn) in cases.items():
        cfg = AugConfig(**base, **kw)
        b = first_batch(pretrain_loader(syn_train, keys, batch_size=2, config=cfg, seed=1))
        assert torch.equal(b["raw_m"], raw)                    # same crops: colour draws never move the crops
        for key, clean in (("rgb_m", raw), ("diff_m", diff_formula(raw))):
            got = unnormalise(b[key], cfg)
            if name == "gray":
                assert (got - got.mean(1, keepdim=True)).abs().max() < 2e-3, key
                luma = (clean * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1, 1)).sum(1)
                assert (got[:, 0] - luma).abs().mean() < 2 / 255, key
            elif name == "bright":
                assert (got - want_fn(clean)).abs().max() < 1.5 / 255, key
            else:
                radius = (min(cfg.kernel, 2 * math.ceil(3 * 1.5) + 1) - 1) // 2     # the window the loader uses
                g = torch.exp(-torch.arange(-radius, radius + 1.0) ** 2 / (2 * 1.5 ** 2))
                g = g / g.sum()
                x = clean.permute(0, 2, 1, 3, 4).reshape(-1, 1, 64, 64)
                x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1))
                want = x.reshape(2, 8, 3, 64 - 2 * radius, 64 - 2 * radius).permute(0, 2, 1, 3, 4)
                inner = got[..., radius:-radius, radius:-radius]
                assert (inner - want).abs().max() < 2e-3, key


def test_objective_output_sets(syn_train):
    """FIMA, MoCo and FAME (their required_inputs) get exactly those keys; every clip is [B,3,T,S,S] float32
    channels_last_3d."""
    cfg = AugConfig(num_frames=4, crop_size=32)
    expect = {"fima": {"rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2", "box_m", "box_n"},
              "moco": {"rgb_m", "rgb_n"}, "fame": {"raw_m", "rgb_n"}}
    for objective, keys in expect.items():
        assert set(OBJECTIVES[objective].required_inputs) == keys
        batch = first_batch(pretrain_loader(syn_train, OBJECTIVES[objective].required_inputs, batch_size=2, config=cfg))
        assert set(batch) == keys
        for k, v in batch.items():
            if k.startswith("box"):
                assert v.shape == (2, 4) and v.dtype == torch.float32
            else:
                assert v.shape == (2, 3, 4, 32, 32) and v.dtype == torch.float32
                assert v.is_contiguous(memory_format=torch.channels_last_3d) and torch.isfinite(v).all()
    raw = first_batch(pretrain_loader(syn_train, OBJECTIVES["fame"].required_inputs, batch_size=2,
                                      config=cfg))["raw_m"]
    assert raw.min() >= 0 and raw.max() <= 1
