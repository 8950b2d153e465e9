"""Online quality monitor: weighted-kNN top-1 of the query backbone on a labelled shard set, during pretraining.

`monitor=OUT` (a folder with OUT/train and OUT/test from `python -m preprocess`) makes the trainer measure, every
`monitor_every` steps, how well the frozen query backbone's features classify OUT/test by their nearest OUT/train
videos. The value at step 0 is the random-init network's (the same weights the run starts from): it is logged as
`monitor/knn_top1_random_init` next to every later `monitor/knn_top1`, so TensorBoard shows the reference line.

Features are the pooled last feature map of `monitor_clips` uniformly spaced clips per video (centre crop, no
augmentation), L2-normalised and averaged per video, the same sampling as `python -m evaluate knn` with fewer
clips. Only rank 0 measures (the monitor set is small); the other ranks wait at the next collective.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline import AugConfig, ShardSet, eval_loader


def knn_scores(query, gallery, gallery_labels, num_classes: int, k: int = 20, T: float = 0.07) -> torch.Tensor:
    """Weighted k-nearest-neighbour class scores (Wu et al. 2018, as DINO's eval_knn): features are
    L2-normalised, each query's k most cosine-similar gallery items vote for their class with weight
    exp(sim / T). query [Q, C], gallery [G, C], gallery_labels [G] in [0, num_classes) -> scores float64
    [Q, num_classes] (top-1 = argmax)."""
    q = F.normalize(torch.as_tensor(query).detach().cpu().double(), dim=1)
    g = F.normalize(torch.as_tensor(gallery).detach().cpu().double(), dim=1)
    gl = torch.as_tensor(gallery_labels).detach().cpu().long()
    if len(gl) != len(g):
        raise ValueError(f"{len(g)} gallery features but {len(gl)} labels")
    if k < 1:
        raise ValueError(f"k must be at least 1, not {k}")
    top = torch.topk(q @ g.T, min(k, len(gl)), dim=1)                        # Q x k
    weights = (top.values / T).exp()                                         # Q x k
    scores = torch.zeros(len(q), num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, gl[top.indices], weights)                  # Q x num_classes


def video_features(backbone: nn.Module, loader, amp) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a test-mode loader: per-video mean of L2-normalised pooled clip features [V, C] and labels [V]."""
    feats, labels, index = [], [], []
    with torch.no_grad(), amp:
        for batch in loader:
            keep = (batch["index"] >= 0).cpu()
            feats.append(F.normalize(backbone(batch["video"]).float().mean(dim=(2, 3, 4)), dim=1).cpu()[keep])
            labels.append(batch["label"].cpu()[keep])
            index.append(batch["index"].cpu()[keep])
    feats, labels, index = torch.cat(feats), torch.cat(labels), torch.cat(index)
    videos, inverse = torch.unique(index, return_inverse=True)
    out = torch.zeros(len(videos), feats.shape[1]).index_add_(0, inverse, feats)
    per_video = torch.zeros(len(videos), dtype=torch.long).scatter_(0, inverse, labels)
    return out, per_video


class QualityMonitor:
    """kNN top-1 of a backbone on OUT/test against OUT/train. ``measure(backbone)`` leaves the backbone's mode as
    it found it and changes none of its tensors (eval mode: BatchNorm uses, and does not update, its statistics)."""

    def __init__(self, data: str | Path, *, frames: int, stride: int, crop: int, clips: int = 1, k: int = 20,
                 T: float = 0.07, batch_size: int = 8, backend: str = "cpu", device_id: int | None = None,
                 num_threads: int | None = None):
        root = Path(data)
        missing = [s for s in ("train", "test") if not (root / s / "manifest.json").is_file()]
        if missing:
            raise FileNotFoundError(f"monitor={data}: no {' and '.join(missing)} shard set(s) there; give a folder "
                                    "holding train/ and test/ of a labelled `python -m preprocess SRC OUT` run")
        top_label, listed = 0, 0
        for split in ("train", "test"):
            shards = ShardSet(root / split)
            labels = shards.labels()
            shards.close()
            if (labels < 0).any():
                raise ValueError(f"monitor={data}: {split} has {int((labels < 0).sum())} unlabelled videos; the "
                                 "monitor needs a labelled shard set")
            top_label = max(top_label, int(labels.max()))
            listed = max(listed, len(shards.manifest.get("classes") or []))
        self.classes = max(listed, top_label + 1)   # the class list, or the labels when a manifest lists none
        self.k, self.T = k, T
        cfg = AugConfig(num_frames=frames, stride=stride, crop_size=crop, color_aug=False, blur_p=0.0, flip_p=0.0,
                        test_clips=clips)
        self.loaders = {s: eval_loader(root / s, "test", batch_size=batch_size, config=cfg,
                                       outputs=("video", "label", "index"), backend=backend, device_id=device_id,
                                       num_threads=num_threads) for s in ("train", "test")}

    def measure(self, backbone: nn.Module, amp) -> dict[str, float]:
        was_training = backbone.training
        backbone.eval()
        try:
            (g, gl), (q, ql) = (video_features(backbone, self.loaders[s], amp) for s in ("train", "test"))
        finally:
            backbone.train(was_training)
        scores = knn_scores(q, g, gl, self.classes, self.k, self.T)
        return {"monitor/knn_top1": float((scores.argmax(1) == ql).double().mean())}

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()
