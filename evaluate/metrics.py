"""The numbers every protocol reports, as pure functions of score matrices (tested against hand-made ones).

* ``average_per_video(scores, index, how)``: clip scores [N, K] -> one row per video (softmax or logits averaged).
* ``topk_accuracy(scores, labels, ks)``: a video counts for top-k when fewer than k classes score strictly
  higher than its true class (ties count in its favour, so the result never depends on sort order).
* ``video_features(feats, index)``: per-video feature = mean of the L2-normalised clip features.
* ``knn_scores(query, gallery, gallery_labels, num_classes, k, T)``: weighted kNN votes per class (train/monitor.py).
* ``recall_at_k(sim, query_labels, gallery_labels, ks)``: a query is a hit at k when any of its k most
  similar gallery items has its class (the field's "R@k", a hit rate; ties broken by gallery order).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from train.monitor import knn_scores  # noqa: F401  (one definition, shared with the training monitor)

AVERAGES = ("softmax", "logits")


def _t(x, dtype=None) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype).detach().cpu()


def average_per_video(scores, index, how: str = "softmax", labels=None):
    """Average clip rows per video.

    scores [N, K] (logits), index [N] (video number of each clip; rows with index < 0 are padding and
    dropped), how "softmax" (mean of per-clip softmax) or "logits" (mean of raw logits, the FAME/FIMA code).
    Returns (videos int64 [V] sorted, averaged float64 [V, K]) and, when ``labels`` [N] is given, the
    per-video labels int64 [V] as a third item (an error if one video's clips disagree)."""
    if how not in AVERAGES:
        raise ValueError(f"average {how!r}: choose one of {AVERAGES}")
    scores, index = _t(scores, torch.float64), _t(index, torch.int64)
    if scores.dim() != 2 or index.shape != scores.shape[:1]:
        raise ValueError(f"scores {tuple(scores.shape)} and index {tuple(index.shape)} do not match ([N, K], [N])")
    keep = index >= 0
    scores, index = scores[keep], index[keep]
    if how == "softmax":
        scores = scores.softmax(dim=1)
    videos, inverse = torch.unique(index, sorted=True, return_inverse=True)
    sums = torch.zeros(len(videos), scores.shape[1], dtype=torch.float64).index_add_(0, inverse, scores)
    counts = torch.bincount(inverse, minlength=len(videos)).to(torch.float64)
    out = (videos, sums / counts[:, None])
    if labels is None:
        return out
    labels = _t(labels, torch.int64)[keep]
    per_video = torch.full((len(videos),), -1, dtype=torch.int64).scatter_(0, inverse, labels)
    if not torch.equal(per_video[inverse], labels):
        raise ValueError("clips of one video carry different labels")
    return (*out, per_video)


def topk_accuracy(scores, labels, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of rows whose true class is within the top k, for each k (k above the class count counts
    every row). scores [V, K], labels int [V] in [0, K)."""
    scores, labels = _t(scores, torch.float64), _t(labels, torch.int64)
    if len(scores) == 0:
        raise ValueError("no rows to score")
    if labels.min() < 0 or labels.max() >= scores.shape[1]:
        raise ValueError(f"labels outside [0, {scores.shape[1]}): {sorted(set(labels.tolist()))[:10]}")
    true = scores.gather(1, labels[:, None])                       # V x 1
    rank = (scores > true).sum(dim=1)                              # classes strictly better than the truth
    return {int(k): float((rank < k).double().mean()) for k in ks}


def video_features(feats, index, labels=None):
    """Per-video features: mean of the L2-normalised clip features. Returns (videos [V], feats float64 [V, C])
    and, with ``labels``, the per-video labels (as average_per_video)."""
    feats = F.normalize(_t(feats, torch.float64), dim=1)
    return average_per_video(feats, index, how="logits", labels=labels)


def cosine_similarity_matrix(query, gallery, center: bool = False) -> torch.Tensor:
    """[Q, G] cosine similarities; ``center`` first subtracts each set's own mean (the CoCLR/FAME variant)."""
    q, g = _t(query, torch.float64), _t(gallery, torch.float64)
    if center:
        q, g = q - q.mean(0, keepdim=True), g - g.mean(0, keepdim=True)
    return F.normalize(q, dim=1) @ F.normalize(g, dim=1).T


def recall_at_k(sim, query_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10, 20, 50)) -> dict[int, float]:
    """R@k: the fraction of queries with at least one same-class item among their k most similar gallery
    items (k above the gallery size uses the whole gallery). sim [Q, G], labels [Q] and [G]."""
    sim = _t(sim, torch.float64)
    ql, gl = _t(query_labels, torch.int64), _t(gallery_labels, torch.int64)
    if sim.shape != (len(ql), len(gl)):
        raise ValueError(f"similarity {tuple(sim.shape)} does not match {len(ql)} queries x {len(gl)} gallery items")
    order = torch.sort(sim, dim=1, descending=True, stable=True).indices     # Q x G, best first
    match = gl[order] == ql[:, None]                                         # Q x G
    first_hit = torch.where(match.any(1), match.int().argmax(1), torch.full_like(ql, len(gl)))
    return {int(k): float((first_hit < k).double().mean()) for k in ks}

