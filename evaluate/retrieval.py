"""Nearest-neighbour video retrieval: test videos query the train gallery.

Video feature = mean of the L2-normalised pooled clip features (``test_clips`` uniform windows x centre crop,
the same cached features as the linear probe); similarity = cosine; R@k = fraction of queries with a
same-class video among their k nearest gallery videos. Reported twice: plain cosine, and after subtracting each
split's own mean feature (CoCLR / FAME); ``--center`` picks the headline.
"""
from __future__ import annotations

import torch

from . import metrics
from .context import Context
from .features import extract_train_test
from .protocols import parse_ints
from .report import pct, write_results


def run(ctx: Context) -> int:
    s, rt = ctx.settings, ctx.rt
    rows, how = extract_train_test(ctx)
    if not rt.d.is_main:
        return 0
    ks = parse_ints(s["ks"])
    vid = {}
    for name, r in rows.items():
        _, feats, labels = metrics.video_features(r["out"], r["index"], r["label"])
        vid[name] = (feats, labels)
    (g, gl), (q, ql) = vid["train"], vid["test"]
    recall = {}
    for variant, center in (("plain", False), ("centered", True)):
        sim = metrics.cosine_similarity_matrix(q, g, center=center)
        recall[variant] = metrics.recall_at_k(sim, ql, gl, ks)
    headline = "centered" if str(s["center"]).lower() in ("yes", "true", "1") else "plain"
    chance = {k: _chance(gl, ql, k) for k in ks}
    result = {"recall": recall[headline], "similarity": headline, "recall_plain": recall["plain"],
              "recall_centered": recall["centered"], "chance": chance, "queries": len(ql), "gallery": len(gl),
              "features": how}
    other = "plain" if headline == "centered" else "centered"
    scalars = {f"R@{k}": v for k, v in recall[headline].items()} | {f"R@{k}_{other}": v for k, v in recall[other].items()}
    table = [(f"R@{k} (%)", pct(recall[headline][k])) for k in ks]
    table += [(f"R@{k} {other} (%)", pct(recall[other][k])) for k in ks[:2]]
    table += [(f"R@{k} chance (%)", pct(chance[k])) for k in ks[:1]]
    table += [("queries / gallery", f"{len(ql)} / {len(gl)}")]
    title = ctx.title("retrieval", f"test queries x train gallery, {headline} cosine, {s['test_clips']} clips per "
                      "video", how)
    write_results(ctx.out, "retrieval", {**ctx.describe(), "result": result}, scalars, table, title)
    return 0


def _chance(gallery_labels: torch.Tensor, query_labels: torch.Tensor, k: int) -> float:
    """Expected R@k of a random ranking: 1 - P(no same-class item among k draws without replacement)."""
    n = len(gallery_labels)
    k = min(k, n)
    out = 0.0
    for c in query_labels.tolist():
        same = int((gallery_labels == c).sum())
        p_miss = 1.0
        for i in range(k):
            p_miss *= max(n - same - i, 0) / (n - i)
        out += 1 - p_miss
    return out / len(query_labels)
