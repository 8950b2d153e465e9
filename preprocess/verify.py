"""`python -m preprocess verify OUT`: check a shard set after it was copied, before a run meets a bad sample.

For every split under OUT (OUT itself when it is one split's folder):
* structure: each tar listed in the manifest exists, has the manifest's byte size and (manifests written since
  checksums were recorded) its sha256; its DALI index parses and agrees with the tar's own member headers (names,
  data offsets, sizes) and with the manifest's sample count; every sample has its mp4 / lbl / nf / json members;
* content: the label and frame-count fields agree with the manifest, and the video decodes (every sample, or a
  seeded --fraction of them) to as many frames as its `nf` field says, in parallel worker processes. Decoding uses
  libavcodec through PyAV, the decoder library DALI's CPU backend is built on, one process per core.

Prints a table per split, writes OUT/verify.json (every problem, by split, shard, key and byte offset) and the bad
sample keys one per line to --bad-keys (default OUT/bad_keys.txt; empty when all is well), and exits 1 when anything
is wrong, 0 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from . import shard_format as fmt


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tar_members(path: Path) -> dict[str, tuple[int, int]]:
    """{member name: (data offset, size)} from the tar's own headers (stops at the first unreadable header)."""
    out = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                out[m.name] = (m.offset_data, m.size)
    except (tarfile.TarError, OSError, EOFError):
        pass
    return out


def check_structure(split_dir: Path, manifest: dict) -> tuple[list[dict], list[tuple[str, Path, int, dict]]]:
    """(problems, samples to decode: (key, tar, shard number, {ext: (offset, size)}))."""
    problems, samples = [], []
    for n, shard in enumerate(manifest["shards"]):
        tar = split_dir / shard["file"]
        idx = fmt.index_path(tar)

        def problem(what, key=None, offset=None):
            problems.append({"shard": shard["file"], "key": key, "offset": offset, "problem": what})
        if not tar.is_file() or not idx.is_file():
            problem(f"{'tar' if not tar.is_file() else 'index'} missing")
            continue
        size = tar.stat().st_size
        if shard.get("bytes") is not None and size != shard["bytes"]:
            problem(f"tar is {size} bytes, the manifest says {shard['bytes']} (truncated or replaced copy)")
        if shard.get("sha256") and sha256_file(tar) != shard["sha256"]:
            problem("sha256 differs from the one recorded at sharding time (bytes changed in the copy)")
        try:
            index = fmt.read_index(idx)
        except (ValueError, IndexError) as e:
            problem(f"index unreadable: {e}")
            continue
        if shard.get("samples") is not None and len(index) != shard["samples"]:
            problem(f"index lists {len(index)} samples, the manifest {shard['samples']}")
        at = {off: (name, sz) for name, (off, sz) in tar_members(tar).items()}   # data offset -> member
        for comps in index:
            found = {ext: at.get(off) for ext, (off, _) in comps.items()}
            key = next((fmt.sample_key(m[0]) for m in found.values() if m), None)
            first = min(off for off, _ in comps.values()) if comps else None
            lacking = [e for e in fmt.SAMPLE_EXTS if e not in comps]
            if lacking:
                problem(f"index lists no {lacking}", key, first)
            bad = [f"{ext} at {off}+{sz}" for ext, (off, sz) in comps.items()
                   if found[ext] is None or found[ext][1] != sz or not found[ext][0].endswith("." + ext)
                   or off + sz > size]
            if bad:
                problem(f"index entries that match no tar member (offset or size wrong): {', '.join(bad)}", key, first)
                continue
            samples.append((key, tar, n, comps))
    return problems, samples


def check_sample(job: tuple[str, str, dict, dict]) -> str | None:
    """Decode one sample; None when it is whole, else what is wrong."""
    import av
    import numpy as np
    key, tar, comps, expected = job
    with open(tar, "rb") as f:
        def read(ext):
            off, size = comps[ext]
            f.seek(off)
            return f.read(size)
        try:
            label, frames = fmt.unpack_int32(read(fmt.LABEL_EXT)), fmt.unpack_int32(read(fmt.FRAMES_EXT))
            meta = json.loads(read(fmt.META_EXT))
        except (ValueError, UnicodeDecodeError) as e:
            return f"lbl/nf/json unreadable: {e}"
        data = read(fmt.VIDEO_EXT)
    if expected and (label, frames) != (expected["label"], expected["frames"]):
        return f"label/frames {label}/{frames}, the manifest says {expected['label']}/{expected['frames']}"
    if meta.get("frames") != frames:
        return f"json says {meta.get('frames')} frames, nf says {frames}"
    crc = meta.get(fmt.VIDEO_CRC_FIELD)
    if crc is not None and zlib.crc32(data) != crc:
        return f"video bytes changed since sharding (CRC-32 {zlib.crc32(data):08x}, recorded {crc:08x})"
    import io
    try:
        decoded = 0
        with av.open(io.BytesIO(data)) as c:
            stream = c.streams.video[0]
            stream.thread_type = "NONE"
            for packet in c.demux(stream):
                for frame in packet.decode():
                    np.asarray(frame.to_ndarray(format="yuv420p"))
                    decoded += 1
    except (av.error.FFmpegError, IndexError, ValueError) as e:
        return f"video does not decode: {type(e).__name__}: {str(e)[:200]}"
    if decoded != frames:
        return f"video decodes to {decoded} frames, nf says {frames} (cut short or damaged)"
    return None


def verify_split(split_dir: Path, fraction: float, workers: int, seed: int, progress: bool) -> dict:
    manifest = fmt.load_manifest(split_dir)
    problems, samples = check_structure(split_dir, manifest)
    by_key = {s["key"]: s for s in manifest.get("samples", [])}
    chosen = samples if fraction >= 1 else random.Random(seed).sample(samples, max(1, round(fraction * len(samples))))
    jobs = [(k, str(t), c, by_key.get(k)) for k, t, _, c in chosen]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = list(tqdm(pool.map(check_sample, jobs, chunksize=4), total=len(jobs), unit="video",
                            desc=f"verify {split_dir.name}", disable=not progress, dynamic_ncols=True))
    shard_of = {k: t for k, t, _, _ in chosen}
    for (key, _, comps, _), what in zip(jobs, results):
        if what:
            problems.append({"shard": Path(shard_of[key]).name, "key": key, "offset": comps[fmt.VIDEO_EXT][0],
                             "problem": what})
    checksummed = sum(bool(s.get("sha256")) for s in manifest["shards"])
    return {"split": split_dir.name, "shards": len(manifest["shards"]), "samples": manifest.get("num_samples"),
            "indexed": len(samples), "decoded": len(jobs), "checksummed_shards": checksummed, "problems": problems}


def splits_of(out: Path) -> list[Path]:
    if (out / fmt.MANIFEST).is_file() and (json.loads((out / fmt.MANIFEST).read_text()).get("shards")):
        return [out]
    found = sorted(p.parent for p in out.glob(f"*/{fmt.MANIFEST}"))
    if not found:
        raise FileNotFoundError(f"{out} holds no shard set (no */manifest.json): give OUT of `python -m preprocess`")
    return found


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess verify", description=__doc__.split("\n\n")[0] + "\n\n" +
                                "\n\n".join(__doc__.split("\n\n")[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="OUT of `python -m preprocess` (all its splits) or one split folder")
    p.add_argument("--fraction", type=float, default=1.0, help="decode this seeded fraction of the samples (structure "
                   "and checksums are always checked in full; default 1 = every sample)")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="decoding processes (default: "
                   "all cores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --fraction draw")
    p.add_argument("--bad-keys", type=Path, help="file for the bad sample keys, one per line (default OUT/bad_keys.txt)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if not 0 < a.fraction <= 1:
        print(f"error: --fraction {a.fraction}: give a value in (0, 1]", file=sys.stderr)
        return 2
    try:
        splits = splits_of(a.out)
        reports = [verify_split(s, a.fraction, a.workers, a.seed, not a.no_progress) for s in splits]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\n{'split':<8}{'shards':>8}{'samples':>9}{'checked':>9}{'decoded':>9}{'sha256':>8}{'problems':>10}")
    for r in reports:
        print(f"{r['split']:<8}{r['shards']:>8}{r['samples']:>9}{r['indexed']:>9}{r['decoded']:>9}"
              f"{r['checksummed_shards']:>8}{len(r['problems']):>10}")
    bad = sorted({p["key"] for r in reports for p in r["problems"] if p["key"]})
    for r in reports:
        for p in r["problems"]:
            print(f"  {r['split']}/{p['shard']} {p['key'] or '(shard)'} @ {p['offset']}: {p['problem']}")
    bad_file = a.bad_keys or a.out / "bad_keys.txt"
    bad_file.write_text("".join(f"{k}\n" for k in bad))
    (a.out / "verify.json").write_text(json.dumps({"splits": reports, "bad_keys": bad}, indent=1) + "\n")
    n = sum(len(r["problems"]) for r in reports)
    print(f"{'OK' if not n else f'{n} problem(s), {len(bad)} bad sample(s)'}: report {a.out / 'verify.json'}, "
          f"bad keys {bad_file}")
    return 1 if n else 0
