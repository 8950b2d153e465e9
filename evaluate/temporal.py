"""Temporal activation maps and temporal-order accuracy (the multi-level paper's visualisation, for any backbone).

How much does a frozen backbone know about the direction of time, and where does it see it?

1. Features: every clip of the train and test splits (``test_clips`` uniform windows x centre crop, no
   augmentation), pooled last-layer features of the clip and of the same clip played backwards (cached, like the
   linear probe's).
2. Head: a bias-free ``Linear(C, 2)`` trained to call forward clips 0 and reversed ones 1 (Adam 1e-3, wd 1e-3,
   50 epochs, x0.1 at 30, batch 256: the reference's values). Bias-free and linear, so applying it at every
   position of the last feature map and averaging gives exactly the pooled logits: the map is the classifier's
   own evidence, position by position.
3. Temporal-order accuracy: the head on the test split, forward and reversed clips (0.5 = chance: no order).
4. Maps: for a few videos, the head's logit of the clip's true class (forward: class 0, reversed: class 1) at
   every position of the last feature map [T', H', W'], upsampled trilinearly to T x S x S, min-max normalised
   per frame (as the reference) and overlaid in jet. Per video ``<index>-<key>.png``: per clip four rows
   (forward frames, forward map, reversed frames, reversed map) and a movie of the same.

Differences from the reference (``visualization/main_temporal.py``): the head trains on cached features of
fixed clips (uniform windows, centre crop) instead of re-running the frozen backbone on augmented crops every
epoch: deterministic and 50x cheaper, at the cost of no crop/flip/jitter diversity; the maps work for any input
size and grid, not only 16 x 224^2.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .backbone import EvalError
from .cam import add_images, jet, motion_focus, save_pictures, select_videos, video_clips
from .context import Context
from .features import extract_train_test
from .linear import fit_on_features
from .report import pct, write_results

FORWARD, REVERSED = 0, 1


def split_forward_reversed(rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached "pooled-forward-reversed" rows -> features [2N, C] (forward clips, then reversed) and labels [2N]."""
    fwd, rev = rows["out"].chunk(2, dim=1)
    x = torch.cat([fwd, rev])
    y = torch.cat([torch.full((len(fwd),), FORWARD), torch.full((len(rev),), REVERSED)])
    return x, y


def train_head(x: torch.Tensor, y: torch.Tensor, s: dict, seed: int, log=None) -> nn.Linear:
    """A bias-free Linear(C, 2) on pooled features; deterministic for given features and seed."""
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], 2, bias=False)
    if s.get("optimizer", "adam") == "adam":
        opt = torch.optim.Adam(head.parameters(), lr=s["lr"], weight_decay=s["weight_decay"])
    else:
        opt = torch.optim.SGD(head.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    return fit_on_features(head, opt, x, y, s, seed, log, prefix="temporal", full_batches=False)


def position_logits(fmap: torch.Tensor, head: nn.Linear) -> torch.Tensor:
    """The head at every position: last feature map [N, C, T', H', W'] -> logits [N, 2, T', H', W'].
    Their mean over positions equals head(pooled feature), the head being linear and bias-free."""
    return torch.einsum("nc...,kc->nk...", fmap.float(), head.weight.float())


def temporal_maps(backbone: nn.Module, head: nn.Linear, video: torch.Tensor) -> dict[str, torch.Tensor]:
    """Clip batch [N,3,T,S,S] -> {"forward", "reversed"}: maps [N,T,S,S] in [0,1] of the true class's logit (class
    0 for the clip, class 1 for the clip played backwards, whose frames are in reversed order), min-max per
    frame; and {"forward_logits", "reversed_logits"} [N, 2] (pooled)."""
    out = {}
    for name, clip, cls in (("forward", video, FORWARD), ("reversed", video.flip(2), REVERSED)):
        logits = position_logits(backbone(clip), head)                       # N, 2, T', H', W'
        out[f"{name}_logits"] = logits.mean(dim=(2, 3, 4))
        m = F.interpolate(logits[:, cls:cls + 1], size=video.shape[2:], mode="trilinear",
                          align_corners=False)[:, 0]                          # N, T, S, S
        lo = m.amin(dim=(2, 3), keepdim=True)
        hi = m.amax(dim=(2, 3), keepdim=True)
        out[name] = (m - lo) / (hi - lo).clamp_min(1e-8)
    return out


def accuracy(head: nn.Linear, rows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Temporal-order accuracy on cached rows: per clip (forward and reversed each count), and per video (logits
    averaged over a video's clips, forward and reversed separately)."""
    x, y = split_forward_reversed(rows)
    with torch.no_grad():
        logits = head(x)
    n = len(rows["out"])
    index = torch.cat([rows["index"], rows["index"]])
    out = {"clip_accuracy": float((logits.argmax(1) == y).float().mean()),
           "forward_accuracy": float((logits[:n].argmax(1) == FORWARD).float().mean()),
           "reversed_accuracy": float((logits[n:].argmax(1) == REVERSED).float().mean())}
    correct = []
    for part, cls in ((slice(0, n), FORWARD), (slice(n, 2 * n), REVERSED)):
        _, scores = metrics.average_per_video(logits[part], index[part], "logits")
        correct.append(scores.argmax(1) == cls)
    out["video_accuracy"] = float(torch.cat(correct).float().mean())
    return out


def draw_maps(ctx: Context, head: nn.Linear) -> list[dict]:
    """PNG grid and movie per selected video; returns one dict per video for results.json."""
    rt, extra = ctx.rt, ctx.extra
    split = ctx.splits[extra.get("split", "test")]
    indices = select_videos(split, extra.get("videos") or [])
    clips = extra.get("map_clips", 1)
    if clips < 1:
        raise EvalError(f"--map-clips {clips}: must be at least 1")
    backbone = ctx.backbone.to(rt.d.device).eval()
    head = head.to(rt.d.device)
    alpha = extra.get("alpha", 0.5)
    videos = []
    for idx, batch, frames in video_clips(ctx, split, indices, clips):
        with torch.no_grad(), rt.amp():
            maps = temporal_maps(backbone, head, batch["video"])
        fwd_map, rev_map = maps["forward"].float().cpu().numpy(), maps["reversed"].float().cpu().numpy()
        # per clip: forward frames / forward map, reversed frames / reversed map (write_grid: 2 rows per entry)
        shown = np.stack([frames, frames[:, ::-1]], 1).reshape(-1, *frames.shape[1:])
        heat = np.stack([fwd_map, rev_map], 1).reshape(-1, *fwd_map.shape[1:])
        files = save_pictures(ctx, split, idx, shown, (1 - alpha) * shown + alpha * jet(heat))
        p_fwd = maps["forward_logits"].float().softmax(1)[:, FORWARD].cpu()
        p_rev = maps["reversed_logits"].float().softmax(1)[:, REVERSED].cpu()
        focus = [motion_focus(frames[c], fwd_map[c]) for c in range(clips)]
        valid = [f for f in focus if f is not None]
        label = int(batch["label"][0])
        videos.append({"index": idx, "label": label,
                       "class": split.classes[label] if 0 <= label < len(split.classes) else None,
                       "starts": batch["start"].tolist(), **files,
                       "p_forward_given_forward": p_fwd.tolist(), "p_reversed_given_reversed": p_rev.tolist(),
                       "motion_focus": float(np.mean(valid)) if valid else None})
    return videos


def run(ctx: Context) -> int:
    s, rt = ctx.settings, ctx.rt
    feats, how = extract_train_test(ctx, kind="pooled-forward-reversed")
    if not rt.d.is_main:
        return 0
    ctx.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(ctx.out / "tb")) as w:
        def log(epoch, scalars):
            for k, v in scalars.items():
                w.add_scalar(k, v, epoch)
        head = train_head(*split_forward_reversed(feats["train"]), s, s["seed"], log)
    train_seconds = time.perf_counter() - t0
    torch.save({"weight": head.weight.detach().cpu(), "backbone": ctx.info["backbone"],
                "weights_sha256": ctx.info["sha256"]}, ctx.out / "temporal_head.pt")
    test, train = accuracy(head, feats["test"]), accuracy(head, feats["train"])
    videos = draw_maps(ctx, head)
    focus = [v["motion_focus"] for v in videos if v["motion_focus"] is not None]
    result = {"temporal_order_accuracy": test["clip_accuracy"], "test": test, "train": train,
              "train_clips": len(feats["train"]["out"]), "test_clips": len(feats["test"]["out"]),
              "head_seconds": train_seconds, "videos": videos,
              "motion_focus_mean": float(np.mean(focus)) if focus else None, "out_dir": str(ctx.out),
              "features": how}
    add_images(ctx, videos, "temporal")
    scalars = {"temporal_order_accuracy": test["clip_accuracy"], "video_accuracy": test["video_accuracy"],
               "train_accuracy": train["clip_accuracy"], "motion_focus_mean": result["motion_focus_mean"]}
    rows = [("temporal-order accuracy, test clips (%)", pct(test["clip_accuracy"])),
            ("  forward clips (%)", pct(test["forward_accuracy"])),
            ("  reversed clips (%)", pct(test["reversed_accuracy"])),
            ("per video, logits averaged (%)", pct(test["video_accuracy"])),
            ("train clips (%)", pct(train["clip_accuracy"])),
            ("maps' motion focus (mean)", "n/a" if not focus else f"{np.mean(focus):.2f}"),
            ("head training (s)", f"{train_seconds:.1f}")]
    title = ctx.title("temporal order", "forward vs time-reversed clips, bias-free linear head on pooled features, "
                      f"{s['test_clips']} clips per video (chance 50 %); maps in {ctx.out}")
    write_results(ctx.out, "temporal", {**ctx.describe(), "result": result}, scalars, rows, title, step=s["epochs"])
    return 0
