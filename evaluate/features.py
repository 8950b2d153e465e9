"""The test-protocol loop (every clip of every video once, over all ranks) and the on-disk feature cache.

``test_loop`` runs a function of a clip batch (a frozen backbone's pooled features, a fine-tuned model's logits)
over ``test_clips`` x ``test_crops`` clips per video and returns per-clip rows with label, video index, clip and
crop, gathered from every rank and sorted, with padding units removed.

``extract_features`` caches what ``test_loop`` gives for a frozen backbone in
``CACHE/<key>.pt``, the key being a hash of the backbone's weights, the shard set's manifest and every setting
that changes the features (frames, stride, crop, clips, crops, crop fraction, normalisation, precision). The
linear probe and retrieval share the cache: one extraction serves both.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

from pipeline import eval_loader
from train import distributed as D

from .context import Runtime
from .data import Split, test_config

FEATURE_VERSION = "pooled-mean-v1"     # bump when what a cached feature means changes
# what a cached row holds: the pooled clip feature [C], (temporal) the forward and time-reversed clip's [2C], or
# (kNN's motion-reliance probe) the feature of the clip's middle frame repeated T times: the same scene, no motion
FEATURE_KINDS = ("pooled", "pooled-forward-reversed", "pooled-static")
DEFAULT_CACHE = Path(os.environ.get("EVAL_CACHE", Path.home() / ".cache" / "motionpretrain" / "eval-features"))


def pooled(backbone: nn.Module, kind: str = "pooled"):
    """Clip batch [B,3,T,S,S] -> pooled last feature map [B, C] (global average over T', H', W'); for
    "pooled-forward-reversed" [B, 2C]: the clip's, then the same clip played backwards (time flipped); for
    "pooled-static" [B, C]: the clip's middle frame repeated T times (every frame difference is zero)."""
    def forward(video):
        return backbone(video).float().mean(dim=(2, 3, 4))
    if kind == "pooled":
        return forward
    if kind == "pooled-forward-reversed":
        return lambda video: torch.cat([forward(video), forward(video.flip(2))], dim=1)
    if kind == "pooled-static":
        def static(video):
            T = video.shape[2]
            return forward(video[:, :, T // 2:T // 2 + 1].expand(-1, -1, T, -1, -1).contiguous())  # B x 3 x T x S x S
        return static
    raise ValueError(f"unknown feature kind {kind!r}; choose from {FEATURE_KINDS}")


def test_loop(fn, split: Split, s: dict, rt: Runtime, desc: str = "test") -> tuple[dict[str, torch.Tensor], dict]:
    """Rows {"out" [N, D] float32, "label", "index", "clip", "crop" int64 [N]} sorted by (index, crop, clip), and
    {"seconds", "videos_per_s", "clips_per_s", "undecodable"}: a video that cannot be read or decoded has no rows
    and is listed in "undecodable" (key, index, error; from every rank), never dropped silently."""
    d = rt.d
    per_rank = max(1, s["batch_size"] // d.world_size)
    loader = eval_loader(split.dir, "test", batch_size=per_rank, config=test_config(s),
                         outputs=("video", "label", "index", "clip", "crop"), rank=d.rank, world_size=d.world_size,
                         backend=rt.backend, device_id=d.local_rank if rt.backend == "gpu" else None,
                         num_threads=rt.num_threads)
    rows: dict[str, list] = {k: [] for k in ("out", "label", "index", "clip", "crop")}
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), rt.amp():
            for batch in tqdm(loader, desc=f"{desc} {split.name}", unit="batch", disable=not rt.progress,
                              dynamic_ncols=True, leave=False):
                keep = (batch["index"] >= 0).cpu()
                out = fn(batch["video"]).float().cpu()
                rows["out"].append(out[keep])
                for k in ("label", "index", "clip", "crop"):
                    rows[k].append(batch[k].cpu()[keep])
        if rt.use_cuda:
            torch.cuda.synchronize(d.device)
        bad = [{k: r.get(k) for k in ("key", "index", "error")} for r in loader.bad.values()]
    finally:
        loader.close()
    seconds = time.perf_counter() - t0
    local = {k: torch.cat(v) for k, v in rows.items()}
    if d.enabled:   # every rank gets every row (CPU tensors through the object collective)
        parts = [None] * d.world_size
        dist.all_gather_object(parts, local)
        local = {k: torch.cat([p[k] for p in parts]) for k in local}
        seconds = max(D.mean_over_ranks({"s": seconds}, d)["s"], seconds)
        bad = [r for rank in D.gather_objects(bad, d) for r in rank]
    bad = sorted({r["index"]: r for r in bad}.values(), key=lambda r: r["index"])
    key = (local["index"] * (s.get("test_crops", 1) + 1) + local["crop"]) * (s["test_clips"] + 1) + local["clip"]
    order = torch.argsort(key, stable=True)
    out = {k: v[order] for k, v in local.items()}
    if len(torch.unique(key)) != len(key):
        raise RuntimeError("the test loop saw a clip twice: the loader's rank split is broken")
    seen = set(torch.unique(out["index"]).tolist())
    if len(seen) + len(bad) != split.num_videos or seen & {r["index"] for r in bad}:
        raise RuntimeError(f"the test loop saw {len(seen)} of {split.num_videos} videos ({len(bad)} undecodable)")
    stats = {"seconds": seconds, "videos_per_s": split.num_videos / seconds, "clips_per_s": len(key) / seconds,
             "undecodable": bad}
    return out, stats


@contextlib.contextmanager
def frozen(backbone: nn.Module):
    """The guard of moco's main_lincls: the backbone is frozen and in eval mode, and afterwards every tensor of
    it, BatchNorm running statistics included, is exactly what it was."""
    backbone.eval()
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    yield backbone
    after = backbone.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(v, after[k])]
    assert not changed, f"the frozen backbone changed during evaluation: {changed[:5]}"
    assert not backbone.training, "the frozen backbone left eval mode"


def cache_key(info: dict, split: Split, s: dict, precision: str, kind: str = "pooled") -> tuple[str, dict]:
    feature = FEATURE_VERSION if kind == "pooled" else f"{FEATURE_VERSION}+{kind}"   # old cache keys stay valid
    desc = {"feature": feature, "backbone": info["backbone"], "weights_sha256": info["sha256"],
            "manifest_sha256": split.manifest_sha, "split": split.name, "precision": precision,
            "sampling": test_config(s).to_dict() | {"color_aug": False}}
    desc = json.loads(json.dumps(desc))             # plain JSON values (tuples become lists), as stored
    key = hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]
    return key, desc


def extract_features(backbone: nn.Module, info: dict, split: Split, s: dict, rt: Runtime,
                     cache_dir: Path | None, kind: str = "pooled") -> tuple[dict[str, torch.Tensor], dict]:
    """Pooled clip features (``kind``, see ``pooled``) of ``split`` under the test protocol, from the cache when
    it holds them. Returns (rows as test_loop's, {"cached": bool, "path", "key", and test_loop's timing when
    extracted})."""
    key, desc = cache_key(info, split, s, rt.precision, kind)
    path = Path(cache_dir) / f"{key}.pt" if cache_dir else None
    rows, bad = None, []
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob.get("describe") == desc:
                rows, bad = blob["rows"], blob.get("undecodable", [])
        except Exception as e:   # a truncated or foreign file: extract again and overwrite it
            print(f"warning: ignoring unreadable feature cache {path} ({type(e).__name__}: {str(e)[:100]})")
    if D.any_rank(rows is None, rt.d):   # every rank takes part in the extraction, or none does
        with frozen(backbone):
            rows, stats = test_loop(pooled(backbone, kind), split, s, rt, desc="features")
        if path is not None and rt.d.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            torch.save({"describe": desc, "rows": rows, "undecodable": stats["undecodable"]}, tmp)
            os.replace(tmp, path)
            path.with_suffix(".json").write_text(json.dumps(desc, indent=1))
        return rows, {"cached": False, "path": str(path) if path else None, "key": key, **stats}
    return rows, {"cached": True, "path": str(path), "key": key, "undecodable": bad}


def extract_train_test(ctx, kind: str = "pooled") -> tuple[dict, dict]:
    """Clip features of ctx's backbone on the train and test splits (from the cache when it holds them):
    ({split: rows}, {split: how they were obtained}). Shared by the linear probe, retrieval and temporal."""
    backbone = ctx.backbone.to(ctx.rt.d.device)
    if ctx.rt.use_cuda:
        backbone = backbone.to(memory_format=torch.channels_last_3d)
    rows, how = {}, {}
    for name in ("train", "test"):
        rows[name], how[name] = extract_features(backbone, ctx.info, ctx.splits[name], ctx.settings, ctx.rt,
                                                 ctx.cache_dir, kind)
    return rows, how
