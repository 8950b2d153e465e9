"""Benchmark `python -m preprocess` against a bare ffmpeg CLI transcode of the same files, same settings, same cores.

The baseline runs exactly the ffmpeg command lines the tool runs (same encoder options), `--workers` at a
time, writing to a scratch folder: the cost floor. The tool adds probing, frame counting, tar packing,
indexes and manifests. Both are timed in the same run, interleaved, median of --repeats; prints one JSON line.

    python benchmarks/preprocess.py [--src ../shared/data/ucf101-mini --format ucf101] [--workers N]
    python benchmarks/preprocess.py --kinetics-like 12 --workers 1     # time to shard per core, K400-like clips

Besides wall-clock throughput it reports the CPU seconds each side spent per video (its child processes' user +
system time): with one video per core, that is the time to shard one video on one core, the figure that scales a
cluster's sharding of Kinetics (650,000 videos x CPU-s per video / cores) and that other load on the machine
does not inflate.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from preprocess.sample_videos import make_sample_videos  # noqa: E402
from preprocess.sources import read_dataset  # noqa: E402
from preprocess.video import Encoding, output_rate, probe, transcode_command  # noqa: E402

UCF_MINI = REPO.parent / "shared" / "data" / "ucf101-mini"


def children_cpu_s() -> float:
    """User + system CPU seconds of this process's finished children so far (ffmpeg, the tool's processes)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def bare_ffmpeg(videos, enc: Encoding, workers: int, scratch: Path) -> float:
    # command lines prepared beforehand (a shell user would type them): only ffmpeg's own work is timed
    cmds = [transcode_command(v.path, scratch / f"{i}.mp4", enc, output_rate(probe(v.path).fps))
            for i, v in enumerate(videos)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        for r in pool.map(lambda c: subprocess.run(c, stdin=subprocess.DEVNULL, capture_output=True), cmds):
            assert r.returncode == 0, r.stderr[-300:]
    return time.perf_counter() - t0


def tool(src: Path, fmt: str, workers: int, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "preprocess", str(src), str(out), "--format", fmt, "--workers",
                    str(workers), "--no-progress"], cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None, help="dataset folder (default: ucf101-mini, else sample videos)")
    p.add_argument("--format", default=None, help="its --format (default: ucf101 for ucf101-mini, else folders)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="parallel videos, for both sides")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each side (median reported)")
    p.add_argument("--kinetics-like", type=int, default=0, metavar="N",
                   help="shard N generated Kinetics-like clips (10 s at 25 fps, 456x256, the feed benchmark's) "
                        "instead of --src")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        if a.kinetics_like:
            a.src, a.format = tmp / "videos", "folders"
            n = max(1, a.kinetics_like // 3)             # two classes, two train videos to one test video
            make_sample_videos(a.src, classes=("right", "left"), train_per_class=n, test_per_class=max(1, n // 2),
                               frames=250, height=256, width=456, kind="camera", progress=False)
        elif a.src is None:
            if (UCF_MINI / "classInd.txt").is_file():
                a.src, a.format = UCF_MINI, a.format or "ucf101"
            else:
                a.src = tmp / "videos"
                make_sample_videos(a.src, progress=False)
        fmt = a.format or "folders"
        videos = read_dataset(fmt, a.src).videos
        enc = Encoding()
        base_t, tool_t, base_cpu, tool_cpu, frames = [], [], [], [], 0
        for r in range(a.repeats):
            scratch = tmp / f"bare{r}"
            scratch.mkdir()
            c0 = children_cpu_s()
            base_t.append(bare_ffmpeg(videos, enc, a.workers, scratch))
            base_cpu.append(children_cpu_s() - c0)
            shutil.rmtree(scratch)
            out = tmp / f"out{r}"
            c0 = children_cpu_s()
            tool_t.append(tool(a.src, fmt, a.workers, out))
            tool_cpu.append(children_cpu_s() - c0)
            top = json.loads((out / "manifest.json").read_text())
            frames = sum(s["frames"] for s in top["splits"].values())
            shutil.rmtree(out)
        b, t = statistics.median(base_t), statistics.median(tool_t)
        print(json.dumps({
            "benchmark": "preprocess", "dataset": str(a.src), "videos": len(videos), "frames": frames,
            "workers": a.workers, "codec": enc.codec,
            "tool_videos_per_s": round(len(videos) / t, 2), "tool_frames_per_s": round(frames / t, 1),
            "ffmpeg_videos_per_s": round(len(videos) / b, 2), "ffmpeg_frames_per_s": round(frames / b, 1),
            "ratio_tool_over_ffmpeg_throughput": round(b / t, 3), "overhead_pct": round(100 * (t / b - 1), 1),
            "tool_cpu_s_per_video": round(statistics.median(tool_cpu) / len(videos), 3),
            "ffmpeg_cpu_s_per_video": round(statistics.median(base_cpu) / len(videos), 3),
            "ratio_tool_over_ffmpeg_cpu": round(statistics.median(base_cpu) / statistics.median(tool_cpu), 3),
            "tool_s": [round(x, 2) for x in tool_t], "ffmpeg_s": [round(x, 2) for x in base_t]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
