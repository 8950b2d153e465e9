"""Benchmark `python -m preprocess` against a bare ffmpeg CLI transcode of the same files, same settings, same cores.

The baseline runs exactly the ffmpeg command lines the tool runs (same encoder options), `--workers` at a
time, writing to a scratch folder: the cost floor. The tool adds probing, frame counting, tar packing,
indexes and manifests. Both are timed in the same run, interleaved, median of --repeats; prints one JSON line.

    python benchmarks/preprocess.py [--src ../shared/data/ucf101-mini --format ucf101] [--workers N]
"""
from __future__ import annotations

import argparse
import json
import os
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
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        if a.src is None:
            if (UCF_MINI / "classInd.txt").is_file():
                a.src, a.format = UCF_MINI, a.format or "ucf101"
            else:
                a.src = tmp / "videos"
                make_sample_videos(a.src, progress=False)
        fmt = a.format or "folders"
        videos = read_dataset(fmt, a.src).videos
        enc = Encoding()
        base_t, tool_t, frames = [], [], 0
        for r in range(a.repeats):
            scratch = tmp / f"bare{r}"
            scratch.mkdir()
            base_t.append(bare_ffmpeg(videos, enc, a.workers, scratch))
            shutil.rmtree(scratch)
            out = tmp / f"out{r}"
            tool_t.append(tool(a.src, fmt, a.workers, out))
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
            "tool_s": [round(x, 2) for x in tool_t], "ffmpeg_s": [round(x, 2) for x in base_t]}))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
