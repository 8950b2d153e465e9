"""Weighted k-nearest-neighbour classification on frozen features (Wu et al. 2018; DINO's eval_knn).

Video feature = mean of the L2-normalised pooled clip features (``test_clips`` uniform windows x centre crop,
the cache linear and retrieval use); each test video's ``knn_k`` most cosine-similar train videos vote for their
class with weight exp(cosine / ``knn_temperature``). No training, no hyper-parameter fitted on the test split:
the probe that shows what the features hold as they are, next to the linear probe, which can re-weight them.

Motion-reliance probe (``motion_probe=yes``, the default): the same vote for test clips whose frames are all the
clip's middle frame (features.pooled "pooled-static"; the train videos stay as they are). A representation of
scene alone loses nothing; one that needs motion drops. Reported as ``top1_static`` and ``motion_drop`` =
top1 - top1_static (points of top-1 lost when the motion is taken away).
"""
from __future__ import annotations

from . import metrics
from .context import Context
from .features import extract_features, extract_train_test
from .report import pct, write_results

TABLE_KS = (1, 5, 20, 50)     # top-1 at these k as well, for the table and results.json


def run(ctx: Context) -> int:
    s, rt = ctx.settings, ctx.rt
    rows, how = extract_train_test(ctx)
    probe_motion = s.get("motion_probe", "no") == "yes"
    if probe_motion:   # every rank takes part in the extraction
        static, how["test_static"] = extract_features(ctx.backbone.to(rt.d.device), ctx.info, ctx.splits["test"], s,
                                                      rt, ctx.cache_dir, "pooled-static")
    if not rt.d.is_main:
        return 0
    num_classes = len(ctx.splits["train"].classes)
    vid = {}
    for name, r in rows.items():
        _, feats, labels = metrics.video_features(r["out"], r["index"], r["label"])
        vid[name] = (feats, labels)
    (g, gl), (q, ql) = vid["train"], vid["test"]
    k, T = s["knn_k"], s["knn_temperature"]
    top = metrics.topk_accuracy(metrics.knn_scores(q, g, gl, num_classes, k, T), ql, (1, 5))
    by_k = {kk: metrics.topk_accuracy(metrics.knn_scores(q, g, gl, num_classes, kk, T), ql, (1,))[1]
            for kk in TABLE_KS}
    chance = float(max((gl == c).double().mean() for c in range(num_classes)))   # the majority-class rate
    result = {"top1": top[1], "top5": top[5], "k": k, "temperature": T, "top1_by_k": by_k, "majority_rate": chance,
              "test_videos": len(ql), "train_videos": len(gl), "features": how}
    scalars = {"top1": top[1], "top5": top[5]} | {f"top1_k{kk}": v for kk, v in by_k.items()}
    table = [("top-1 (%)", pct(top[1])), ("top-5 (%)", pct(top[5]))]
    if probe_motion:
        _, qs, qsl = metrics.video_features(static["out"], static["index"], static["label"])
        top_static = metrics.topk_accuracy(metrics.knn_scores(qs, g, gl, num_classes, k, T), qsl, (1,))[1]
        result |= {"top1_static": top_static, "motion_drop": top[1] - top_static}
        scalars |= {"top1_static": top_static, "motion_drop": top[1] - top_static}
        table += [("top-1, test clips without motion (%)", pct(top_static)),
                  ("motion drop (points)", pct(top[1] - top_static))]
    table += [(f"top-1 at k={kk} (%)", pct(v)) for kk, v in by_k.items() if kk != k]
    table += [("majority class (%)", pct(chance)), ("test / train videos", f"{len(ql)} / {len(gl)}")]
    title = ctx.title("kNN", f"k={k}, T={T}, test videos vote by train videos, {s['test_clips']} clips per video",
                      how)
    write_results(ctx.out, "knn", {**ctx.describe(), "result": result}, scalars, table, title)
    return 0
