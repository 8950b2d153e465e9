"""Benchmark: the linear probe's / retrieval's feature extraction against the fine-tune test loop, same run.

    python benchmarks/evaluate.py --shards OUT/test [--backbone i3d] [--frames 16] [--crop 224] [--clips 10]
    python benchmarks/evaluate.py            # demo_out/shards/test, or synthetic shards made in a temp folder

Both passes run the test protocol (``--clips`` uniform clips x centre crop per video, every video once)
through the same DALI loader and backbone: extraction keeps the pooled features (what the feature cache
stores), the fine-tune test loop adds dropout + linear and the per-video averaging of scores. After an
untimed warm-up pass, the two alternate ``--repeats`` times and each keeps its best time. Also measured: the
backbone alone on fixed random clips (the ceiling without input cost) and reading the features back from the
cache (what a second linear-probe or retrieval run pays). Prints one JSON line. Defaults are small on a CPU
(48 px, 2 clips), the protocol's on a GPU (224 px, 10 clips).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluate import metrics                                       # noqa: E402
from evaluate.backbone import load_backbone                        # noqa: E402
from evaluate.context import make_runtime                          # noqa: E402
from evaluate.data import open_split                               # noqa: E402
from evaluate.features import extract_features, frozen, pooled, test_loop   # noqa: E402
from evaluate.finetune import FineTuner                            # noqa: E402
from benchmarks._common import sample_shards                       # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a labelled shard set (default: demo_out/shards/test or synthetic)")
    p.add_argument("--checkpoint", help="a checkpoint (default: a random-init --backbone; speed does not depend on it)")
    p.add_argument("--backbone", default="i3d")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--crop", type=int, default=224 if cuda else 48)
    p.add_argument("--clips", type=int, default=10 if cuda else 2, help="test clips per video")
    p.add_argument("--batch", type=int, default=32 if cuda else 8, help="clips per forward batch")
    p.add_argument("--backend", default="auto", choices=("auto", "gpu", "cpu"))
    p.add_argument("--num-threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed passes of each (alternating); the best is kept")
    a = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        shards = a.shards or (REPO / "demo_out/shards/test" if (REPO / "demo_out/shards/test/manifest.json").is_file()
                              else sample_shards(Path(tmp), train_per_class=1, test_per_class=4) / "test")
        rt = make_runtime(a.backend, "auto", a.num_threads, progress=False)
        split = open_split("test", Path(shards))
        backbone, info = load_backbone(a.checkpoint, a.backbone, random_init=not a.checkpoint)
        backbone = backbone.to(rt.d.device)
        if rt.use_cuda:
            backbone = backbone.to(memory_format=torch.channels_last_3d)
        s = {"frames": a.frames, "stride": a.stride, "crop": a.crop, "test_clips": a.clips, "test_crops": 1,
             "test_crop_fraction": 0.875, "batch_size": a.batch}
        head = FineTuner(backbone, len(split.classes), 0.5).to(rt.d.device).eval()

        def finetune_test():
            rows, _ = test_loop(head, split, s, rt, desc="finetune test")
            _, scores, labels = metrics.average_per_video(rows["out"], rows["index"], "softmax", rows["label"])
            metrics.topk_accuracy(scores, labels, (1, 5))

        with frozen(backbone):
            test_loop(pooled(backbone), split, s, rt, desc="warm-up")
            best = {"extract": float("inf"), "finetune": float("inf")}
            for _ in range(a.repeats):               # alternate the two, keep each one's best time
                for name, fn in (("extract", lambda: test_loop(pooled(backbone), split, s, rt, desc="extract")),
                                 ("finetune", finetune_test)):
                    t0 = time.perf_counter()
                    fn()
                    best[name] = min(best[name], time.perf_counter() - t0)

            x = torch.randn(a.batch, 3, a.frames, a.crop, a.crop, device=rt.d.device)
            if rt.use_cuda:
                x = x.to(memory_format=torch.channels_last_3d)
            with torch.no_grad(), rt.amp():
                backbone(x)
                if rt.use_cuda:
                    torch.cuda.synchronize()
                t0, reps = time.perf_counter(), 3
                for _ in range(reps):
                    backbone(x)
                if rt.use_cuda:
                    torch.cuda.synchronize()
            model_only = reps * a.batch / (time.perf_counter() - t0)

            cache = Path(tmp) / "cache"
            extract_features(backbone, info, split, s, rt, cache)          # writes the cache (a third pass)
            t0 = time.perf_counter()
            _, hit = extract_features(backbone, info, split, s, rt, cache)
            cache_read = time.perf_counter() - t0
            assert hit["cached"]

    print(json.dumps({
        "benchmark": "evaluate", "device": torch.cuda.get_device_name() if rt.use_cuda else "cpu",
        "dali_backend": rt.backend, "precision": rt.precision, "backbone": a.backbone, "frames": a.frames,
        "crop": a.crop, "clips_per_video": a.clips, "batch": a.batch, "videos": split.num_videos,
        "extract_videos_per_s": round(split.num_videos / best["extract"], 3),
        "finetune_test_videos_per_s": round(split.num_videos / best["finetune"], 3),
        "extract_over_finetune_test": round(best["finetune"] / best["extract"], 3),
        "extract_clips_per_s": round(split.num_videos * a.clips / best["extract"], 2),
        "model_only_clips_per_s": round(model_only, 2),
        "cache_read_s": round(cache_read, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
