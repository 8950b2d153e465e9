"""`python -m preprocess SRC OUT`: shard a video dataset into WebDataset tars (see --help).

Two phases, both resumable:
1. transcode: every input video -> OUT/.work/<key>.mp4 plus its JSON record (or a .skip.json with the reason),
   one video per worker, each written to a temp name and renamed; finished videos are never redone.
   With --num-jobs J --job-index i a cluster array job does only its 1/J of the videos.
2. pack (skipped by array jobs; run once more with --merge, or without --num-jobs, to do it): seeded shuffle,
   OUT/<split>/<name>-NNNNNN.tar + .idx, OUT/<split>/manifest.json, OUT/errors.jsonl, OUT/manifest.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from . import shard_format as fmt
from .lock import MAIN as MAIN_LOCK, Lock, LockedError, describe, job_lock_name, live_holders
from .shard_format import atomic_write
from .shards import TOOL, dump_json, pack_split, remove_stale_temps
from .sources import FORMATS, LayoutError, Video, read_dataset
from .video import Encoding, SkipVideo, transcode

WORK = ".work"
EXIT_LOCKED = 75   # EX_TEMPFAIL: another run holds OUT (or this array part); run again when it is done


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size wants WIDTHxHEIGHT, e.g. 320x256, got {text!r}") from None
    if w <= 0 or h <= 0 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"--size {text}: both sides must be positive and even (4:2:0 video)")
    return w, h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m preprocess",
        description="Shard a video dataset into WebDataset tars for DALI: transcode every video (short side 256, "
                    "constant frame rate, short fixed GOP, VP9 in MP4 by default, no audio), shuffle "
                    "deterministically, and write OUT/<split>/<name>-NNNNNN.tar with a DALI index per tar, "
                    "a manifest.json per split, OUT/manifest.json and OUT/errors.jsonl. Re-running resumes and "
                    "gives byte-identical output.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Examples:\n"
               "  python -m preprocess data/UCF-101 shards/ucf101 --format ucf101 --annotations data/ucfTrainTestlist\n"
               "  python -m preprocess data/hmdb51 shards/hmdb51 --format hmdb51 --split 2\n"
               "  # a SLURM array of 16 jobs, then one merge:\n"
               "  python -m preprocess data/k400 shards/k400 --format kinetics --num-jobs 16 --job-index $SLURM_ARRAY_TASK_ID\n"
               "  python -m preprocess data/k400 shards/k400 --format kinetics --merge\n"
               "  # after copying shards elsewhere: check every tar, index, checksum and sample\n"
               "  python -m preprocess verify shards/k400   (see python -m preprocess verify --help)")
    p.add_argument("src", type=Path, help="dataset root folder (the layout --format describes)")
    p.add_argument("out", type=Path, help="output folder; gets <split>/ shard sets, manifest.json, errors.jsonl")
    g = p.add_argument_group("input")
    g.add_argument("--format", default="folders", choices=FORMATS,
                   help="input layout: folders = SRC/<class>/<video> (or SRC/{train,test}/<class>/<video>); "
                        "list = text files of 'path[ label]' or 'path,label' (--annotations); ucf101 / hmdb51 = "
                        "official split files; kinetics = annotations/<split>.csv; diving48 = Diving48_V2_*.json")
    g.add_argument("--split", type=int, default=1, choices=(1, 2, 3),
                   help="official train/test split number (ucf101, hmdb51)")
    g.add_argument("--annotations", type=Path, default=None,
                   help="annotation file or folder, when not in SRC or its official sub-folder")
    g.add_argument("--name", default=None, help="shard name prefix (default: the --format, or SRC's name for folders)")
    g = p.add_argument_group("encoding")
    g.add_argument("--codec", default="vp9", choices=fmt.WRITTEN_CODECS,
                   help="vp9 is decoded by DALI on CPU and GPU; h264 only on GPU (NVDEC)")
    g.add_argument("--short-side", type=int, default=256, help="scale so the shorter side is this (a multiple of "
                   "--align); the long side keeps the aspect, rounded to the nearest multiple of --align")
    g.add_argument("--align", type=int, default=16, help="both sides a multiple of this (default 16, the H.264/VP9 "
                   "block size: coded size = display size, so DALI's GPU decoder cache hits); 2 = sides only even, "
                   "as before this option")
    g.add_argument("--size", type=parse_size, default=None, metavar="WxH",
                   help="scale every video to exactly WxH instead (one coded size keeps DALI's GPU decoder cache hot)")
    g.add_argument("--gop", type=int, default=16, help="keyframe interval in frames (DALI decodes from the preceding keyframe)")
    g.add_argument("--crf", type=int, default=32, help="constant-quality level (lower = better and larger)")
    g.add_argument("--min-frames", type=int, default=16, help="skip videos with fewer frames than this")
    g.add_argument("--timeout", type=float, default=3600, help="seconds one video may take before it is skipped")
    g = p.add_argument_group("shards")
    g.add_argument("--shard-size-mb", type=float, default=1024, help="target shard size in MiB")
    g.add_argument("--max-per-shard", type=int, default=0, help="at most this many samples per shard (0 = no limit)")
    g.add_argument("--seed", type=int, default=0, help="seed of the deterministic shuffle across shards")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="videos transcoded in parallel")
    g.add_argument("--threads-per-video", type=int, default=1, help="ffmpeg threads per video")
    g.add_argument("--num-jobs", type=int, default=1, help="split the transcoding over this many array jobs")
    g.add_argument("--job-index", type=int, default=0, help="which of the --num-jobs parts this process does (0-based)")
    g.add_argument("--merge", action="store_true",
                   help="only pack: all videos must have been transcoded (by the array jobs); lists any that are not")
    g.add_argument("--retry-errors", action="store_true", help="try again the inputs an earlier run skipped")
    g.add_argument("--keep-work", action="store_true",
                   help="keep OUT/.work (the transcoded videos) after packing; by default it is removed")
    g.add_argument("--strict", action="store_true", help="exit non-zero if any input was skipped")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.epilog += ("\n\nOne run per OUT: a run holds OUT/.preprocess.lock (host, pid), array job i holds "
                 f"OUT/.preprocess.job-i-of-J.lock; a second run on the same OUT (or the same --job-index twice) "
                 f"exits with code {EXIT_LOCKED} naming the holder. A killed run's lock is taken over by the next run "
                 "on the same host; from another host, delete it once that run is known to be gone.")
    return p


def _work_paths(work: Path, key: str) -> tuple[Path, Path, Path]:
    return work / f"{key}.mp4", work / f"{key}.json", work / f"{key}.skip.json"


def check_alignment(short_side: int, size: tuple[int, int] | None, align: int) -> None:
    """--short-side / --size must be multiples of --align (an even number)."""
    if align < 2 or align % 2:
        raise LayoutError(f"--align {align}: give an even number (16: the codec block size; 2: sides only even)")
    sides = {"--size width": size[0], "--size height": size[1]} if size else {"--short-side": short_side}
    for name, v in sides.items():
        if v % align:
            lo, hi = v - v % align, v - v % align + align
            raise LayoutError(f"{name} {v} is not a multiple of --align {align}: a padded coded size makes DALI's GPU "
                              f"decoder cache miss on every sample; use {lo or hi} or {hi}, or --align 2 to accept it")


def _source_stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def transcode_one(v: Video, work: Path, enc: Encoding, timeout: float, retry: bool) -> tuple[str, str | None]:
    """Transcode one video into the work folder unless done already. Returns (status, reason)."""
    video, record, skip = _work_paths(work, v.key)
    stamp = _source_stamp(v.path)
    if record.is_file() and video.is_file():
        if json.loads(record.read_text()).get("_stamp") == stamp:
            return "done", None
    if skip.is_file() and not retry:
        s = json.loads(skip.read_text())
        if s.get("_stamp") == stamp:
            return "skipped", s["reason"]
    tmp = work / f".{v.key}.{os.getpid()}.tmp.mp4"
    try:
        meta = transcode(v.path, tmp, enc, timeout)
    except SkipVideo as e:
        tmp.unlink(missing_ok=True)
        atomic_write(skip, dump_json({"source": v.source, "split": v.split, "reason": str(e), "_stamp": stamp}))
        return "skipped", str(e)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, video)
    meta = {"source": v.source, "split": v.split, "label": v.label, **v.extra, **meta, "_stamp": stamp}
    atomic_write(record, dump_json(meta))   # the record is written last: its presence marks the video done
    skip.unlink(missing_ok=True)
    return "done", None


def run(args: argparse.Namespace) -> int:
    src, out = args.src.resolve(), args.out
    if not 0 <= args.job_index < args.num_jobs:
        raise LayoutError(f"--job-index {args.job_index} must be in 0..{args.num_jobs - 1} (--num-jobs {args.num_jobs})")
    ds = read_dataset(args.format, src, args.annotations, args.split)
    name = args.name or (src.name if args.format == "folders" else args.format)
    name = "".join(c if c.isalnum() or c in "_-" else "_" for c in name)
    check_alignment(args.short_side, args.size, args.align)
    enc = Encoding(codec=args.codec, short_side=args.short_side, size=args.size, gop=args.gop, crf=args.crf,
                   threads=args.threads_per_video, min_frames=args.min_frames, align=args.align)
    settings = {"encoding": enc.as_dict(), "format": args.format, "split": args.split, "name": name}
    if not ds.videos:
        print(f"error: no videos found in {src} for --format {args.format}", file=sys.stderr)
        return 1

    out.mkdir(parents=True, exist_ok=True)
    with hold_out(out, args):
        return transcode_and_pack(ds, out, name, enc, settings, args)


def hold_out(out: Path, args: argparse.Namespace) -> Lock:
    """The lock of this run on OUT (preprocess/lock.py): an array part holds its own part's lock and refuses while a
    whole run (or --merge) holds OUT; a whole run holds OUT and refuses while any part runs."""
    part = args.num_jobs > 1 and not args.merge
    lock = Lock(out, job_lock_name(args.job_index, args.num_jobs) if part else MAIN_LOCK).acquire()
    others = live_holders(out, MAIN_LOCK if part else ".preprocess.job-*.lock")
    if others:
        lock.release()
        path, holder = others[0]
        what = "a whole run (or --merge)" if part else f"{len(others)} array job part(s), e.g."
        raise LockedError(f"{out} is being written by {what} {describe(holder, path)}: wait until "
                          f"{'it is' if part else 'all parts are'} done ({path}) and run again (it resumes)")
    return lock


def transcode_and_pack(ds, out: Path, name: str, enc: Encoding, settings: dict, args: argparse.Namespace) -> int:
    work = out / WORK
    work.mkdir(exist_ok=True)
    settings_file = work / "settings.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        if old != json.loads(dump_json(settings)):
            raise LayoutError(f"{out} was started with other settings ({old}); use a new OUT folder or delete "
                              f"{work} to start over")
    else:
        atomic_write(settings_file, dump_json(settings))

    mine = [v for i, v in enumerate(sorted(ds.videos, key=lambda v: v.source)) if i % args.num_jobs == args.job_index]
    if args.merge:
        missing = [v.source for v in mine if not _work_paths(work, v.key)[1].is_file()
                   and not _work_paths(work, v.key)[2].is_file()]
        if missing:
            print(f"error: --merge: {len(missing)} videos are not transcoded yet, e.g. {missing[:5]}; run the "
                  "array jobs (or this command without --merge) first", file=sys.stderr)
            return 1
    else:
        n_skip = 0
        bar = tqdm(total=len(mine), desc=f"transcode {name}" + (f" job {args.job_index}/{args.num_jobs}" if args.num_jobs > 1 else ""),
                   unit="video", disable=args.no_progress, dynamic_ncols=True)
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            futures = [pool.submit(transcode_one, v, work, enc, args.timeout, args.retry_errors) for v in mine]
            try:
                for f in as_completed(futures):
                    status, _ = f.result()
                    n_skip += status == "skipped"
                    bar.set_postfix(skipped=n_skip, refresh=False)
                    bar.update()
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        bar.close()
        if args.num_jobs > 1:
            print(f"job {args.job_index}/{args.num_jobs}: {len(mine) - n_skip} videos transcoded, {n_skip} skipped; "
                  "when all jobs are done, pack with the same command and --merge (no --num-jobs)")
            return 0
    return pack(ds, out, work, name, enc, args)


def pack(ds, out: Path, work: Path, name: str, enc: Encoding, args) -> int:
    errors = [{"source": s, "split": None, "reason": r} for s, r in ds.missing]
    by_split: dict[str, dict[str, dict]] = {}
    skipped_by_split: dict[str, int] = {}
    for v in ds.videos:
        video, record, skip = _work_paths(work, v.key)
        if record.is_file():
            rec = json.loads(record.read_text())
            rec.pop("_stamp", None)
            rec["label_name"] = ds.classes[v.label] if v.label >= 0 else None
            by_split.setdefault(v.split, {})[v.key] = rec
        else:
            s = json.loads(skip.read_text())
            errors.append({"source": v.source, "split": v.split, "reason": s["reason"]})
            skipped_by_split[v.split] = skipped_by_split.get(v.split, 0) + 1
    errors.sort(key=lambda e: e["source"])
    remove_stale_temps(out)
    atomic_write(out / "errors.jsonl", "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in errors))

    splits = {}
    for split in sorted(set(by_split) | set(skipped_by_split)):
        records = by_split.get(split, {})
        if not records:
            continue
        m = pack_split(out, name, split, records, lambda k: _work_paths(work, k)[0], ds.classes, enc.as_dict(),
                       args.seed, int(args.shard_size_mb * 2**20), args.max_per_shard, skipped_by_split.get(split, 0))
        splits[split] = {"dir": split, "samples": m["num_samples"], "frames": m["num_frames"],
                         "bytes": m["num_bytes"], "shards": len(m["shards"]), "skipped": m["num_skipped"]}
    top = {"format_version": fmt.FORMAT_VERSION, "tool": TOOL, "dataset": name, "format": args.format,
           "official_split": args.split, "classes": ds.classes, "encoding": enc.as_dict(), "shuffle_seed": args.seed,
           "splits": splits, "num_errors": len(errors), "errors_file": "errors.jsonl"}
    atomic_write(out / fmt.MANIFEST, dump_json(top))
    if not args.keep_work and splits:
        shutil.rmtree(work)
    print_summary(top, errors)
    if not splits:
        print(f"error: no usable video in {args.src}: all {len(errors)} inputs were skipped, see {out / 'errors.jsonl'}",
              file=sys.stderr)
        return 1
    if args.strict and errors:
        print(f"error: --strict and {len(errors)} inputs were skipped, see {out / 'errors.jsonl'}", file=sys.stderr)
        return 1
    return 0


def print_summary(top: dict, errors: list[dict]) -> None:
    print(f"\n{top['dataset']}: {len(top['classes'])} classes, codec {top['encoding']['codec']}, "
          f"GOP {top['encoding']['gop']}, short side {top['encoding']['short_side']}")
    print(f"{'split':<8}{'videos':>8}{'frames':>10}{'shards':>8}{'MiB':>10}{'skipped':>9}")
    for split, s in top["splits"].items():
        print(f"{split:<8}{s['samples']:>8}{s['frames']:>10}{s['shards']:>8}{s['bytes'] / 2**20:>10.1f}{s['skipped']:>9}")
    if errors:
        print(f"{len(errors)} inputs skipped or missing (reasons in errors.jsonl), e.g.:")
        for e in errors[:5]:
            print(f"  {e['source']}: {e['reason']}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["verify"]:   # `python -m preprocess verify OUT`: check a (copied) shard set
        from .verify import main as verify_main
        return verify_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LockedError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_LOCKED
    except OSError as e:
        if e.errno == 28:   # ENOSPC: finished videos are kept in OUT/.work; a re-run continues from them
            print(f"error: {e.strerror or e}: free space and re-run the same command (it resumes)", file=sys.stderr)
            return 1
        raise
    except KeyboardInterrupt:
        print("\ninterrupted: re-run the same command to resume", file=sys.stderr)
        return 130
