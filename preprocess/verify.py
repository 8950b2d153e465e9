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
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from . import integrity, shard_format as fmt


def check_structure(split_dir: Path, manifest: dict) -> tuple[list[dict], list[tuple[str, Path, int, dict]]]:
    """(problems, samples to decode: (key, tar, shard number, {ext: (offset, size)})). The checks are
    preprocess/integrity.py's, every tar header read; a sample whose index entries match no tar member is not decoded."""
    problems, samples = [], []
    for n, shard in enumerate(manifest["shards"]):
        tar = split_dir / shard["file"]
        idx = fmt.index_path(tar)

        def problem(what, key=None, offset=None):
            problems.append({"shard": shard["file"], "key": key, "offset": offset, "problem": what})
        if not tar.is_file() or not idx.is_file():
            problem(f"{'tar' if not tar.is_file() else 'index'} missing")
            continue
        try:
            lines = fmt.parse_index(idx)
        except (ValueError, IndexError) as e:
            for p in integrity.manifest_problems(tar, shard, checksum=True):
                problem(p.words)
            problem(f"index unreadable: {e}")
            continue
        index = [comps for comps, _ in lines]
        found = integrity.shard_problems(tar, index, shard, fmt.SAMPLE_EXTS, every_header=True, checksum=True)
        by_sample: dict[int, list] = {}
        for p in found:
            if p.sample is None:
                problem(p.words)
            else:
                by_sample.setdefault(p.sample, []).append(p)
        with open(tar, "rb") as f:
            for j, (comps, key) in enumerate(lines):
                key = key or header_key(f.fileno(), comps)
                first = min(off for off, _ in comps.values()) if comps else None
                mine = by_sample.get(j, [])
                lacking = [p.expected for p in mine if p.kind == "lacking"]
                if lacking:
                    problem(f"index lists no {lacking[0]}", key, first)
                bad = {p.ext for p in mine if p.kind in ("outside", "member")}
                if bad:
                    problem("index entries that match no tar member (offset or size wrong): " +
                            ", ".join(f"{ext} at {off}+{sz}" for ext, (off, sz) in comps.items() if ext in bad), key, first)
                    continue
                samples.append((key, tar, n, comps))
    return problems, samples


def header_key(fd: int, comps: dict) -> str | None:
    """The sample key from the tar headers of an index line's members (for an index without member names)."""
    return next((integrity.member_key(h[0]) for h in integrity.read_headers(fd, comps).values() if h), None)


def check_sample(job: tuple[str, str, dict, dict]) -> str | None:
    """Decode one sample; None when it is whole, else what is wrong (the first integrity problem, else decoding)."""
    import av
    import numpy as np
    key, tar, comps, expected = job
    with open(tar, "rb") as f:
        parts = integrity.read_parts(f.fileno(), comps)
    found = integrity.sample_problems(parts, expected)
    if found:
        return found[0].words
    frames = fmt.unpack_int32(parts[fmt.FRAMES_EXT])
    data = parts[fmt.VIDEO_EXT]
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
