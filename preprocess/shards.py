"""Pack transcoded videos into WebDataset tars with a DALI index each, and write the manifests.

Everything here is deterministic: the sample order is a seeded hash order, tar headers carry no time or
owner, JSON is written with sorted keys. Every file is written to a temp name and renamed, so a killed run
never leaves a half shard that looks whole, and a re-run produces the same bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zlib
from pathlib import Path

from . import shard_format as fmt
from .lock import pid_alive

TOOL = "motionpretrain.preprocess 0.1.0"


def remove_stale_temps(folder: Path) -> None:
    """Delete the temp files of `atomic_write` calls whose process is gone (a run killed mid-write); a live
    process's temp file (another job packing beside this one) is left alone."""
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def dump_json(obj) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def shuffled(keys: list[str], seed: int) -> list[str]:
    """A deterministic shuffle that depends only on the seed and each key (not on input order or job split)."""
    return sorted(keys, key=lambda k: hashlib.sha1(f"{seed}:{k}".encode()).hexdigest())


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int, max_samples: int) -> list[list[str]]:
    """Greedy cut of an ordered (key, bytes) list into shards of at most max_bytes / max_samples (never empty)."""
    shards, cur, cur_bytes = [], [], 0
    for key, size in sizes:
        if cur and (cur_bytes + size > max_bytes or (max_samples and len(cur) >= max_samples)):
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(key)
        cur_bytes += size
    if cur:
        shards.append(cur)
    return shards


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = size, 0, 0o644, 0, 0, "", ""
    return ti


def write_shard(tar_path: Path, samples: list[dict[str, bytes]]) -> tuple[int, str]:
    """Write one tar (temp + rename) and its DALI index; `samples` are {"__key__", ext: bytes}. Returns (bytes,
    sha256 of the tar), which the manifest records so `python -m preprocess verify` can check a copy."""
    buf = io.BytesIO()
    index = []
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for s in samples:
            comps = []
            for ext in fmt.SAMPLE_EXTS:
                data = s[ext]
                name = f"{s['__key__']}.{ext}"
                tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))
                # data starts right after this member's 512-byte header; the header sits at buf.tell() - padded size - 512
                data_offset = tar.offset - ((len(data) + 511) // 512) * 512
                comps.append((ext, data_offset, len(data), name))
            index.append(comps)
    data = buf.getvalue()
    fmt.atomic_write(tar_path, data)
    fmt.atomic_write(fmt.index_path(tar_path), fmt.format_index(index))
    return len(data), hashlib.sha256(data).hexdigest()


def pack_split(out_dir: Path, name: str, split: str, records: dict[str, dict], video_file, classes: list[str],
               encoding: dict, seed: int, max_bytes: int, max_samples: int, skipped: int) -> dict:
    """Write OUT/<split>/: shards, indexes, manifest.json. `records` maps key -> the sample's JSON record
    (with "label" and "frames"); `video_file(key)` is the transcoded file. Returns the split's manifest."""
    split_dir = out_dir / split
    split_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(split_dir)
    order = shuffled(list(records), seed)
    plan = plan_shards([(k, video_file(k).stat().st_size) for k in order], max_bytes, max_samples)
    shards, key_to_shard = [], {}
    for i, keys in enumerate(plan):
        tar_path = split_dir / fmt.shard_name(name, i)
        samples = []
        for k in keys:
            rec, video = records[k], video_file(k).read_bytes()
            samples.append({"__key__": k, fmt.VIDEO_EXT: video,
                            fmt.LABEL_EXT: fmt.pack_int32(rec["label"]), fmt.FRAMES_EXT: fmt.pack_int32(rec["frames"]),
                            fmt.META_EXT: dump_json({**rec, fmt.VIDEO_CRC_FIELD: zlib.crc32(video)}).encode()})
            key_to_shard[k] = i
        nbytes, sha = write_shard(tar_path, samples)
        shards.append({"file": tar_path.name, "index": fmt.index_path(tar_path).name, "samples": len(keys),
                       "frames": sum(records[k]["frames"] for k in keys), "bytes": nbytes, "sha256": sha})
    wanted = {s["file"] for s in shards} | {s["index"] for s in shards}
    for stale in list(split_dir.glob("*.tar")) + list(split_dir.glob("*.idx")):   # from an earlier, different run
        if stale.name not in wanted:
            stale.unlink()
    manifest = {
        "format_version": fmt.FORMAT_VERSION, "tool": TOOL, "dataset": name, "split": split,
        "classes": classes, "num_classes": len(classes),
        "labelled": any(r["label"] >= 0 for r in records.values()),
        "num_samples": len(records), "num_frames": sum(r["frames"] for r in records.values()),
        "num_bytes": sum(s["bytes"] for s in shards), "num_skipped": skipped,
        "encoding": encoding, "shuffle_seed": seed, "shards": shards,
        # the coded frame sizes (WxH: count): one size, multiples of 16, is what DALI's GPU decoder cache reuses
        "frame_sizes": fmt.frame_sizes(records.values()),
        "fields": {"video": fmt.VIDEO_EXT, "label": fmt.LABEL_EXT + " (int32 LE, -1 = unlabelled)",
                   "frames": fmt.FRAMES_EXT + " (int32 LE)", "meta": fmt.META_EXT},
        # input -> key map, sorted by source path
        "samples": [{"source": r["source"], "key": k, "label": r["label"], "frames": r["frames"],
                     "shard": key_to_shard[k]} for k, r in sorted(records.items(), key=lambda kv: kv[1]["source"])],
    }
    fmt.atomic_write(split_dir / fmt.MANIFEST, dump_json(manifest))
    return manifest
