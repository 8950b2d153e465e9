"""Linear probe: frozen backbone (eval mode), clip features extracted once and cached, a linear layer trained on them.

Train samples are the train split's clips under the test sampling (``test_clips`` uniform windows x centre
crop, no augmentation: deterministic, so they cache), each clip one sample. The head is L2-normalise ->
BatchNorm1d without affine parameters -> Linear (the notes' recommendation after CoCLR), so exactly two tensors
train (``fc.weight``, ``fc.bias``), which is asserted, as moco's main_lincls does. The test averages the
per-clip softmax (or logits) per video over the test split's clips; the result is the last epoch's.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import metrics
from .context import Context
from .features import extract_train_test
from .protocols import parse_ints
from .report import pct, write_results


class LinearProbe(nn.Module):
    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(in_dim, affine=False)
        self.fc = nn.Linear(in_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:      # [B, C] pooled features -> [B, K] logits
        return self.fc(self.bn(F.normalize(x, dim=1)))


def fit_on_features(head: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor, labels: torch.Tensor, s: dict,
                    seed: int, log=None, prefix: str = "probe", full_batches: bool = True) -> nn.Module:
    """Cross-entropy training of ``head`` on cached features: ``s["epochs"]`` epochs of batches of
    ``s["probe_batch"]`` in a seeded permutation per epoch, lr x ``lr_decay`` at each of ``milestones``.
    ``full_batches``: drop the last partial batch (BatchNorm needs more than one sample). Deterministic for given
    features and seed; logs ``<prefix>/loss``, ``<prefix>/train_clip_top1`` and ``<prefix>/lr`` per epoch."""
    milestones = parse_ints(s["milestones"])
    g = torch.Generator().manual_seed(seed)
    n, bs = len(feats), min(s["probe_batch"], len(feats))
    starts = range(0, max(n - bs, 0) + 1, bs) if full_batches else range(0, n, bs)
    head.train()
    for epoch in range(s["epochs"]):
        lr = s["lr"] * s["lr_decay"] ** sum(epoch >= m for m in milestones)
        for group in opt.param_groups:
            group["lr"] = lr
        perm = torch.randperm(n, generator=g)
        total, correct, seen = 0.0, 0, 0
        for i in starts:
            idx = perm[i:i + bs]
            logits = head(feats[idx])
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == labels[idx]).sum())
            seen += len(idx)
        if log is not None:
            log(epoch + 1, {f"{prefix}/loss": total / seen, f"{prefix}/train_clip_top1": correct / seen,
                            f"{prefix}/lr": lr})
    return head.eval()


def train_probe(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, s: dict, seed: int,
                log=None) -> LinearProbe:
    """SGD on cached features, step lr decay per epoch; deterministic for given features and seed."""
    torch.manual_seed(seed)
    head = LinearProbe(feats.shape[1], num_classes)
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    assert trainable == ["fc.weight", "fc.bias"], f"only the linear layer may train, found {trainable}"
    opt = torch.optim.SGD(head.parameters(), lr=s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    return fit_on_features(head, opt, feats, labels, s, seed, log)


def run(ctx: Context) -> int:
    s, rt = ctx.settings, ctx.rt
    num_classes = len(ctx.splits["train"].classes)
    feats, how = extract_train_test(ctx)
    if not rt.d.is_main:
        return 0
    t0 = time.perf_counter()
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(ctx.out / "tb")) as w:
        def log(epoch, scalars):
            for k, v in scalars.items():
                w.add_scalar(k, v, epoch)
        tr = feats["train"]
        head = train_probe(tr["out"], tr["label"], num_classes, s, s["seed"], log)
    train_seconds = time.perf_counter() - t0

    with torch.no_grad():
        te = feats["test"]
        logits = head(te["out"])
        videos, scores, labels = metrics.average_per_video(logits, te["index"], s["average"], te["label"])
        top = metrics.topk_accuracy(scores, labels, (1, 5))
        clip_top1 = metrics.topk_accuracy(logits, te["label"], (1,))[1]
        _, tr_scores, tr_labels = metrics.average_per_video(head(tr["out"]), tr["index"], s["average"], tr["label"])
        train_top1 = metrics.topk_accuracy(tr_scores, tr_labels, (1,))[1]
    per_video = len(te["index"]) // len(videos)
    result = {"top1": top[1], "top5": top[5], "clip_top1": clip_top1, "train_top1": train_top1,
              "test_videos": len(videos), "clips_per_video": per_video, "average": s["average"],
              "epoch": s["epochs"], "probe_seconds": train_seconds,
              "features": {n: {k: v for k, v in h.items()} for n, h in how.items()}}
    extraction = [h for h in how.values() if not h["cached"]]
    scalars = {"top1": top[1], "top5": top[5], "clip_top1": clip_top1, "train_top1": train_top1}
    if extraction:
        scalars["extract_videos_per_s"] = sum(h["videos_per_s"] for h in extraction) / len(extraction)
    rows = [("top-1 (%)", pct(top[1])), ("top-5 (%)", pct(top[5])),
            ("single-clip top-1 (%)", pct(clip_top1)), ("train top-1 (%)", pct(train_top1)),
            ("test videos", str(len(videos))), ("clips per video", str(per_video)),
            ("probe training (s)", f"{train_seconds:.1f}")]
    title = ctx.title("linear probe", f"{ctx.settings['protocol']} protocol, {s['test_clips']} clips x "
                      f"{s.get('test_crops', 1)} crop(s) per video, {s['average']} averaged", how)
    write_results(ctx.out, "linear", {**ctx.describe(), "result": result}, scalars, rows, title, step=s["epochs"])
    return 0
