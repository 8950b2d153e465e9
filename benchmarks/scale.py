"""Benchmark: what a shard set of N samples costs one process, from 1k to Kinetics-700's 650k (issue 28).

    python benchmarks/scale.py                        # sizes 1k, 10k, 100k, 300k, 650k under a temp folder
    python benchmarks/scale.py --sizes 1000,10000 --root /tmp/scale --keep

No transcoding: a pool of real encoded samples (the project's own synthetic videos, short side 64, 32 frames) is
written again and again under new keys into shards of 1,000 samples, with real DALI indexes and a real manifest
(per-sample list, sha256 per shard) as `python -m preprocess` writes them; the smaller sets are the first shards of
the largest (hard links) with their own manifest. Every figure is measured in a fresh process per size, so memory
is one process's:

* open: ``ShardSet(dir)`` (manifest, indexes) seconds, and the resident memory it adds (RSS after minus before)
  and the peak it adds (the peak RSS since just before, VmHWM reset through /proc/self/clear_refs, minus RSS
  before: the imports of torch and DALI peak far higher and would hide it);
* loader: ``pretrain_loader(dir, MoCo's keys, ...)`` construction seconds and peak memory added;
* epoch order (the permutation of an epoch, padded and dealt), resume (``load_state_dict`` mid-epoch 3 and the
  first batch after it), the first batch of epoch 0, ``exclude()`` of one key-only record (a bad_keys.txt
  line) and of one record with its index (bad_samples.jsonl);
* evaluation: ``evaluate.data.open_split`` (what the linear / kNN / retrieval feature cache opens: labels and
  the manifest checksum the cache key holds);
* verify: ``python -m preprocess verify`` with the decoding of 64 samples only, so the structural check
  (index vs tar headers, sha256 of every tar) is what grows: samples per second, up to --verify-max;
* doctor: ``python -m train doctor --only data.shards``, up to --doctor-max;
* merge: ``python -m preprocess SRC OUT --merge`` over N transcoded inputs in OUT/.work (hard links to the pool's
  videos; their source files hard links too), up to --merge-max.

Times are wall seconds; open and loader also in CPU seconds of the process (``*_cpu_s``), which other work on
the machine does not inflate. Prints a table (each figure, its ratio to the 1k value, and the growth exponent: the slope of log(cost) against
log(N) from 1k to the largest size) and one JSON line.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PER_SHARD = 1000
BATCH = 8


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak() -> None:
    """Restart the peak-RSS count here (Linux: "5" to /proc/self/clear_refs resets VmHWM), so a peak measured next
    is the set's and not the imports' (importing torch and DALI peaks ~780 MB above the RSS they leave)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    """The peak resident memory since reset_peak (VmHWM), else since the process started (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------ building sets
def make_pool(root: Path) -> Path:
    """A few real encoded samples: the synthetic videos sharded by `python -m preprocess` (short side 64)."""
    shards = root / "pool" / "shards"
    if not (shards / "train" / "manifest.json").is_file():
        from preprocess.cli import main as preprocess_main
        from preprocess.sample_videos import make_sample_videos
        make_sample_videos(root / "pool" / "videos", train_per_class=2, test_per_class=0, frames=32, progress=False)
        rc = preprocess_main([str(root / "pool" / "videos"), str(shards), "--short-side", "64", "--name", "pool",
                              "--no-progress"])
        if rc:
            raise SystemExit("sharding the pool of sample videos failed")
    return shards / "train"


def pool_samples(split: Path) -> tuple[list[dict], dict]:
    """The pool's samples as {ext: bytes, "record": json dict}, and its manifest."""
    from preprocess import shard_format as fmt
    manifest = fmt.load_manifest(split)
    out = []
    for tar in fmt.shard_paths(split, manifest):
        data = tar.read_bytes()
        for comps, _ in fmt.parse_index(fmt.index_path(tar)):
            s = {ext: data[off:off + size] for ext, (off, size) in comps.items()}
            s["record"] = json.loads(s[fmt.META_EXT])
            out.append(s)
    return out, manifest


def _header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti.tobuf(tarfile.USTAR_FORMAT)


KEY_LEN = 24


def key_of(i: int) -> str:
    """Unique, dot-free, fixed length (so one tar header template serves every sample)."""
    return f"video_{i:07d}-{hashlib.sha1(str(i).encode()).hexdigest()[:10]}"


class Member:
    """A tar member's header for any key of KEY_LEN characters: the template's bytes with the name swapped and
    the checksum fixed up (what tarfile computes, ~50x faster for millions of members)."""

    def __init__(self, ext: str, data: bytes):
        self.data, self.pad = data, bytes(-len(data) % 512)
        self.head = bytearray(_header("k" * KEY_LEN + "." + ext, len(data)))
        self.base = sum(self.head) - sum(self.head[148:156]) + 8 * 32 - ord("k") * KEY_LEN

    def header(self, key: bytes) -> bytes:
        h = self.head
        h[:KEY_LEN] = key
        h[148:156] = b"%06o\0 " % (self.base + sum(key))
        return bytes(h)


def build_largest(dest: Path, n: int, pool: list[dict], manifest: dict) -> None:
    """n samples in shards of PER_SHARD, laid out as `python -m preprocess` writes them (tar bytes, DALI index,
    sha256 and counts in the manifest, the per-sample list), from the pool's bytes under new keys (the json
    member is the pool sample's own: its source and CRC-32 still hold)."""
    from preprocess import shard_format as fmt
    dest.mkdir(parents=True, exist_ok=True)
    members = [[(ext, Member(ext, p[ext])) for ext in fmt.SAMPLE_EXTS] for p in pool]
    shards, samples = [], []
    for t in range(math.ceil(n / PER_SHARD)):
        parts, index, frames, pos = [], [], 0, 0
        for i in range(t * PER_SHARD, min(n, (t + 1) * PER_SHARD)):
            p = pool[i % len(pool)]
            key = key_of(i)
            kb = key.encode()
            rec = p["record"]
            line = []
            for ext, m in members[i % len(pool)]:
                parts += (m.header(kb), m.data, m.pad)
                pos += 512
                line.append(f"{ext} {pos} {len(m.data)} {key}.{ext}")
                pos += len(m.data) + len(m.pad)
            index.append(" ".join(line))
            frames += rec["frames"]
            samples.append({"source": f"class_{rec['label']}/{key}.avi", "key": key, "label": rec["label"],
                            "frames": rec["frames"], "shard": t})
        parts.append(bytes(1024))                              # the tar's end-of-archive blocks
        data = b"".join(parts)
        tar = dest / fmt.shard_name("scale", t)
        tar.write_bytes(data)
        fmt.index_path(tar).write_text(f"{fmt.INDEX_VERSION} {len(index)}\n" + "\n".join(index) + "\n")
        shards.append({"file": tar.name, "index": fmt.index_path(tar).name, "samples": len(index), "frames": frames,
                       "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    write_manifest(dest, manifest, shards, samples)


def write_manifest(dest: Path, pool_manifest: dict, shards: list[dict], samples: list[dict]) -> None:
    from preprocess import shard_format as fmt
    from preprocess.shards import dump_json
    m = {**pool_manifest, "dataset": "scale", "shards": shards, "num_samples": len(samples),
         "num_frames": sum(s["frames"] for s in shards), "num_bytes": sum(s["bytes"] for s in shards),
         "frame_sizes": {k: len(samples) for k in pool_manifest["frame_sizes"]},
         "samples": sorted(samples, key=lambda r: r["source"])}
    (dest / fmt.MANIFEST).write_text(dump_json(m))


def subset(largest: Path, m: dict, dest: Path, n: int) -> None:
    """The first n samples of the largest set (manifest m): its first shards, hard-linked, under their own
    manifest."""
    dest.mkdir(parents=True, exist_ok=True)
    shards = m["shards"][:math.ceil(n / PER_SHARD)]
    for s in shards:
        for f in (s["file"], s["index"]):
            if not (dest / f).exists():
                os.link(largest / f, dest / f)
    keep = {s["file"] for s in shards}
    samples = [r for r in m["samples"] if m["shards"][r["shard"]]["file"] in keep]
    write_manifest(dest, {k: v for k, v in m.items() if k not in ("samples", "shards")}, shards, samples)


def build_sets(root: Path, sizes: list[int]) -> dict[int, Path]:
    pool, manifest = pool_samples(make_pool(root))
    largest = root / "sets" / str(max(sizes))
    if not (largest / "manifest.json").is_file():
        build_largest(largest, max(sizes), pool, manifest)
    out, m = {max(sizes): largest}, None
    for n in sizes:
        if n != max(sizes):
            out[n] = root / "sets" / str(n)
            if not (out[n] / "manifest.json").is_file():
                m = m or json.loads((largest / "manifest.json").read_text())
                subset(largest, m, out[n], n)
    return out


# ------------------------------------------------------------------------------------------------ probes
def probe_set(data: Path) -> dict:
    """In a fresh process: open the set, then build a loader and feed from it."""
    import numpy as np  # noqa: F401  (imports before the baseline, so only the set's own memory is counted)
    import torch  # noqa: F401
    from model.moco import MoCo
    from pipeline import AugConfig, ShardSet, pretrain_loader
    from pipeline import sampling  # noqa: F401
    r: dict[str, float] = {}
    base = rss_mb()
    reset_peak()
    t, c = time.perf_counter(), time.process_time()
    s = ShardSet(data)
    r["open_s"] = time.perf_counter() - t
    r["open_cpu_s"] = time.process_time() - c        # the same cost, blind to other processes on the cores
    r["open_rss_mb"] = rss_mb() - base
    r["open_peak_mb"] = peak_mb() - base
    n = len(s)
    s.close()
    del s
    cfg = AugConfig(num_frames=8, stride=2, crop_size=32)
    t, c = time.perf_counter(), time.process_time()
    loader = pretrain_loader(data, MoCo.required_inputs, batch_size=BATCH, config=cfg, num_threads=1)
    r["loader_s"] = time.perf_counter() - t
    r["loader_cpu_s"] = time.process_time() - c
    r["loader_peak_mb"] = peak_mb() - base
    t = time.perf_counter()
    next(iter(loader))
    r["first_batch_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loader._order(1)
    r["epoch_order_s"] = time.perf_counter() - t
    t = time.perf_counter()
    loader.load_state_dict({**loader.state_dict(), "epoch": 3, "step": len(loader) // 2})
    r["resume_s"] = time.perf_counter() - t
    t = time.perf_counter()
    next(iter(loader))
    r["resumed_batch_s"] = time.perf_counter() - t
    key = key_of(n - 1)                       # the last sample: a scan finds it last
    t = time.perf_counter()
    added = loader.exclude([{"key": key, "error": "listed"}])
    r["exclude_key_s"] = time.perf_counter() - t
    t = time.perf_counter()
    added += loader.exclude([{"key": key_of(n - 2), "index": n - 2, "error": "logged"}])
    r["exclude_indexed_s"] = time.perf_counter() - t
    assert added == 2, added
    r["peak_mb"] = peak_mb() - base
    loader.close()
    return r


def probe_eval(data: Path) -> dict:
    import numpy as np  # noqa: F401
    import torch  # noqa: F401
    from evaluate.data import open_split
    base = rss_mb()
    reset_peak()
    t = time.perf_counter()
    split = open_split("train", data)
    r = {"eval_open_s": time.perf_counter() - t, "eval_open_peak_mb": peak_mb() - base}
    assert split.num_videos == json.loads((data / "manifest.json").read_text())["num_samples"]
    return r


def timed(cmd: list[str], cwd: Path = REPO) -> float:
    t = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {r.stderr[-1500:]}")
    return time.perf_counter() - t


def run_probe(kind: str, data: Path) -> dict:
    r = subprocess.run([sys.executable, __file__, "--probe", kind, str(data)], cwd=REPO, capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if r.returncode != 0:
        raise SystemExit(f"probe {kind} on {data} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def merge_input(root: Path, n: int, pool_dir: Path) -> tuple[Path, Path]:
    """SRC of n videos (hard links of one pool video, folders layout) and OUT/.work holding all n transcoded, as
    array jobs leave them; returns (SRC, OUT)."""
    from preprocess.shards import dump_json
    from preprocess.sources import read_dataset
    src, out = root / "merge" / f"src{n}", root / "merge" / f"out{n}"
    if out.exists():
        shutil.rmtree(out)
    pool, _ = pool_samples(pool_dir)
    video = next((pool_dir.parents[1] / "videos").rglob("*.mp4"))
    links = 50_000                    # a file takes at most 65,000 hard links (ext4): a new copy every 50,000
    if not src.is_dir():
        for i in range(n):
            d = src / "train" / f"class{i % 6}"
            d.mkdir(parents=True, exist_ok=True)
            if i % links == 0:
                first = d / f"v{i:07d}.mp4"
                shutil.copyfile(video, first)
            else:
                os.link(first, d / f"v{i:07d}.mp4")
    work = out / ".work"
    work.mkdir(parents=True)
    from preprocess import shard_format as fmt
    for i, v in enumerate(read_dataset("folders", src.resolve()).videos):
        if i % links == 0:
            first = work / f"{v.key}.mp4"
            first.write_bytes(pool[0][fmt.VIDEO_EXT])
        else:
            os.link(first, work / f"{v.key}.mp4")
        rec = {k: x for k, x in pool[0]["record"].items() if k not in ("label_name", fmt.VIDEO_CRC_FIELD)}
        (work / f"{v.key}.json").write_text(dump_json({**rec, "source": v.source, "split": v.split, "label": v.label,
                                                       "_stamp": {"size": 0, "mtime_ns": 0}}))
    return src, out


# ------------------------------------------------------------------------------------------------ report
def exponent(xs: list[int], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if y and y > 0]
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[0], pts[-1]
    return round((y1 - y0) / (x1 - x0), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000,300000,650000", help="samples per set, comma-separated")
    p.add_argument("--root", type=Path, default=None, help="where the sets go (default: a temp folder, removed)")
    p.add_argument("--keep", action="store_true", help="keep --root afterwards (re-runs reuse the sets)")
    p.add_argument("--verify-max", type=int, default=100_000, help="largest set `preprocess verify` runs on")
    p.add_argument("--doctor-max", type=int, default=650_000, help="largest set the doctor's data.shards runs on")
    p.add_argument("--merge-max", type=int, default=100_000, help="largest number of inputs the merge step runs on")
    p.add_argument("--probe", nargs=2, metavar=("KIND", "DIR"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.probe:
        kind, data = a.probe
        print(json.dumps({"set": probe_set, "eval": probe_eval}[kind](Path(data))))
        return
    sizes = sorted(int(s) for s in a.sizes.split(","))
    root = a.root or Path(tempfile.mkdtemp(prefix="bench_scale_"))
    root.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    try:
        t = time.perf_counter()
        sets = build_sets(root, sizes)
        build_s = time.perf_counter() - t
        fig: dict[str, dict[int, float]] = {}

        def put(name, n, v):
            fig.setdefault(name, {})[n] = v
        for n in sizes:
            data = sets[n]
            put("manifest_mb", n, (data / "manifest.json").stat().st_size / 2**20)
            for kind in ("set", "eval"):
                for k, v in run_probe(kind, data).items():
                    put(k, n, v)
            if n <= a.verify_max:
                frac = min(1.0, 64 / n)
                put("verify_s", n, timed([sys.executable, "-m", "preprocess", "verify", str(data), "--fraction",
                                          str(frac), "--workers", "1", "--no-progress"]))
            if n <= a.doctor_max:
                put("doctor_data_shards_s", n, timed([sys.executable, "-m", "train", "doctor", "--only", "data.shards",
                                                      f"data={data}"]))
            if n <= a.merge_max:
                src, out = merge_input(root, n, root / "pool" / "shards" / "train")
                put("merge_s", n, timed([sys.executable, "-m", "preprocess", str(src), str(out), "--merge",
                                         "--no-progress", "--name", "merge", "--max-per-shard", str(PER_SHARD)]))
                shutil.rmtree(out)
        total_s = time.perf_counter() - t_all
    finally:
        if not (a.keep or a.root):
            shutil.rmtree(root, ignore_errors=True)
    print(f"{'figure':<24}" + "".join(f"{n:>12,}" for n in sizes) + f"{'x of 1k at max':>16}{'exponent':>10}")
    result = {}
    for name, by_n in fig.items():
        ns = [n for n in sizes if n in by_n]
        vals = [by_n[n] for n in ns]
        e = exponent(ns, vals)
        ratio = vals[-1] / vals[0] if vals[0] else None
        cells = "".join(f"{by_n[n]:>12.4g}" if n in by_n else f"{'-':>12}" for n in sizes)
        print(f"{name:<24}{cells}{(f'{ratio:.3g}' if ratio else '-'):>16}{str(e):>10}")
        result[name] = {"values": {str(n): round(v, 5) for n, v in by_n.items()}, "ratio_to_1k": ratio and round(ratio, 3),
                        "exponent": e}
    print(json.dumps({"benchmark": "scale", "sizes": sizes, "samples_per_shard": PER_SHARD,
                      "build_s": round(build_s, 1), "total_s": round(total_s, 1), "figures": result}))


if __name__ == "__main__":
    main()
