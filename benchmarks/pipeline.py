"""Benchmark: the DALI pipeline's pretraining batches against a plain PyAV + torch DataLoader of the same views.

    python benchmarks/pipeline.py --shards OUT/train [--objective fima] [--batch 8] [--frames 16] [--crop 224]
    python benchmarks/pipeline.py                       # shards ../shared/data/ucf101-mini (else the synthetic
                                                        # sample) into a temp folder

Both sides produce the same batch (two windows per video; per window the global clip and, for FIMA, the two
local halves; random-resized crop and flip per view; frame differences; colour twist, grayscale, blur and
normalisation per clip) on the same cores: the baseline is a torch DataLoader with one worker per core
that seeks with PyAV, decodes both windows and does the maths in torch. Prints one JSON line:
videos/s, batches/s and clips/s of each, and the ratio. With --backend gpu (on a GPU machine) the
pipeline side runs on the GPU and also reports decoded frames/s and, when pynvml is importable, the mean
NVDEC utilisation during the timed steps.

    python benchmarks/pipeline.py --feed [--shards OUT/train] [--videos 400] [--profile]

`--feed` times only the host-side feed, the work the loader's feeding threads do per sample before DALI
(`VideoLoader._feed_at` then `_columns`: read, integrity checks, random draws, GOP trimming, the columns), in one
thread, with trimming on against trimming off (the baseline). Without --shards it makes Kinetics-like samples
(10 s at 25 fps = 250 frames, 456x256 rendered, sharded at short side 256, VP9 GOP 16) with the project's own
sample generator and encoder, a handful of videos fed over and over. Prints one JSON line: videos/s of one
feeding thread by the wall clock and by the thread's CPU time (the one to read on a loaded machine), and the
ratio; `--profile` also prints the top functions by own time (cProfile) of the trimmed feed to stderr.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import AugConfig, ShardSet, pretrain_loader              # noqa: E402
from pipeline import sampling                                         # noqa: E402
from model import OBJECTIVES                                          # noqa: E402
from benchmarks._common import sample_shards                          # noqa: E402

UCF_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "ucf101-mini"


# ------------------------------------------------------------------------------------------ baseline
def _decode_window(container, stream, pts: list[int], start: int, count: int) -> np.ndarray:
    """Frames start..start+count-1 (edge-padded past the end) as uint8 [count, H, W, 3]: seek with PyAV to
    the keyframe before ``start`` and decode forward. ``pts`` is the sorted presentation times (frame i)."""
    index_of = {p: i for i, p in enumerate(pts)}
    idx = sampling.clamp_frames(np.arange(start, start + count), len(pts))
    container.seek(pts[idx[0]], stream=stream, backward=True, any_frame=False)
    out = {}
    for frame in container.decode(stream):
        i = index_of.get(frame.pts, -1)
        if i >= idx[0]:
            out[i] = frame.to_ndarray(format="rgb24")
        if i >= idx[-1]:
            break
    return np.stack([out[i] for i in idx])


def _colour_matrix(s: float, hue_deg: float) -> torch.Tensor:
    """Saturation and hue as one 3x3 RGB matrix (a scaled rotation of the YIQ chroma plane)."""
    rgb2yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.321], [0.211, -0.523, 0.311]])
    h = math.radians(hue_deg)
    rot = torch.tensor([[1, 0, 0], [0, s * math.cos(h), -s * math.sin(h)], [0, s * math.sin(h), s * math.cos(h)]])
    return torch.linalg.inv(rgb2yiq) @ rot @ rgb2yiq


class BaselineViews(torch.utils.data.Dataset):
    """The same views as the pipeline, done the straightforward way (PyAV + torch), one video per item."""

    def __init__(self, shard_dir, outputs, cfg: AugConfig, seed: int):
        self.shards, self.outputs, self.cfg, self.seed = ShardSet(shard_dir), outputs, cfg, seed

    def __len__(self):
        return len(self.shards)

    def _view(self, frames: np.ndarray, rng) -> torch.Tensor:           # -> [3, T, S, S] in [0, 1]
        H, W = frames.shape[1:3]
        i, j, h, w = sampling.random_resized_crop(rng, H, W, self.cfg.crop_area, self.cfg.crop_aspect)
        x = torch.from_numpy(frames[:, i:i + h, j:j + w]).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(self.cfg.crop_size,) * 2, mode="bilinear", align_corners=False, antialias=True)
        if rng.random() < self.cfg.flip_p:
            x = x.flip(-1)
        return x.permute(1, 0, 2, 3)

    def _colour(self, x: torch.Tensor, rng) -> torch.Tensor:            # [3, T, S, S] in [0, 1] -> normalised
        b, c, s, hue, blur, sigma, window = sampling.colour_params(rng, self.cfg).tolist()
        x = torch.einsum("ij,jthw->ithw", _colour_matrix(s, hue), x)
        x = (((x - 0.5) * c + 0.5) * b).clamp(0, 1)
        if blur:
            r = int(window) // 2
            g = torch.exp(-torch.arange(-r, r + 1.0) ** 2 / (2 * sigma ** 2))
            g = (g / g.sum()).to(x.dtype)
            y = x.reshape(-1, 1, *x.shape[-2:])
            y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="reflect"), g.view(1, 1, 1, -1))
            y = F.conv2d(F.pad(y, (0, 0, r, r), mode="reflect"), g.view(1, 1, -1, 1))
            x = y.reshape(x.shape)
        mean = torch.tensor(self.cfg.mean).view(3, 1, 1, 1)
        std = torch.tensor(self.cfg.std).view(3, 1, 1, 1)
        return (x - mean) / std

    def __getitem__(self, index: int) -> dict:
        import av
        rng = np.random.default_rng([self.seed, index])
        sample = self.shards.read(index)
        T, st = self.cfg.num_frames, self.cfg.stride
        starts = sampling.window_starts(rng, sample.num_frames, T * st, 2)
        out = {}
        with av.open(io.BytesIO(sample.data.tobytes())) as container:
            stream = container.streams.video[0]
            pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
            for c, start in zip("mn", starts):
                window = _decode_window(container, stream, pts, int(start), T * st)
                views = {"": window[::st]}
                if f"diff_{c}1" in self.outputs:
                    views.update({"1": window[:T], "2": window[T:]})
                for part, frames in views.items():
                    x = self._view(frames, rng)
                    if part == "" and f"rgb_{c}" in self.outputs:
                        out[f"rgb_{c}"] = self._colour(x, rng)
                    if part == "" and f"raw_{c}" in self.outputs:
                        out[f"raw_{c}"] = x
                    if f"diff_{c}{part}" in self.outputs:
                        out[f"diff_{c}{part}"] = self._colour((x - torch.roll(x, 1, dims=1) + 1) / 2, rng)
        return out


# ------------------------------------------------------------------------------------------ timing
def _time(batches, steps: int, warmup: int, on_gpu: bool) -> float:
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    if on_gpu:
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        next(it)
    if on_gpu:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _endless(loader):
    while True:
        yield from loader


def _nvdec_sampler():
    """Mean NVDEC utilisation (%) over a timed region, via pynvml when it is installed."""
    try:
        import pynvml
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    except Exception:
        return None
    samples, stop = [], threading.Event()

    def run():
        while not stop.is_set():
            samples.append(pynvml.nvmlDeviceGetDecoderUtilization(handle)[0])
            time.sleep(0.05)
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return lambda: (stop.set(), thread.join(), float(np.mean(samples)) if samples else None)[-1]


# ------------------------------------------------------------------------------------------ host-side feed
KINETICS_LIKE = dict(frames=250, width=456, height=256, classes=("right", "left"), train_per_class=2,
                     test_per_class=1, kind="camera")


def kinetics_like_shards(root: Path) -> Path:
    """Four (and two test) 10-second Kinetics-like videos (250 frames at 25 fps, 16:9, short side 256 after sharding) in
    root/shards, made once (reused when root already holds them). Returns root/shards/train."""
    return sample_shards(Path(root), short_side=256, **KINETICS_LIKE) / "train"


def feed_rate(shards: Path, outputs: tuple[str, ...], cfg: AugConfig, trim: bool, videos: int,
              profile: bool = False) -> dict:
    """One thread feeding ``videos`` samples the way the loader's feeding threads do (epoch order, batch 1):
    per sample `_feed_at` (read + checks + draws + trimming) and `_columns`. Wall and thread-CPU seconds.
    ``profile``: a second, untimed pass under cProfile (its overhead is not in the figures)."""
    loader = pretrain_loader(shards, outputs, batch_size=1, config=cfg, trim=trim)
    positions = [(e, p) for e in range(-(-videos // len(loader.shards))) for p in range(len(loader))][:videos]
    for e, p in positions[:min(8, len(positions))]:           # warm-up: page cache, first-call imports
        loader._columns([loader._feed_at(e, p, p)[1]])
    wall, cpu = time.perf_counter(), time.thread_time()
    decoded = 0
    for e, p in positions:
        _, feed = loader._feed_at(e, p, p)
        loader._columns([feed])
        decoded += feed.decoded
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    if profile:
        import cProfile
        import io as _io
        import pstats
        prof = cProfile.Profile(time.thread_time)     # CPU time of this thread: load elsewhere does not count
        prof.enable()
        for e, p in positions:
            loader._columns([loader._feed_at(e, p, p)[1]])
        prof.disable()
        text = _io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(15)
        print(f"--- cProfile of the feed (trim={trim}), {videos} videos, by own time ---\n{text.getvalue()}",
              file=sys.stderr)
    sample = loader.shards.read(0)
    mean_bytes = int(np.mean([loader.shards.read(i).data.nbytes for i in range(len(loader.shards))]))
    loader.close()
    return {"wall_s": wall, "cpu_s": cpu, "videos_per_s": videos / wall, "videos_per_cpu_s": videos / cpu,
            "decoded_frames_per_video": decoded / videos, "frames": sample.num_frames,
            "size": f"{sample.width}x{sample.height}", "mean_bytes": mean_bytes}


def feed_main(args) -> dict:
    tmp = None
    if args.shards is None:
        if args.work is None:
            tmp = tempfile.TemporaryDirectory()
        args.shards = kinetics_like_shards(Path(args.work or tmp.name))
    cfg = AugConfig(num_frames=args.frames, crop_size=args.crop)
    outputs = OBJECTIVES[args.objective].required_inputs
    off = feed_rate(args.shards, outputs, cfg, False, args.videos)
    on = feed_rate(args.shards, outputs, cfg, True, args.videos, profile=args.profile)
    r = lambda x: round(x, 1)                                              # noqa: E731
    result = {
        "benchmark": "pipeline-feed", "objective": args.objective, "frames": args.frames, "stride": cfg.stride,
        "videos": args.videos, "shards": str(args.shards), "sample_frames": on["frames"], "sample_size": on["size"],
        "sample_mean_bytes": on["mean_bytes"], "baseline": "the same feed with trimming off (trim=False)",
        "trim_videos_per_s": r(on["videos_per_s"]), "trim_videos_per_cpu_s": r(on["videos_per_cpu_s"]),
        "trim_ms_per_video_cpu": round(1000 / on["videos_per_cpu_s"], 3),
        "trim_decoded_frames_per_video": r(on["decoded_frames_per_video"]),
        "baseline_videos_per_s": r(off["videos_per_s"]), "baseline_videos_per_cpu_s": r(off["videos_per_cpu_s"]),
        "baseline_ms_per_video_cpu": round(1000 / off["videos_per_cpu_s"], 3),
        "baseline_decoded_frames_per_video": r(off["decoded_frames_per_video"]),
        "ratio": round(on["videos_per_cpu_s"] / off["videos_per_cpu_s"], 3),      # trimmed feed / untrimmed, CPU
        "target_videos_per_s": 600, "meets_target": on["videos_per_cpu_s"] >= 600,
    }
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=Path, help="a shard set folder (OUT/train); default: shard ucf101-mini")
    p.add_argument("--objective", default="fima", choices=sorted(OBJECTIVES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="baseline DataLoader workers")
    p.add_argument("--feed", action="store_true", help="time only the host-side feed in one thread, trimming on "
                   "against off; without --shards on Kinetics-like samples (250 frames, short side 256)")
    p.add_argument("--videos", type=int, default=400, help="--feed: samples fed per side")
    p.add_argument("--profile", action="store_true", help="--feed: cProfile of the trimmed feed to stderr")
    p.add_argument("--work", type=Path, help="--feed: keep the Kinetics-like shards here (made once, then reused)")
    args = p.parse_args(argv)
    if args.feed:
        return feed_main(args)

    tmp = None
    if args.shards is None:
        from preprocess.cli import main as preprocess_main
        tmp = tempfile.TemporaryDirectory()
        if (UCF_MINI / "classInd.txt").is_file():
            assert preprocess_main([str(UCF_MINI), tmp.name, "--format", "ucf101", "--no-progress"]) == 0
            args.shards = Path(tmp.name) / "train"
        else:   # a fresh checkout without the shared data: the embedded synthetic sample
            args.shards = sample_shards(Path(tmp.name), train_per_class=2, test_per_class=1) / "train"

    cfg = AugConfig(num_frames=args.frames, crop_size=args.crop)
    outputs = OBJECTIVES[args.objective].required_inputs          # the objective says what it needs
    clips_per_video = sum(not k.startswith("box") for k in outputs)
    torch.set_num_threads(1)

    loader = pretrain_loader(args.shards, outputs, batch_size=args.batch, config=cfg, backend=args.backend)
    on_gpu = args.backend == "gpu"
    nvdec = _nvdec_sampler() if on_gpu else None
    batches = _endless(loader)
    next(batches)
    frames_before = loader.stats["decoded_frames"]
    t_pipe = _time(batches, args.steps, args.warmup, on_gpu)
    decoded = loader.stats["decoded_frames"] - frames_before
    nvdec_util = nvdec() if nvdec else None
    loader.close()

    base = torch.utils.data.DataLoader(BaselineViews(args.shards, outputs, cfg, seed=0), batch_size=args.batch,
                                       shuffle=True, num_workers=args.workers, drop_last=True,
                                       persistent_workers=args.workers > 0, prefetch_factor=2 if args.workers else None)
    t_base = _time(_endless(base), args.steps, args.warmup, False)

    videos = args.steps * args.batch
    result = {
        "benchmark": "pipeline", "objective": args.objective, "backend": args.backend, "batch": args.batch,
        "frames": args.frames, "crop": args.crop, "steps": args.steps, "cores": len(os.sched_getaffinity(0)),
        "shards": str(args.shards), "baseline": f"PyAV seek+decode + torch views, DataLoader x{args.workers} workers",
        "pipeline_videos_per_s": round(videos / t_pipe, 2), "pipeline_batches_per_s": round(args.steps / t_pipe, 3),
        "pipeline_clips_per_s": round(videos * clips_per_video / t_pipe, 2),
        "baseline_videos_per_s": round(videos / t_base, 2), "baseline_batches_per_s": round(args.steps / t_base, 3),
        "baseline_clips_per_s": round(videos * clips_per_video / t_base, 2),
        "ratio": round(t_base / t_pipe, 3),
    }
    if on_gpu:
        result.update({"decoded_frames_per_s": None, "nvdec_util_pct": nvdec_util,
                       "gpu": torch.cuda.get_device_name()})
    # decoded frames include each window's lead-in from its keyframe (and prefetched batches)
    result["pipeline_decoded_frames_per_s"] = round(decoded / t_pipe, 1)
    if on_gpu:
        result["decoded_frames_per_s"] = result["pipeline_decoded_frames_per_s"]
    print(json.dumps(result))
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
