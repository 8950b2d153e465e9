"""data.*: the shard set's structure (arithmetic on every index, plus the tar header in front of each member
wherever the index does not describe a contiguous tar), N samples read in full, and read throughput vs what training
consumes; each a function of the Facts."""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

from .core import PASS, WARN, Fail, Result
from .facts import Facts


def check_shards(facts: Facts) -> Result:
    s = facts.shards
    manifest, tars, indexes = s["manifest"], s["tars"], s["indexes"]
    from preprocess import integrity, shard_format as fmt
    need = (fmt.VIDEO_EXT, fmt.LABEL_EXT, fmt.FRAMES_EXT)
    problems, headers_read, total = [], 0, 0
    for shard, tar, index in zip(manifest["shards"], tars, indexes):
        total += len(index)
        # a tar header is read only where the index leaves the tar's own layout (integrity.headers_to_read)
        headers_read += len(integrity.headers_to_read(index, every=False))
        found = integrity.shard_problems(tar, index, shard, need, every_header=False)
        problems += [f"{tar.name}" + (f" sample {p.sample}" if p.sample is not None else "") + f": {p.words}"
                     for p in sorted(found, key=lambda p: p.kind != "count")]  # count first
    if manifest.get("num_samples") not in (None, total):
        problems.append(f"the indexes hold {total} samples, the manifest says {manifest['num_samples']}")
    m = {"shards": len(tars), "samples": total, "headers_read": headers_read, "problems": problems[:20]}
    fig = f"{len(tars)} shards, {total} samples, manifest = indexes; {headers_read} tar headers read"
    if problems:
        raise Fail(f"{len(problems)} problem(s): " + "; ".join(problems[:2]) + ("; ..." if len(problems) > 2 else ""),
                   f"the index or manifest does not describe these tars: re-run `python -m preprocess` on this set "
                   f"(it resumes and rewrites manifest and indexes), or copy {s['dir']} again in full (rsync -a)", m)
    return Result("", PASS, fig, measured=m)


def check_samples(facts: Facts) -> Result:
    s = facts.samples
    infos, problems = s["infos"], s["problems"]
    m = {"samples": len(infos), "keys": [i.get("key") for i in infos], "problems": problems[:20]}
    if problems:
        raise Fail(f"{len(problems)} problem(s) in {len(infos)} samples: " + "; ".join(problems[:2]) +
                   ("; ..." if len(problems) > 2 else ""),
                   "the index does not point at the right members, or labels/frame counts disagree: re-run "
                   "`python -m preprocess` on this set (it resumes and rewrites the indexes), or re-copy the "
                   "shard folder in full", m)
    nf = [i["nf"] for i in infos]
    fig = (f"{len(infos)} samples from {len({i['shard'] for i in infos})} shards: tar members, lbl, nf, JSON, "
           f"manifest and MP4 agree; " + (f"{nf[0]} frames each" if min(nf) == max(nf) else
                                           f"{min(nf)}-{max(nf)} frames"))
    return Result("", PASS, fig, measured=m)


def check_read(facts: Facts) -> Result:
    infos = facts.samples["infos"]        # at least one: a set without samples fails in facts.samples
    # drop the page cache of these tars (clean pages only; harmless) so the figure is closer to a cold read
    for tar in {i["tar"] for i in infos}:
        try:
            fd = os.open(tar, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        except (OSError, AttributeError):
            pass

    def read(i):
        fd = os.open(i["tar"], os.O_RDONLY)
        try:
            return len(os.pread(fd, i["hi"] - i["lo"], i["lo"]))
        finally:
            os.close(fd)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=4) as pool:      # the loader reads with 4 I/O threads per rank
        nbytes = sum(pool.map(read, infos))
    dt = max(time.perf_counter() - t0, 1e-6)
    vps, mbps = len(infos) / dt, nbytes / dt / 1e6
    need_vps, basis = facts.consumption()
    need_mbps = need_vps * nbytes / len(infos) / 1e6
    m = {"videos_per_s": vps, "mb_per_s": mbps, "bytes": nbytes, "videos": len(infos), "seconds": dt,
         "need_videos_per_s": need_vps, "need_mb_per_s": need_mbps, "need_basis": basis}
    fig = (f"{mbps:.1f} MB/s, {vps:.1f} videos/s ({len(infos)} videos, 4 threads, page cache dropped first); "
           f"needs {need_vps:.3g} videos/s = {need_mbps:.3g} MB/s ({basis})")
    if vps < need_vps:
        return Result("", WARN, fig, "reading is slower than training consumes: stage the shards on node-local "
                      "disk (docker/slurm/train.sbatch: STAGE_FROM/STAGE_TO), or use a faster filesystem", m)
    return Result("", PASS, fig, measured=m)
