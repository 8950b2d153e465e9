"""`python -m evaluate temporal`: temporal-order head, its per-position maps, accuracy, images; CPU, real models."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from evaluate.cli import main
from evaluate.temporal import accuracy, position_logits, split_forward_reversed, temporal_maps, train_head
from model import build_backbone, build_objective
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.recipe import objective_kwargs

from test_evaluate import _moving_square_shards

pytestmark = pytest.mark.usefixtures("one_thread")
HEAD = {"optimizer": "adam", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "epochs": 60, "milestones": "40",
        "lr_decay": 0.1, "probe_batch": 16}


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def numpy_accuracy(W: np.ndarray, rows: dict) -> tuple[dict, float]:
    """The temporal-order figures of a bias-free head W [2, C] on cached rows, recomputed with numpy: per clip
    (forward clips must say 0, reversed ones 1) and per video (logits averaged over a video's clips, forward and
    reversed separately). Also the smallest logit margin met, so near-ties (float32 vs float64) can be left out."""
    feats, index = rows["out"].double().numpy(), rows["index"].numpy()
    c = feats.shape[1] // 2
    fwd, rev = feats[:, :c] @ W.T, feats[:, c:] @ W.T
    videos = [np.flatnonzero(index == v) for v in np.unique(index)]
    means = [fwd[i].mean(0) for i in videos] + [rev[i].mean(0) for i in videos]
    pf, pr = fwd.argmax(1) == 0, rev.argmax(1) == 1
    per_video = [m.argmax() == (k >= len(videos)) for k, m in enumerate(means)]
    margin = min(np.abs(np.diff(np.concatenate([fwd, rev, np.stack(means)]), axis=1)).min(), np.inf)
    return {"clip_accuracy": np.concatenate([pf, pr]).mean(), "forward_accuracy": pf.mean(),
            "reversed_accuracy": pr.mean(), "video_accuracy": np.mean(per_video)}, margin


def random_heads_match_numpy(rows: dict, trials: int = 40, seed: int = 0, across_mean: bool = False) -> list[dict]:
    """accuracy() against numpy_accuracy for random bias-free heads on the same rows: heads that are right on some
    clips and wrong on others, where a wrong average shows (a trained head that is right everywhere scores 1.0 by
    any average). across_mean: the heads' two rows are +d and -d with d orthogonal to the mean clip feature.
    Returns the figures of the heads compared."""
    g = torch.Generator().manual_seed(seed)
    c = rows["out"].shape[1] // 2
    mean = rows["out"].double().reshape(-1, 2, c).mean((0, 1))
    seen = []
    for _ in range(trials):
        head = nn.Linear(c, 2, bias=False)
        w = torch.randn(2, c, generator=g)
        if across_mean:
            d = w[0].double() - (w[0].double() @ mean) / (mean @ mean) * mean
            w = torch.stack([d, -d]).float()
        with torch.no_grad():
            head.weight.copy_(w)
        want, margin = numpy_accuracy(head.weight.detach().double().numpy(), rows)
        if margin < 1e-4 * max(1.0, float(rows["out"].abs().max()) * c ** 0.5):
            continue                                        # a near-tie: float32 may break it either way
        assert accuracy(head, rows) == pytest.approx(want, abs=1e-6), want   # float32 means
        seen.append(want)
    assert len(seen) >= trials // 2
    return seen


def test_maps_are_the_head_at_every_position_of_the_real_feature_map():
    torch.manual_seed(0)
    backbone = build_backbone("r3d18_ml").eval()
    head = nn.Linear(512, 2, bias=False)
    video = torch.randn(2, 3, 16, 112, 80)                            # a non-square grid on purpose
    with torch.no_grad():
        fmap = backbone(video)                                        # 2, 512, 2, 4, 3
        logits = position_logits(fmap, head)
        maps = temporal_maps(backbone, head, video)
        rev_fmap = backbone(video.flip(2))
    assert logits.shape == (2, 2) + fmap.shape[2:]
    n, t, h, w = 1, 1, 2, 2                                           # one position, by hand
    assert torch.allclose(logits[n, :, t, h, w], head.weight @ fmap[n, :, t, h, w], atol=1e-4)
    # bias-free and linear: the mean over positions is the pooled classifier's output
    assert torch.allclose(maps["forward_logits"], head(fmap.mean(dim=(2, 3, 4))), atol=1e-4)
    assert torch.allclose(maps["reversed_logits"], head(rev_fmap.mean(dim=(2, 3, 4))), atol=1e-4)
    for name in ("forward", "reversed"):
        m = maps[name]
        assert m.shape == (2, 16, 112, 80)                             # upsampled to the clip
        assert torch.allclose(m.amin(dim=(2, 3)), torch.zeros(2, 16), atol=1e-6)   # min-max per frame
        assert torch.allclose(m.amax(dim=(2, 3)), torch.ones(2, 16), atol=1e-6)
    # the forward map shows class 0's logit, the reversed map class 1's on the reversed clip
    up = torch.nn.functional.interpolate(position_logits(rev_fmap, head)[:, 1:2], size=(16, 112, 80), mode="trilinear")
    up = up[:, 0]
    up = (up - up.amin(dim=(2, 3), keepdim=True)) / (up.amax(dim=(2, 3), keepdim=True) - up.amin(dim=(2, 3), keepdim=True))
    assert torch.allclose(maps["reversed"], up, atol=1e-5)


@pytest.mark.unit
def test_head_learns_order_and_accuracy_counts_forward_and_reversed_clips():
    g = torch.Generator().manual_seed(0)
    n, c = 40, 16
    base = torch.randn(n, c, generator=g).abs() + 1                   # a large shared component, like ReLU features
    base[:, 3] = 0
    order = torch.zeros(c)
    order[3] = 0.5                                                    # the only direction that tells forward from reversed
    rows = {"out": torch.cat([base + order, base - order], dim=1), "index": torch.arange(n) // 4,
            "label": torch.zeros(n, dtype=torch.long)}
    x, y = split_forward_reversed(rows)
    assert torch.equal(x[:n], base + order) and torch.equal(x[n:], base - order)
    assert y.tolist() == [0] * n + [1] * n
    head = train_head(x, y, HEAD, seed=0)
    assert head.bias is None
    again = train_head(x, y, HEAD, seed=0)
    assert torch.equal(head.weight, again.weight)                     # deterministic
    acc = accuracy(head, rows)
    assert acc == {"clip_accuracy": 1.0, "forward_accuracy": 1.0, "reversed_accuracy": 1.0, "video_accuracy": 1.0}
    # a head that always says "forward": half of the clips, all forward ones, no reversed one
    always = nn.Linear(c, 2, bias=False)
    with torch.no_grad():
        always.weight.copy_(torch.stack([torch.ones(c), torch.zeros(c)]))
    acc = accuracy(always, rows)
    assert acc == {"clip_accuracy": 0.5, "forward_accuracy": 1.0, "reversed_accuracy": 0.0, "video_accuracy": 0.5}
    # random heads on clips that differ within a video: every figure as numpy computes it, and the cases where
    # the per-video average differs from per clip, and forward from reversed, do occur
    noisy = {**rows, "out": rows["out"] + torch.randn(n, 2 * c, generator=g)}
    seen = random_heads_match_numpy(noisy)
    assert any(s["video_accuracy"] != s["clip_accuracy"] for s in seen)
    assert any(s["forward_accuracy"] != s["reversed_accuracy"] for s in seen)


def test_temporal_end_to_end_map_differs_between_moving_object_and_static_background(tmp_path):
    """A moving square and an identical static one on a flat background: the temporal map is not the same on both."""
    shards = _moving_square_shards(tmp_path, T=64, b_slower=True)   # clips that differ, within and across videos
    out, S, cols = tmp_path / "temporal", 96, 8
    assert main(["temporal", "--random-init", "--backbone", "r3d18", "--data", str(shards), "--videos", "0",
                 "--crop", str(S), "--tile", str(S), "--frames", "16", "--test-clips", "3", "--epochs", "60",
                 "--lr", "0.01", "--probe-batch", "4", "--grid-frames", str(cols), "--movie", "gif",
                 "--num-threads", "2", "--no-progress", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]) == 0
    r = results(out)
    res = r["result"]
    assert (res["train_clips"], res["test_clips"]) == (6, 6)           # 2 videos x 3 clips per split
    assert (out / "temporal_head.pt").is_file() and list((out / "tb").iterdir())
    head = torch.load(out / "temporal_head.pt", weights_only=True)
    assert head["weight"].shape == (2, 512) and head["backbone"] == "r3d18"
    # every figure recomputed with numpy from the saved head and the cached features of each split: per clip
    # (forward clips must say 0, reversed ones 1), and per video (logits averaged over a video's clips)
    W = head["weight"].double().numpy()
    for split in ("test", "train"):
        rows = torch.load(res["features"][split]["path"], weights_only=True)["rows"]
        feats, index = rows["out"].double().numpy(), rows["index"].numpy()
        fwd, rev = feats[:, :512], feats[:, 512:]
        assert fwd.shape == (6, 512) and not np.allclose(fwd, rev)        # the reversed clip's own features
        assert len(np.unique(index)) == 2
        first = np.flatnonzero(index == index[0])
        assert not np.allclose(fwd[first[0]], fwd[first[1]]) and not np.allclose(fwd[first[0]], fwd[index != index[0]][0])
        assert res[split] == pytest.approx(numpy_accuracy(W, rows)[0], abs=1e-6), split
        # a trained head that is right on every clip scores 1.0 by any average: the same code on the same real
        # features with random heads, which are not, so that a wrong average has to show
        seen = random_heads_match_numpy(rows)
        assert any(s["forward_accuracy"] != s["reversed_accuracy"] for s in seen), split
        # heads whose two rows differ across the clips' mean feature (every clip shares a large positive
        # component) turn on how clips differ: some are right on part of a video, where per video and per clip
        # differ (a video := clip mix-up passes when they never do)
        seen = random_heads_match_numpy(rows, across_mean=True)
        assert any(s["video_accuracy"] != s["clip_accuracy"] for s in seen), split
    assert res["temporal_order_accuracy"] == pytest.approx(res["test"]["clip_accuracy"])
    assert r["scalars"]["temporal_order_accuracy"] == res["temporal_order_accuracy"]

    video = res["videos"][0]
    img = np.asarray(Image.open(video["png"]).convert("RGB")).astype(float)
    assert img.shape == (4 * S, cols * S, 3)               # one clip: frames, forward map, reversed frames, reversed map
    gif = Image.open(video["movie"])
    assert gif.n_frames == 2 * 16                          # forward and reversed clip, every frame
    tiles = lambda row: np.stack([img[row * S:(row + 1) * S, j * S:(j + 1) * S] for j in range(cols)])
    frames, overlay, rev_frames = tiles(0), tiles(1), tiles(2)
    assert np.abs(rev_frames - frames[::-1]).max() <= 1    # the reversed clip is the clip played backwards
    background = np.median(frames, axis=0)
    moving = np.abs(frames - background).mean(-1) > 40                 # where the moving square is in each frame
    static = (frames.mean(-1) > 200) & (np.abs(frames - background).mean(-1) < 5)   # the square that never moves
    assert moving.sum() > 1000 and static.sum() > 1000
    heat = overlay - 0.5 * frames                                       # alpha 0.5: what the map adds
    assert np.abs(heat[moving].mean(0) - heat[static].mean(0)).sum() > 30   # same look, different response
    # the cached features serve a second run: same accuracy, no extraction
    assert main(["temporal", "--random-init", "--backbone", "r3d18", "--data", str(shards), "--videos", "1",
                 "--crop", str(S), "--frames", "16", "--test-clips", "3", "--epochs", "60", "--lr", "0.01",
                 "--probe-batch", "4", "--movie", "none", "--num-threads", "2", "--no-progress",
                 "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "again")]) == 0
    again = results(tmp_path / "again")["result"]
    assert all(h["cached"] for h in again["features"].values())
    assert again["temporal_order_accuracy"] == res["temporal_order_accuracy"]


def test_temporal_reads_a_multilevel_checkpoint(synthetic_shards, tmp_path):
    """Every objective's checkpoint works: here the multi-level model's R3D-18 variant (the query encoder)."""
    cfg = load_config("ucf101_r3d_multilevel", ["data=x", "crop=32", "frames=8", "cluster=8"])
    torch.manual_seed(0)
    model = build_objective(cfg["objective"], **objective_kwargs(cfg))
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints").save({"model": model.state_dict(), "step": 3,
                                                                     "config": cfg}, 3)
    out = tmp_path / "t"
    assert main(["temporal", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--test-clips", "1",
                 "--epochs", "3", "--movie", "none", "--num-threads", "2", "--no-progress", "--no-cache",
                 "--out", str(out)]) == 0
    r = results(out)
    assert r["model"]["backbone"] == "r3d18_ml" and r["model"]["objective"] == "multilevel"
    assert r["settings"]["frames"] == 8 and r["settings"]["crop"] == 32          # from the checkpoint's config
    assert r["result"]["test_clips"] == 12 and len(r["result"]["videos"]) == 6   # first video of each class
    assert all(Path(v["png"]).is_file() for v in r["result"]["videos"])


@pytest.mark.unit
def test_temporal_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["temporal", "--help"])
    text = capsys.readouterr().out
    for flag in ("--map-clips", "--videos", "--epochs", "--probe-batch", "--optimizer", "--cache-dir", "adam"):
        assert flag in text, flag
    with pytest.raises(SystemExit):
        main(["temporal", "--random-init", "--map", "norm"])           # cam's flag, not temporal's
