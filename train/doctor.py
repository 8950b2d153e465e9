"""`python -m train doctor`: the preflight. Proves that a machine (or a cluster node) can run a recipe, on its
own data, in a minute or two, by running the real code path on a few samples, not just listing versions.

    python -m train doctor --config k400_i3d_fima [key=value ...] [--samples N] [--only a,b] [--skip a,b]
                           [--json PATH] [--memory-limit-gib X]
    torchrun --nproc-per-node=8 -m train doctor --config k400_i3d_fima        # + the all-reduce across ranks

It takes the trainer's `--config` and `key=value` overrides (an unknown key is the trainer's config error,
exit 2), prints a table (check, status, measured figure, what to do) and then one JSON line with every
measured figure (also written to `--json PATH`). Exit status: 0 when no check FAILs, 1 when one does (FAIL
means the run as configured would not work; WARN means it would, slower or riskier), 2 for bad arguments.

Checks (names for --only/--skip; a group name selects all of its checks):
  env      python, torch (+CUDA build), DALI (+its CUDA major; must match torch's), NVIDIA driver, GPUs,
           ffmpeg (+libvpx-vp9/libx264 encoders), free disk where out_dir goes, /dev/shm and memlock
  data     manifest/tar/index agreement over every shard (arithmetic on the indexes, plus the tar header in
           front of each member wherever the index does not describe a contiguous tar), N samples read
           in full (lbl/nf/JSON/manifest/MP4 agree), read throughput vs what training consumes
  decode   codec vs backend, one coded size (GPU decoder cache), N samples through the real pipeline on
           the CPU backend and (with a GPU) the mixed backend, CPU-vs-GPU frame agreement
  train    forward/backward of the configured objective: fp32 and bf16 (+channels_last_3d on a GPU), finite
           and agreeing losses, step time, peak memory and the largest batch that fits
  dist     under torchrun: an all-reduce across all ranks (NCCL on GPU, gloo on CPU), its bandwidth and the
           rendezvous settings; one process: skipped

Under torchrun every rank runs the all-reduce first; then local rank 0 of each node runs the other checks
on that node (its GPU 0, its filesystem) and prints the table; the other ranks exit with their all-reduce
status.

Without a GPU the GPU checks report SKIP with the reason. On a CPU the training step runs at batch 2 (a batch-8 FIMA
step takes tens of seconds on two cores; batch 1 would leave BatchNorm one value on small feature maps) and a
forward at batch 1 (or 3) gives the second point of the memory fit: the step time at the configured batch is
extrapolated linearly, and memory is estimated from what the step allocates (weights, gradients, SGD
momentum, inputs, and the tensors autograd saves for backward, measured with saved_tensors_hooks), fitted
linearly in the batch size; `--memory-limit-gib` simulates a device of that size. On a GPU both come from
real steps at the configured batch (torch.cuda.max_memory_allocated), and the largest batch is searched by
running it. bf16 on a CPU runs under CPU autocast without channels_last_3d (a GPU layout); there a
non-finite or disagreeing bf16 loss is only a WARN unless this CPU is what trains in bf16. Losses are compared
per term (tolerance 5% of max(1, |fp32|)); a term behind a discrete selection (FIMA's dense term: a median-
thresholded foreground mask) is left out of the comparison when its selection count differs.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, load_config, presets

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

# name -> what it checks (table order = this order)
CHECKS: dict[str, str] = {
    "env.python": "Python version",
    "env.torch": "torch version and its CUDA build",
    "env.dali": "DALI version, its CUDA major, and whether it matches torch's",
    "env.driver": "NVIDIA driver version vs the CUDA majors of torch and DALI",
    "env.gpus": "GPUs with memory; enough of them for the processes per node",
    "env.ffmpeg": "the ffmpeg binary (sharding) and its libvpx-vp9 / libx264 encoders",
    "env.disk": "free and writable disk where out_dir (checkpoints, logs) goes",
    "env.shm": "/dev/shm size and the memlock limit (pinned memory on GPU nodes)",
    "data.shards": "manifest, tars and DALI indexes agree (every shard)",
    "data.samples": "N samples read in full: lbl / nf / JSON / manifest / MP4 agree",
    "data.read": "read throughput (MB/s, videos/s) vs what training consumes",
    "decode.codec": "the shards' codec can be decoded by the configured backend",
    "decode.cache": "one coded size across samples, both sides multiples of 16 (DALI reuses GPU decoders only then)",
    "decode.cpu": "N samples through the real pipeline, CPU backend: videos/s",
    "decode.gpu": "N samples through the real pipeline, mixed (NVDEC) backend: videos/s",
    "decode.match": "CPU and GPU decoded frames agree",
    "train.step": "one forward/backward/update of the configured objective: loss, time, memory",
    "train.bf16": "fp32 vs bf16 (+channels_last_3d on GPU): finite losses that agree",
    "train.batch": "the largest batch that fits in memory (or --memory-limit-gib)",
    "dist.allreduce": "all-reduce across all ranks (under torchrun): result, bandwidth, rendezvous",
}
GROUPS = ("env", "data", "decode", "train", "dist")
# execution order: the all-reduce first (every rank), then what later checks reuse
RUN_ORDER = ("dist.allreduce", "env.python", "env.torch", "env.dali", "env.driver", "env.gpus", "env.ffmpeg",
             "env.shm", "data.shards", "data.samples", "decode.codec", "decode.cache", "decode.cpu", "decode.gpu",
             "decode.match", "train.step", "train.bf16", "train.batch", "data.read", "env.disk")

# tolerances, stated once (they are printed with the figures)
FRAME_TOL_MEAN, FRAME_TOL_P99, FRAME_FAIL_MEAN = 3.0, 32.0, 12.0   # |CPU - GPU| on the 0-255 scale
LOSS_RTOL = 0.05              # |bf16 - fp32| <= 5 % of max(1, |fp32|): bf16 keeps 8 bits of mantissa
ASSUMED_GPU_VIDEOS_PER_S = 50.0   # per GPU, when no training step was measured (a bf16 I3D step on a
                                  # current GPU consumes tens of videos/s; DESIGN §8: ~20 clips/s/GPU in fp32)
DRIVER_FOR_CUDA = {13: 580, 12: 525, 11: 450}   # minimum driver branch per CUDA major
GiB, MiB = 2 ** 30, 2 ** 20


class Skip(Exception):
    """The check does not apply here; the message says why."""


class Fail(Exception):
    """The check failed; args = (figure, what to do[, measured])."""


@dataclass
class Result:
    name: str
    status: str
    figure: str = ""
    fix: str = ""                      # what to do (FAIL/WARN), or why (SKIP)
    measured: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"status": self.status, "figure": self.figure, "fix": self.fix, "measured": self.measured,
                "seconds": round(self.seconds, 3)}


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"


# --------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    checks = "\n".join(f"  {k:<15} {v}" for k, v in CHECKS.items())
    p = argparse.ArgumentParser(
        prog="python -m train doctor", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Preflight: run the recipe's real path (shards, DALI decode, a training step, an all-reduce) "
                    "on a few samples and say what is wrong and what to do.\n"
                    "Exit status: 0 = no FAIL, 1 = a check the run needs failed, 2 = bad arguments or config.\n"
                    "Under torchrun (or docker/entrypoint.sh doctor) it also checks the all-reduce across ranks.",
        epilog=f"checks (--only/--skip take these names or the groups {', '.join(GROUPS)}):\n{checks}\n\n"
               f"presets: {', '.join(presets())}; config keys: see `python -m train --help`.")
    p.add_argument("--config", default=None, help="a preset name or a YAML file, as for `python -m train`")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="samples to read and decode (default 8)")
    p.add_argument("--only", action="append", default=[], metavar="A,B", help="run only these checks or groups")
    p.add_argument("--skip", action="append", default=[], metavar="A,B", help="leave out these checks or groups")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report here")
    p.add_argument("--memory-limit-gib", type=float, default=None, metavar="X",
                   help="memory budget for train.batch (GiB): simulates a device of this size (default: the "
                        "GPU's memory, or the available RAM on a CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data=OUT/train")
    return p


def select(only: list[str], skip: list[str]) -> list[str]:
    """Check names from --only/--skip (comma lists of check or group names); ValueError for unknown names."""
    def expand(items):
        names = []
        for item in items:
            for part in filter(None, (s.strip() for s in item.split(","))):
                if part in CHECKS:
                    names.append(part)
                elif part in GROUPS:
                    names += [k for k in CHECKS if k.startswith(part + ".")]
                else:
                    raise ValueError(f"unknown check {part!r}; checks: {', '.join(CHECKS)}; groups: {', '.join(GROUPS)}")
        return names
    chosen = set(expand(only)) if only else set(CHECKS)
    chosen -= set(expand(skip))
    return [k for k in CHECKS if k in chosen]


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        selected = select(args.only, args.skip)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.samples < 1:
        print("error: --samples must be at least 1", file=sys.stderr)
        return 2
    if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
        print("error: --memory-limit-gib must be positive", file=sys.stderr)
        return 2
    doc = Doctor(cfg, selected, samples=args.samples, memory_limit_gib=args.memory_limit_gib, preset=args.config)
    return doc.run(json_path=args.json)


# --------------------------------------------------------------------------------------------- the checks


class Doctor:
    def __init__(self, cfg: dict, selected: list[str], samples: int = 8, memory_limit_gib: float | None = None,
                 preset: str | None = None):
        import torch
        self.torch = torch
        self.cfg, self.selected, self.n, self.limit_gib, self.preset = cfg, selected, samples, memory_limit_gib, preset
        self.results: dict[str, Result] = {}
        self.cuda = torch.cuda.is_available()
        self.use_cuda = self.cuda and cfg["backend"] != "cpu"           # exactly the trainer's rule
        self.run_backend = cfg["backend"] if cfg["backend"] != "auto" else ("gpu" if self.use_cuda else "cpu")
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.device = torch.device("cuda", self.local_rank) if self.use_cuda else torch.device("cpu")
        self._cache: dict = {}

    # ------------------------------------------------------------------ driver
    def run(self, json_path: str | None = None) -> int:
        t_start = time.perf_counter()
        torchrun = "RANK" in os.environ
        for name in RUN_ORDER:
            if name not in self.selected:
                continue
            if torchrun and self.local_rank != 0 and name != "dist.allreduce":
                continue
            self._run_check(name)
        if torchrun and self.local_rank != 0:   # the node's checks run on local rank 0
            r = self.results.get("dist.allreduce")
            if r and r.status == FAIL:
                print(f"rank {self.rank}: dist.allreduce FAIL: {r.figure}: {r.fix}", file=sys.stderr)
                return 1
            return 0
        self._finalise()
        failed = [r.name for r in self.results.values() if r.status == FAIL]
        code = 1 if failed else 0
        report = {
            "doctor": 1, "ok": not failed, "exit_code": code, "failed": failed,
            "host": socket.gethostname(), "rank": self.rank, "world_size": self.world,
            "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
            "elapsed_s": round(time.perf_counter() - t_start, 2),
            "config": {"preset": self.preset, **{k: self.cfg[k] for k in (
                "data", "backend", "objective", "backbone", "frames", "stride", "crop", "batch_size", "precision",
                "channels_last", "num_threads", "out_dir")}, "run_backend": self.run_backend},
            "samples": self.n, "memory_limit_gib": self.limit_gib,
            "tolerances": {"frames_mean_abs_0_255": FRAME_TOL_MEAN, "frames_p99_abs_0_255": FRAME_TOL_P99,
                           "loss_rtol": LOSS_RTOL},
            "checks": {k: self.results[k].to_json() for k in CHECKS if k in self.results},
        }
        self._print_table(report)
        line = json.dumps(report, separators=(",", ":"), default=str)
        print(line, flush=True)
        if json_path:
            path = Path(json_path)
            if torchrun and self.rank != 0:     # one file per node (local rank 0 of each)
                path = path.with_name(f"{path.stem}.rank{self.rank}{path.suffix}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(report, indent=1, default=str) + "\n")
        return code

    def _run_check(self, name: str) -> None:
        t0 = time.perf_counter()
        fn = getattr(self, "check_" + name.replace(".", "_"))
        try:
            res = fn()
        except Skip as e:
            res = Result(name, SKIP, fix=str(e))
        except Fail as e:
            figure, fix, measured = (e.args + ("", "", {}))[:3]
            res = Result(name, FAIL, figure, fix, dict(measured))
        except Exception as e:   # a check never takes the others down: report it, with the traceback on stderr
            traceback.print_exc(file=sys.stderr)
            res = Result(name, FAIL, f"{type(e).__name__}: {e}",
                         "unexpected error (traceback on stderr): fix the cause above, or report it with that trace")
        res.name = name
        res.seconds = time.perf_counter() - t0
        self.results[name] = res

    def _print_table(self, report: dict) -> None:
        rows = [(k, r.status, r.figure, r.fix) for k, r in ((k, self.results[k]) for k in CHECKS if k in self.results)]
        width = max(100, shutil.get_terminal_size((160, 20)).columns)
        fig_w = max(66, int((width - 26) * 0.55))
        fix_w = max(40, width - 16 - 7 - fig_w - 3)
        cfg = report["config"]
        print(f"motionpretrain doctor on {report['host']}: {cfg['objective']}/{cfg['backbone']} "
              f"{cfg['frames']}x{cfg['crop']}^2, batch {cfg['batch_size']}, {cfg['precision']}, backend "
              f"{cfg['backend']} (runs as {cfg['run_backend']}), data={cfg['data'] or '(none)'}, N={self.n}; "
              f"CPU load {report['load_avg']:.1f} on {report['cpus']} cores")
        print(f"{'check':<16}{'status':<7}{'measured':<{fig_w}} | what to do")
        print("-" * min(width, 16 + 7 + fig_w + 3 + fix_w))
        for name, status, figure, fix in rows:
            f_lines = textwrap.wrap(figure, fig_w) or [""]
            x_lines = textwrap.wrap(fix, fix_w) or [""]
            for i in range(max(len(f_lines), len(x_lines))):
                a = f_lines[i] if i < len(f_lines) else ""
                b = x_lines[i] if i < len(x_lines) else ""
                head = f"{name:<16}{status:<7}" if i == 0 else " " * 23
                print(f"{head}{a:<{fig_w}} | {b}".rstrip())
        counts = {s: sum(r[1] == s for r in rows) for s in (PASS, WARN, FAIL, SKIP)}
        verdict = "FAILED: the run as configured would not work (see FAIL rows)" if counts[FAIL] else "ok"
        print(f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skipped in "
              f"{report['elapsed_s']:.1f} s: {verdict}")

    # ------------------------------------------------------------------ helpers
    def _no_cuda_reason(self) -> str:
        torch = self.torch
        if self.cuda:
            return ""
        if torch.version.cuda is None:
            return f"no CUDA device: torch {torch.__version__} is a CPU-only build"
        cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
        if cvd is not None and cvd.strip() in ("", "-1", "none", "NoDevFiles"):
            return f"no CUDA device: CUDA_VISIBLE_DEVICES={cvd!r} hides every GPU"
        return "no CUDA device: torch.cuda.is_available() is False (no GPU visible, or no working driver)"

    def _gpu_skip(self, what: str) -> None:
        """Raise the right outcome for a GPU-only check on a machine without a usable GPU."""
        why = self._no_cuda_reason()
        if self.cfg["backend"] == "gpu":
            raise Fail(why, f"backend=gpu needs a CUDA device for {what}: run on a GPU node (check `nvidia-smi`, the "
                       "container's --gpus flag), or set backend=cpu (VP9 shards)")
        if self.cfg["backend"] == "auto" and _has_nvidia_driver() and "CUDA_VISIBLE_DEVICES" not in why:
            raise Fail(why + ", but an NVIDIA driver is loaded",
                       "backend=auto would silently train on the CPU: install a CUDA build of torch for this driver "
                       "(see env.torch, env.driver), or set backend=cpu on purpose")
        raise Skip(why)

    def _cuda_majors(self) -> tuple[int | None, int | None, str]:
        """(torch's CUDA major, DALI's CUDA major, DALI distribution name)."""
        torch_major = int(self.torch.version.cuda.split(".")[0]) if self.torch.version.cuda else None
        dali_major, dist_name = None, ""
        from importlib import metadata
        for d in metadata.distributions():
            name = (d.metadata.get("Name") or "").lower()
            m = re.fullmatch(r"nvidia-dali(?:-nightly)?-cuda(\d+)", name)
            if m:
                dist_name, dali_major = name, int(m.group(1)) // 10
                break
        if dali_major is None:
            try:
                import nvidia.dali as dali
                v = int(getattr(dali, "__cuda_version__", 0) or 0)
                dali_major = v // 1000 if v else None
            except ImportError:
                pass
        return torch_major, dali_major, dist_name

    def _data_dir(self) -> Path:
        if not self.cfg["data"]:
            raise Fail("no data configured", "set data=OUT/train (a shard set written by `python -m preprocess`)")
        return Path(self.cfg["data"])

    def _shards(self) -> dict:
        """Manifest, tar paths and parsed indexes of the configured shard set (cached). Raises Fail with what
        to do; a check other than data.shards turns that into SKIP when data.shards already reported it."""
        if "shards" in self._cache:
            ok, value = self._cache["shards"]
            if ok:
                return value
            if "data.shards" in self.selected:
                raise Skip(f"needs the shard set: {value[0]} (see data.shards)")
            raise Fail(*value)
        from preprocess import shard_format as fmt
        try:
            data = self._data_dir()
            try:
                manifest = fmt.load_manifest(data)
            except (FileNotFoundError, ValueError) as e:
                raise Fail(f"no usable shard set at {data}", str(e))
            listed = manifest["shards"]
            missing = [s["file"] for s in listed
                       for f in (data / s["file"], fmt.index_path(data / s["file"])) if not f.is_file()]
            try:
                tars = fmt.shard_paths(data, manifest)
            except FileNotFoundError as e:
                names = sorted(set(Path(m).stem for m in missing))
                raise Fail(f"{len(names)} of {len(listed)} shards listed in manifest.json missing or without index "
                           f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})", str(e))
            indexes = []
            for shard, tar in zip(listed, tars):
                idx = fmt.index_path(tar)
                try:
                    indexes.append(fmt.read_index(idx))
                except (ValueError, IndexError) as e:
                    raise Fail(f"{idx.name}: unreadable index", f"{idx}: {e}: re-run `python -m preprocess` on this "
                               "set (it resumes and rewrites the index), or copy the shard folder again")
        except Fail as e:
            self._cache["shards"] = (False, (e.args + ("", ""))[:2])
            raise
        value = {"dir": data, "manifest": manifest, "tars": tars, "indexes": indexes}
        self._cache["shards"] = (True, value)
        return value

    def _pick(self, counts: list[int]) -> list[tuple[int, int]]:
        """N (shard, position) pairs spread evenly over the whole set."""
        total = sum(counts)
        n = min(self.n, total)
        flat = sorted({round(i * (total - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [0]
        starts, acc = [], 0
        for c in counts:
            starts.append(acc)
            acc += c
        out = []
        for g in flat:
            t = max(i for i, s in enumerate(starts) if s <= g and counts[i] > 0)
            out.append((t, g - starts[t]))
        return out

    def _samples(self) -> dict:
        """The N sampled samples read in full, with everything that disagrees (cached)."""
        if "samples" in self._cache:
            return self._cache["samples"]
        import numpy as np
        from pipeline.container import parse_mp4
        from preprocess import shard_format as fmt
        s = self._shards()
        manifest, tars, indexes = s["manifest"], s["tars"], s["indexes"]
        records = {r.get("key"): r for r in manifest.get("samples") or [] if isinstance(r, dict)}
        n_classes = len(manifest.get("classes") or [])
        infos, problems = [], []
        for t, j in self._pick([len(ix) for ix in indexes]):
            tar, comps = tars[t], indexes[t][j]
            where = f"{tar.name} sample {j}"
            fd = os.open(tar, os.O_RDONLY)
            try:
                keys = set()
                for ext, (off, size) in comps.items():
                    hdr = _tar_header(fd, off)
                    if hdr is None or not hdr[0].endswith("." + ext) or hdr[1] != size:
                        problems.append(f"{where}: the index's {ext} offset {off} does not point at its tar member "
                                        f"(found {'no tar header' if hdr is None else repr(hdr[0]) + f', {hdr[1]} bytes'})")
                    else:
                        keys.add(fmt.sample_key(hdr[0]).rsplit("/", 1)[-1])
                lo = min(o for o, _ in comps.values())
                hi = max(o + z for o, z in comps.values())
                span = os.pread(fd, hi - lo, lo)
            finally:
                os.close(fd)
            if len(keys) > 1:
                problems.append(f"{where}: its members belong to different samples {sorted(keys)}")
            part = {ext: span[o - lo:o - lo + z] for ext, (o, z) in comps.items()}
            info = {"shard": t, "pos": j, "key": next(iter(keys)) if len(keys) == 1 else "", "bytes": hi - lo,
                    "tar": str(tar), "lo": lo, "hi": hi}
            try:
                info["label"] = fmt.unpack_int32(part[fmt.LABEL_EXT])
                info["nf"] = fmt.unpack_int32(part[fmt.FRAMES_EXT])
            except (KeyError, ValueError) as e:
                problems.append(f"{where}: lbl/nf unreadable ({e})")
                infos.append(info)
                continue
            meta = {}
            if fmt.META_EXT in part:
                try:
                    meta = json.loads(part[fmt.META_EXT])
                except ValueError as e:
                    problems.append(f"{where}: its JSON record does not parse ({e})")
            try:
                track = parse_mp4(np.frombuffer(part[fmt.VIDEO_EXT], dtype=np.uint8)) if fmt.VIDEO_EXT in part else None
            except Exception as e:
                track = None
                problems.append(f"{where}: the video is not a readable MP4 ({type(e).__name__}: {e})")
            info.update(codec=track.codec if track else "", width=track.width if track else meta.get("width"),
                        height=track.height if track else meta.get("height"),
                        stream_frames=track.num_samples if track else None)
            if "label" in meta and meta["label"] != info["label"]:
                problems.append(f"{where}: lbl {info['label']} but the JSON record says label {meta['label']}")
            if "frames" in meta and meta["frames"] != info["nf"]:
                problems.append(f"{where}: nf {info['nf']} but the JSON record says {meta['frames']} frames")
            if track is not None and track.num_samples and track.num_samples < info["nf"]:
                problems.append(f"{where}: nf {info['nf']} but the MP4 holds {track.num_samples} frames")
            if track is not None and meta.get("width") and (meta["width"], meta["height"]) != (track.width, track.height):
                problems.append(f"{where}: JSON says {meta['width']}x{meta['height']}, the MP4 is "
                                f"{track.width}x{track.height}")
            if n_classes and not -1 <= info["label"] < n_classes:
                problems.append(f"{where}: label {info['label']} outside the manifest's {n_classes} classes")
            rec = records.get(info["key"])
            if records and info["key"]:
                if rec is None:
                    problems.append(f"{where}: key {info['key']!r} is not in the manifest")
                else:
                    if rec.get("shard", t) != t:
                        problems.append(f"{where}: the manifest puts {info['key']!r} in shard {rec['shard']}")
                    if rec.get("label", info["label"]) != info["label"]:
                        problems.append(f"{where}: lbl {info['label']}, the manifest says {rec['label']}")
                    if rec.get("frames", info["nf"]) != info["nf"]:
                        problems.append(f"{where}: nf {info['nf']}, the manifest says {rec['frames']}")
            infos.append(info)
        value = {"infos": infos, "problems": problems}
        self._cache["samples"] = value
        return value

    def _aug(self):
        """The trainer's AugConfig for this config."""
        from .recipe import aug_config
        return aug_config(self.cfg)

    def _decode(self, backend: str, outputs=None) -> dict:
        """N samples through pretrain_loader on `backend` (cached): the batch and the timings."""
        key = ("decode", backend, outputs)
        if key in self._cache:
            return self._cache[key]
        torch = self.torch
        from pipeline import pretrain_loader
        c = self.cfg
        bs = max(1, self.n // 2)
        nb = math.ceil(self.n / bs)
        gpu = backend == "gpu"
        # what the configured objective requires (the model is the contract), as the trainer asks for it
        want = outputs or tuple(self._template().required_inputs)
        loader = pretrain_loader(c["data"], want, batch_size=bs, config=self._aug(), seed=c["seed"],
                                 backend=backend, device_id=self.local_rank if gpu else None,
                                 num_threads=c["num_threads"], prefetch=1)
        try:
            nb = min(nb, len(loader))
            batches, times = [], []
            it = iter(loader)
            t0 = time.perf_counter()
            for _ in range(nb):
                batches.append(next(it))
                if gpu:
                    torch.cuda.synchronize(self.device)
                t1 = time.perf_counter()
                times.append(t1 - t0)
                t0 = t1
            short = loader.stats["short"]
        finally:
            loader.close()
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        videos = bs * len(batches)
        if len(times) > 1:   # the first batch includes building the pipeline
            vps = bs * (len(times) - 1) / sum(times[1:])
        else:
            vps = videos / times[0]
        value = {"batch": batch, "videos": videos, "batch_size": bs, "first_s": times[0], "vps": vps,
                 "steady": len(times) > 1, "short": int(short)}
        self._cache[key] = value
        return value

    # ------------------------------------------------------------------ env
    def check_env_python(self) -> Result:
        v = sys.version_info
        fig = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
        if v < (3, 11):
            raise Fail(fig, "this project needs Python >= 3.11 (pyproject.toml): use the image or a newer venv")
        return Result("", PASS, fig, measured={"version": platform.python_version()})

    def check_env_torch(self) -> Result:
        torch = self.torch
        m = {"version": torch.__version__, "cuda": torch.version.cuda,
             "cudnn": torch.backends.cudnn.version() if torch.version.cuda else None}
        if torch.version.cuda is None:
            fig = f"torch {torch.__version__}, CPU-only build"
            if self.cfg["backend"] == "gpu" or _has_nvidia_driver():
                raise Fail(fig, "a GPU run needs a CUDA build of torch: pip install torch==" +
                           torch.__version__.split("+")[0] + " --index-url https://download.pytorch.org/whl/cu130 "
                           "(the cuXYZ matching DALI's CUDA major), or use the project's image", m)
            return Result("", PASS, fig + " (fine for backend=cpu)", measured=m)
        fig = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {m['cudnn']}"
        if self.cuda:
            try:
                m["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
                fig += f", NCCL {m['nccl']}"
            except Exception:
                pass
        return Result("", PASS, fig, measured=m)

    def check_env_dali(self) -> Result:
        try:
            import nvidia.dali as dali
        except ImportError as e:
            raise Fail(f"DALI not importable ({e})", "pip install nvidia-dali-cuda130==2.4.0 (the CUDA major of "
                       "torch; pyproject.toml pins it), from https://pypi.nvidia.com")
        torch_major, dali_major, dist_name = self._cuda_majors()
        m = {"version": dali.__version__, "cuda_major": dali_major, "package": dist_name, "torch_cuda_major": torch_major}
        fig = f"DALI {dali.__version__} ({dist_name or 'package name unknown'}, CUDA {dali_major})"
        if torch_major is None:
            return Result("", PASS, fig + "; torch is CPU-only, majors not compared", measured=m)
        if dali_major is None:
            return Result("", WARN, fig, f"cannot tell DALI's CUDA major: make sure it is {torch_major} "
                          f"(nvidia-dali-cuda{torch_major}0)", measured=m)
        if dali_major != torch_major:
            status = FAIL if self.use_cuda or self.cfg["backend"] == "gpu" else WARN
            return Result("", status, fig + f" vs torch CUDA {torch_major}: mismatch",
                          f"install the DALI build for CUDA {torch_major}: pip uninstall {dist_name}; pip install "
                          f"--extra-index-url https://pypi.nvidia.com nvidia-dali-cuda{torch_major}0 (or torch built "
                          f"for CUDA {dali_major})", measured=m)
        return Result("", PASS, fig + f" = torch CUDA {torch_major}", measured=m)

    def check_env_driver(self) -> Result:
        version = _driver_version()
        if version is None:
            why = "no CUDA device: no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi)"
            if self.cfg["backend"] == "gpu":
                raise Fail(why, "backend=gpu needs the NVIDIA driver: run on a GPU node (docker: --gpus all)")
            raise Skip(why)
        torch_major, dali_major, _ = self._cuda_majors()
        majors = [m for m in (torch_major, dali_major) if m]
        need = max((DRIVER_FOR_CUDA.get(m, 0) for m in majors), default=0)
        branch = int(version.split(".")[0])
        m = {"version": version, "needs": need, "cuda_majors": majors}
        fig = f"driver {version}" + (f" (CUDA {max(majors)} needs R{need}+)" if need else "")
        if need and branch < need:
            older = [k for k, v in sorted(DRIVER_FOR_CUDA.items()) if v <= branch]
            raise Fail(fig, f"the driver is too old for CUDA {max(majors)}: update it to R{need} or newer, or use "
                       f"torch and DALI built for CUDA {older[-1] if older else '<older>'} "
                       f"(e.g. nvidia-dali-cuda{older[-1] if older else 12}0)", m)
        return Result("", PASS, fig, measured=m)

    def check_env_gpus(self) -> Result:
        torch = self.torch
        if not self.cuda:
            self._gpu_skip("training")
        n = torch.cuda.device_count()
        gpus, busy = [], []
        for i in range(n):
            p = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append({"index": i, "name": p.name, "total_bytes": total, "free_bytes": free,
                         "capability": f"{p.major}.{p.minor}"})
            if free < 0.9 * total:
                busy.append(f"GPU {i}: {_gib(total - free)} already in use")
        names = sorted({g["name"] for g in gpus})
        fig = f"{n}x {', '.join(names)} ({_gib(gpus[0]['total_bytes'])} each, {_gib(gpus[0]['free_bytes'])} free on 0)"
        m = {"count": n, "gpus": gpus}
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if procs > n:
            raise Fail(fig, f"torchrun starts {procs} processes per node but only {n} GPUs are visible: "
                       f"--nproc-per-node={n} (NPROC_PER_NODE), or check CUDA_VISIBLE_DEVICES / --gpus", m)
        if busy:
            return Result("", WARN, fig, "; ".join(busy) + ": another process holds GPU memory (nvidia-smi)", m)
        return Result("", PASS, fig, measured=m)

    def check_env_ffmpeg(self) -> Result:
        from preprocess.video import ffmpeg_exe
        try:
            exe = ffmpeg_exe()
            version = subprocess.run([exe, "-hide_banner", "-version"], capture_output=True, text=True,
                                     timeout=30).stdout.splitlines()[0]
            encoders = subprocess.run([exe, "-hide_banner", "-encoders"], capture_output=True, text=True,
                                      timeout=30).stdout
        except Exception as e:
            return Result("", WARN, f"no usable ffmpeg ({type(e).__name__}: {e})",
                          "only sharding (`python -m preprocess`) needs it: pip install imageio-ffmpeg, apt-get install "
                          "ffmpeg, or set FFMPEG_BINARY")
        have = {enc: bool(re.search(rf"^\s*V\S*\s+{re.escape(enc)}\s", encoders, re.M)) for enc in ("libvpx-vp9", "libx264")}
        m = {"path": exe, "version": version, **{f"encoder_{k}": v for k, v in have.items()}}
        fig = f"{version.split(' Copyright')[0]}; " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in have.items())
        if not all(have.values()):
            lacking = [k for k, v in have.items() if not v]
            return Result("", WARN, fig, f"this ffmpeg lacks {', '.join(lacking)}: sharding with that codec fails; "
                          "use imageio-ffmpeg's binary (pip install imageio-ffmpeg) or set FFMPEG_BINARY", m)
        return Result("", PASS, fig, measured=m)

    def check_env_disk(self) -> Result:
        out = Path(self.cfg["out_dir"]).resolve()
        probe = out
        while not probe.exists():
            probe = probe.parent
        usage = shutil.disk_usage(probe)
        writable = os.access(probe, os.W_OK)
        state = self._state_bytes()
        keep = self.cfg["keep_ckpts"]
        need = state * (keep + 1) + GiB     # kept checkpoints + the one being written + ~1 GiB of logs
        m = {"path": str(out), "free_bytes": usage.free, "checkpoint_bytes_estimate": state, "need_bytes": need,
             "writable": writable}
        fig = f"{_gib(usage.free)} free at {probe}; ~{_mib(state)} per checkpoint x {keep + 1} + 1 GiB logs"
        if not writable:
            raise Fail(fig + "; not writable", f"cannot write under {probe}: set out_dir= to a writable folder "
                       "(a bind mount with your uid: docker run --user $(id -u):$(id -g))", m)
        if usage.free < need:
            raise Fail(fig, f"needs ~{_gib(need)}: free space, lower keep_ckpts, or point out_dir= at a larger disk", m)
        if usage.free < 2 * need:
            return Result("", WARN, fig, "little headroom: free space or point out_dir= at a larger disk", m)
        return Result("", PASS, fig, measured=m)

    def check_env_shm(self) -> Result:
        import resource
        try:
            shm = shutil.disk_usage("/dev/shm").total
        except OSError:
            shm = 0
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        unlimited = soft == resource.RLIM_INFINITY
        m = {"shm_bytes": shm, "memlock_bytes": None if unlimited else soft}
        fig = f"/dev/shm {_gib(shm)}, memlock {'unlimited' if unlimited else _mib(soft)}"
        if self.run_backend == "gpu":
            problems = []
            if shm < GiB:
                problems.append("/dev/shm under 1 GiB: docker run --shm-size=64g (or --ipc=host); compose sets shm_size")
            if not unlimited and soft < 64 * MiB:
                problems.append("memlock limited: ulimit -l unlimited (docker: --ulimit memlock=-1) for pinned memory")
            if problems:
                return Result("", WARN, fig, "; ".join(problems), m)
        return Result("", PASS, fig + ("" if self.run_backend == "gpu" else " (GPU runs need these)"), measured=m)

    # ------------------------------------------------------------------ data
    def check_data_shards(self) -> Result:
        s = self._shards()
        manifest, tars, indexes = s["manifest"], s["tars"], s["indexes"]
        from preprocess import shard_format as fmt
        need = (fmt.VIDEO_EXT, fmt.LABEL_EXT, fmt.FRAMES_EXT)
        problems, headers_read = [], 0
        total = 0
        for shard, tar, index in zip(manifest["shards"], tars, indexes):
            total += len(index)
            where = tar.name
            if "samples" in shard and shard["samples"] != len(index):
                problems.append(f"{fmt.index_path(tar).name} lists {len(index)} samples, the manifest {shard['samples']}")
            size = tar.stat().st_size
            if shard.get("bytes") and shard["bytes"] != size:
                problems.append(f"{where} is {size} bytes, the manifest says {shard['bytes']} (truncated or "
                                "replaced copy?)")
            members = []
            for j, comps in enumerate(index):
                lacking = [e for e in need if e not in comps]
                if lacking:
                    problems.append(f"{where} sample {j} has no {lacking} in its index")
                for ext, (off, sz) in comps.items():
                    if off < 512 or off + sz > size:
                        problems.append(f"{where} sample {j}: {ext} at {off}+{sz} lies outside the {size}-byte tar")
                    members.append((off, sz, ext, j))
            members.sort()
            # a tar stores each member as a 512-byte header + data padded to 512: where the index describes
            # exactly that layout the offsets are consistent; wherever it does not, read the header there
            fd = os.open(tar, os.O_RDONLY)
            try:
                verify = set()
                for k, (off, sz, ext, j) in enumerate(members):
                    if k == 0:
                        verify.add(k)
                    else:
                        poff, psz = members[k - 1][:2]
                        if off != poff + -(-psz // 512) * 512 + 512:
                            verify |= {k - 1, k}
                for k in sorted(verify):
                    off, sz, ext, j = members[k]
                    hdr = _tar_header(fd, off)
                    headers_read += 1
                    if hdr is None or not hdr[0].endswith("." + ext) or hdr[1] != sz:
                        found = "no tar header" if hdr is None else f"member {hdr[0]!r} of {hdr[1]} bytes"
                        problems.append(f"{fmt.index_path(tar).name}: sample {j}'s {ext} at offset {off} does not "
                                        f"point at its tar member (found {found})")
            finally:
                os.close(fd)
        if manifest.get("num_samples") not in (None, total):
            problems.append(f"the indexes hold {total} samples, the manifest says {manifest['num_samples']}")
        m = {"shards": len(tars), "samples": total, "headers_read": headers_read, "problems": problems[:20]}
        fig = f"{len(tars)} shards, {total} samples, manifest = indexes; {headers_read} tar headers read"
        if problems:
            raise Fail(f"{len(problems)} problem(s): " + "; ".join(problems[:2]) + ("; ..." if len(problems) > 2 else ""),
                       f"the index or manifest does not describe these tars: re-run `python -m preprocess` on this set "
                       f"(it resumes and rewrites manifest and indexes), or copy {s['dir']} again in full (rsync -a)", m)
        return Result("", PASS, fig, measured=m)

    def check_data_samples(self) -> Result:
        s = self._samples()
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

    def check_data_read(self) -> Result:
        s = self._samples()
        infos = [i for i in s["infos"] if "lo" in i]
        if not infos:
            raise Fail("no samples read", "see data.samples")
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
        need_vps, basis = self._consumption()
        need_mbps = need_vps * nbytes / len(infos) / 1e6
        m = {"videos_per_s": vps, "mb_per_s": mbps, "bytes": nbytes, "videos": len(infos), "seconds": dt,
             "need_videos_per_s": need_vps, "need_mb_per_s": need_mbps, "need_basis": basis}
        fig = (f"{mbps:.1f} MB/s, {vps:.1f} videos/s ({len(infos)} videos, 4 threads, page cache dropped first); "
               f"needs {need_vps:.3g} videos/s = {need_mbps:.3g} MB/s ({basis})")
        if vps < need_vps:
            return Result("", WARN, fig, "reading is slower than training consumes: stage the shards on node-local "
                          "disk (docker/slurm/train.sbatch: STAGE_FROM/STAGE_TO), or use a faster filesystem", m)
        return Result("", PASS, fig, measured=m)

    def _consumption(self) -> tuple[float, str]:
        """Videos/s this node's training would consume, and how that was worked out."""
        procs = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or (self.torch.cuda.device_count() if self.use_cuda else 1)
        run = self._cache.get("train_main")
        if run and run.get("ok"):
            per = run["batch"] / run["time_s"]
            return per * procs, f"{per:.2f} videos/s measured by train.step x {procs} process(es) on this node"
        if self.use_cuda:
            return ASSUMED_GPU_VIDEOS_PER_S * procs, (f"assumed {ASSUMED_GPU_VIDEOS_PER_S:.0f} videos/s per GPU "
                                                      f"x {procs} (no train.step measured)")
        return 1.0, "assumed 1 video/s on a CPU (no train.step measured)"

    # ------------------------------------------------------------------ decode
    def check_decode_codec(self) -> Result:
        from pipeline.shards import CPU_CODECS, GPU_ONLY_CODECS
        s = self._shards()
        enc = str((s["manifest"].get("encoding") or {}).get("codec", "?"))
        codecs = sorted({i.get("codec", "") for i in self._samples()["infos"]} - {""})
        names = sorted({CPU_CODECS.get(c) or GPU_ONLY_CODECS.get(c) or c for c in codecs})
        m = {"manifest_codec": enc, "fourccs": codecs, "backend": self.run_backend}
        fig = f"shards {enc} ({', '.join(codecs) or 'no MP4 fourcc'}), backend {self.run_backend}"
        gpu_only = [c for c in codecs if c not in CPU_CODECS] or (
            [enc] if enc.lower() in ("h264", "hevc", "h265", "av1", "mpeg4") else [])
        if self.run_backend == "cpu" and gpu_only:
            raise Fail(fig + f": DALI's CPU decoder cannot decode {', '.join(names) or enc}",
                       "re-shard with --codec vp9 (`python -m preprocess SRC OUT --codec vp9`; DALI's CPU backend "
                       "decodes VP9, VP8 and MJPEG only), or train on GPUs with backend=gpu", m)
        if len(codecs) > 1:
            return Result("", WARN, fig, "several codecs in one set: each switch costs a new GPU decoder; re-shard "
                          "with one --codec", m)
        return Result("", PASS, fig, measured=m)

    def check_decode_cache(self) -> Result:
        s = self._shards()
        enc = s["manifest"].get("encoding") or {}
        size = enc.get("size")
        infos = self._samples()["infos"]
        from preprocess.shard_format import frame_sizes
        sizes = frame_sizes(infos)
        # DALI 2.4 looks a free decoder up by coded size but files it under the display size: a side that is not a
        # multiple of 16 (coded sizes are padded to the block size) never hits the cache (DESIGN.md §8)
        padded = sorted(k for k in sizes if any(int(v) % 16 for v in k.split("x")))
        m = {"sizes": sizes, "manifest_size": size, "one_size": len(sizes) <= 1, "unaligned": padded,
             "cache_friendly": not padded, "align": enc.get("align", 2)}
        how = "fixed by the manifest's --size" if size else "short side fixed, widths follow the sources"
        fig = f"{len(sizes)} coded size(s) in {len(infos)} samples: {', '.join(sizes) or '?'} ({how})"
        problems = []
        if padded:
            short = min(int(v) for k in padded for v in k.split("x"))
            problems.append(f"{', '.join(padded)} not a multiple of 16: coded size != display size, so DALI's GPU "
                            "decoder cache misses on every sample (a new NVDEC decoder, tens of ms, per video); "
                            f"re-shard with this version's default --align 16 (`python -m preprocess SRC OUT "
                            f"--short-side {short - short % 16 or 16}`)")
        if len(sizes) > 1:
            common = max(sizes, key=sizes.get)
            w, h = (int(v) for v in common.split("x"))
            fixed = f"{w - w % 16 or 16}x{h - h % 16 or 16}"
            problems.append(f"every new size creates a GPU decoder (tens of ms, more than a short clip's decode): "
                            f"re-shard with one size, `python -m preprocess SRC OUT --size {fixed}`")
        if problems:
            if self.run_backend == "gpu":
                return Result("", WARN, fig, "; ".join(problems), m)
            return Result("", PASS, fig + " (matters only on backend=gpu)", "; ".join(problems), m)
        return Result("", PASS, fig + "; 16-aligned, the NVDEC decoder cache can be reused", measured=m)

    def _shards_ok(self) -> None:
        self._shards()
        if self.results.get("data.shards") and self.results["data.shards"].status == FAIL:
            raise Skip("the indexes do not describe the tars (see data.shards): nothing to decode")

    def check_decode_cpu(self) -> Result:
        self._shards_ok()
        from pipeline import CodecError
        from pipeline.shards import CPU_CODECS
        codecs = {i.get("codec", "") for i in self._samples()["infos"]} - {""}
        if self.run_backend == "gpu" and codecs - set(CPU_CODECS):
            raise Skip(f"the shards are {', '.join(sorted(codecs))}, which only the GPU decodes (the run uses backend=gpu)")
        try:
            r = self._decode("cpu")
        except CodecError as e:
            raise Fail("DALI's CPU decoder cannot decode these shards", str(e))
        return self._decode_result("cpu", r)

    def check_decode_gpu(self) -> Result:
        if not self.cuda:
            self._gpu_skip("NVDEC decoding")
        if self.cfg["backend"] == "cpu":
            raise Skip("backend=cpu: the run does not decode on the GPU")
        self._shards_ok()
        return self._decode_result("gpu", self._decode("gpu"))

    def _decode_result(self, backend: str, r: dict) -> Result:
        torch = self.torch
        batch = r["batch"]
        want = tuple(self._template().required_inputs)
        T, S = self.cfg["frames"], self.cfg["crop"]
        bad = [k for k in want if k not in batch]
        clips = [k for k in want if k in batch and batch[k].dim() == 5]
        bad += [f"{k} {tuple(batch[k].shape)}" for k in clips if batch[k].shape[1] != 3 or
                tuple(batch[k].shape[-2:]) != (S, S) or (self.cfg["objective"] != "multilevel" and batch[k].shape[2] != T)]
        bad += [f"{k} not finite" for k in clips if not bool(torch.isfinite(batch[k]).all())]
        m = {"videos": r["videos"], "videos_per_s": r["vps"], "first_batch_s": r["first_s"], "steady": r["steady"],
             "batch_size": r["batch_size"], "short_videos": r["short"], "outputs": sorted(batch)}
        how = "after the first batch" if r["steady"] else "incl. building the pipeline"
        fig = (f"{r['vps']:.1f} videos/s ({how}; {r['videos']} videos, batch {r['batch_size']}, "
               f"num_threads={self.cfg['num_threads']}); {len(clips)} clips [3,{T},{S},{S}] finite")
        if r["short"]:
            fig += f"; {r['short']} shorter than a window (edge-padded)"
        if bad:
            raise Fail(fig, f"unexpected pipeline outputs {bad}: this pipeline build is broken; run tests/test_pipeline_*", m)
        return Result("", PASS, fig, measured=m)

    def check_decode_match(self) -> Result:
        if not self.cuda:
            self._gpu_skip("the CPU/GPU comparison")
        if self.cfg["backend"] == "cpu":
            raise Skip("backend=cpu: the run does not decode on the GPU")
        self._shards_ok()
        from pipeline.shards import CPU_CODECS
        codecs = {i.get("codec", "") for i in self._samples()["infos"]} - {""}
        if codecs - set(CPU_CODECS):
            raise Skip(f"{', '.join(sorted(codecs))} has no CPU decoder to compare with")
        torch = self.torch
        # un-augmented crops ("raw": cropped RGB in [0, 1]) with the same seed: same frames, same crops
        a = self._decode("cpu", ("raw_m",))["batch"]["raw_m"].float()
        b = self._decode("gpu", ("raw_m",))["batch"]["raw_m"].float().cpu()
        d = (a - b).abs().flatten() * 255
        mean = float(d.mean())
        p99 = float(torch.quantile(d[torch.randperm(d.numel())[:1_000_000]], 0.99))
        m = {"mean_abs_0_255": mean, "p99_abs_0_255": p99, "max_abs_0_255": float(d.max()),
             "tolerance": {"mean": FRAME_TOL_MEAN, "p99": FRAME_TOL_P99}}
        fig = (f"|CPU-GPU| mean {mean:.2f}, p99 {p99:.1f} of 255 (tolerance mean <= {FRAME_TOL_MEAN:g}, "
               f"p99 <= {FRAME_TOL_P99:g}: YUV->RGB conversion and resampling differ slightly)")
        if mean > FRAME_FAIL_MEAN:
            raise Fail(fig, "the GPU decodes different frames or crops than the CPU: update DALI, or report it with "
                       "this output; until then train with backend=cpu to stay on the tested path", m)
        if mean > FRAME_TOL_MEAN or p99 > FRAME_TOL_P99:
            return Result("", WARN, fig, "more difference than expected from colour conversion: check a few frames "
                          "of both backends visually (this DALI/driver build may convert colour differently)", m)
        return Result("", PASS, fig, measured=m)

    # ------------------------------------------------------------------ train
    def _template(self):
        """The configured objective, built once on the CPU with the run's seed (copied for every step)."""
        if "template" not in self._cache:
            from model import build_objective
            from .recipe import objective_kwargs
            self.torch.manual_seed(self.cfg["seed"])
            model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
            model.train()
            self._cache["template"] = model
        return self._cache["template"]

    def _state_bytes(self) -> int:
        """Bytes of one checkpoint: weights, buffers (queues) and the optimiser's state."""
        torch = self.torch
        model = self._cache.get("template")
        if model is None:
            from model import build_objective
            from .recipe import objective_kwargs
            try:
                with torch.device("meta"):
                    model = build_objective(self.cfg["objective"], **objective_kwargs(self.cfg))
            except Exception:
                model = self._template()
        state = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        return state + self._optimizer_states() * trainable

    def _optimizer_states(self) -> int:
        """Tensors the optimiser keeps per trainable weight: SGD momentum 1 (0 without), Adam 2."""
        if self.cfg.get("optimizer", "sgd") == "adam":
            return 2
        return 1 if self.cfg["momentum"] > 0 else 0

    def _inputs(self, size: int, channels_last: bool):
        """A batch of `size` for the objective: the decoded samples (tiled), or synthetic clips when none."""
        torch = self.torch
        model = self._template()
        dec = None
        for key in (("decode", "gpu", None), ("decode", "cpu", None)):
            if key in self._cache:
                dec = self._cache[key]["batch"]
                break
        T, S = self.cfg["frames"], self.cfg["crop"]
        out = {}
        g = torch.Generator().manual_seed(self.cfg["seed"])
        for k in model.required_inputs:
            if dec is not None and k in dec:
                v = dec[k]
                v = v.index_select(0, (torch.arange(size) % v.shape[0]).to(v.device))
            elif k.startswith("box"):
                v = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(size, 1)
            elif k == "frame_hw":
                v = torch.tensor([[256.0, 342.0]]).repeat(size, 1)
            elif k.startswith("raw"):
                v = torch.rand(size, 3, T, S, S, generator=g)
            else:
                v = torch.randn(size, 3, T, S, S, generator=g)
            v = v.to(self.device)
            if v.dim() == 5:
                v = v.contiguous(memory_format=torch.channels_last_3d if channels_last else torch.contiguous_format)
            out[k] = v
        return out, dec is not None

    def _step(self, size: int, precision: str, channels_last: bool, backward: bool = True) -> dict:
        """One forward/backward/SGD update of a fresh copy of the objective (cached per arguments). With
        backward=False only the forward runs (enough for the CPU memory estimate, which counts gradients and
        momentum from the weights)."""
        key = ("step", size, precision, channels_last, backward)
        if key in self._cache:
            return self._cache[key]
        torch = self.torch
        from .distributed import Dist
        from .recipe import build_optimizer, precision_context, train_step
        dev, gpu = self.device, self.device.type == "cuda"
        res = {"batch": size, "precision": precision, "channels_last": channels_last, "backward": backward,
               "ok": False}
        model = opt = batch = out = None
        try:
            if gpu:
                torch.cuda.synchronize(dev)
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(dev)
            model = copy.deepcopy(self._template()).to(dev)
            if channels_last:
                model = model.to(memory_format=torch.channels_last_3d)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = build_optimizer(self.cfg, params, lr=1e-5)   # the trainer's optimiser (its states take memory)
            scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")
            batch, real = self._inputs(size, channels_last)
            res["inputs"] = "decoded samples" if real else "synthetic clips"
            own = {p.untyped_storage().data_ptr() for p in model.parameters()}
            own |= {b.untyped_storage().data_ptr() for b in model.buffers()}
            own |= {v.untyped_storage().data_ptr() for v in batch.values()}
            saved: dict[int, int] = {}

            def pack(t):
                try:
                    st = t.untyped_storage()
                    ptr = st.data_ptr()
                    if ptr not in own:
                        saved[ptr] = st.nbytes()
                except Exception:
                    pass
                return t

            torch.manual_seed(self.cfg["seed"])          # the same dropout / permutations in every run
            t0 = time.perf_counter()
            amp = precision_context(precision, dev)
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                if backward:                             # the trainer's own step (train/recipe.py)
                    out, _ = train_step(model, batch, opt, scaler, amp, Dist(device=dev))
                else:
                    with amp:
                        out = model(batch)
            loss = out["loss"]
            if gpu:
                torch.cuda.synchronize(dev)
            res["time_s"] = time.perf_counter() - t0
            res["loss"] = float(loss.detach())
            res["terms"] = {k: float(v.detach()) for k, v in out.items() if v.numel() == 1}
            res["finite"] = math.isfinite(res["loss"])
            weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            grads = sum(p.numel() * p.element_size() for p in params)
            inputs = sum(v.numel() * v.element_size() for v in batch.values())
            res["saved_bytes"] = sum(saved.values())
            states = self._optimizer_states()
            res["estimate_bytes"] = weights + (1 + states) * grads + inputs + res["saved_bytes"]
            res["fixed_bytes"] = weights + (1 + states) * grads
            if gpu:
                res["peak_bytes"] = torch.cuda.max_memory_allocated(dev)
                res["peak_source"] = "torch.cuda.max_memory_allocated"
            else:
                res["peak_bytes"] = res["estimate_bytes"]
                res["peak_source"] = "estimate: weights + grads + optimiser state + inputs + saved activations"
            res["ok"] = True
        except Exception as e:
            if gpu and isinstance(e, torch.cuda.OutOfMemoryError):
                res["oom"] = True
                res["error"] = f"out of memory at batch {size}"
            else:
                res["traceback"] = traceback.format_exc()
                res["error"] = f"{type(e).__name__}: {e}"
        finally:
            del model, opt, batch, out
            if gpu:
                torch.cuda.empty_cache()
        self._cache[key] = res
        return res

    def _plan(self):
        """Batch sizes and layouts of the training-step checks on this device."""
        gpu = self.device.type == "cuda"
        B = self.cfg["batch_size"]
        cl = bool(self.cfg["channels_last"]) and gpu      # channels_last_3d is a GPU layout
        prec = self.cfg["precision"]
        if gpu:      # the configured batch, and half of it for the memory fit
            sizes = (B, max(1, B // 2)) if B > 1 else (1, 2)
        else:        # batch 2 (1 leaves BatchNorm a single value on small feature maps), and 1 for the fit
            sizes = (min(B, 2), 1 if B >= 2 else 2)
        return gpu, B, prec, cl, sizes

    def _main_step(self) -> dict:
        """The configured precision and layout at the first planned size (GPU: after a warm-up step; a batch
        that does not fit is halved until one does, and train.step reports the OOM)."""
        if "train_main" in self._cache:
            return self._cache["train_main"]
        gpu, B, prec, cl, sizes = self._plan()
        size = sizes[0]
        if gpu:      # the trainer's settings
            torch = self.torch
            torch.backends.cudnn.benchmark = self.cfg["cudnn_benchmark"]
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
            warm = self._step(size, prec, cl)           # cuDNN autotuning, allocator warm-up
            while warm.get("oom") and size > 1:
                self._cache["train_oom_at"] = B
                size //= 2
                warm = self._step(size, prec, cl)
            if warm.get("ok"):
                self._cache.pop(("step", size, prec, cl, True))   # time a second, warm step
        r = self._step(size, prec, cl)
        self._cache["train_main"] = r
        return r

    def check_train_step(self) -> Result:
        gpu, B, prec, cl, sizes = self._plan()
        r = self._main_step()
        if self._cache.get("train_oom_at") or r.get("oom"):
            raise Fail(f"batch_size={B} ({prec}) does not fit on {self.torch.cuda.get_device_name(self.device)}"
                       + (f"; batch {r['batch']} does" if r.get("ok") else ""),
                       "lower batch_size (train.batch says the largest that fits), or crop/frames")
        if not r["ok"]:
            print(r.get("traceback", ""), file=sys.stderr)
            raise Fail(r.get("error", "the step failed"), "the configured objective does not train here: see the "
                       "traceback on stderr; try precision=fp32 to tell numerics from code problems")
        layout = "channels_last_3d" if cl else "contiguous"
        fig = (f"{prec} {layout}, batch {r['batch']} ({r['inputs']}): loss {r['loss']:.4g}, step {r['time_s']:.2f} s, "
               f"{r['batch'] / r['time_s']:.2f} videos/s, peak {_gib(r['peak_bytes'])}")
        m = {k: r[k] for k in ("batch", "precision", "channels_last", "loss", "terms", "time_s", "peak_bytes",
                               "peak_source", "inputs")}
        m["videos_per_s"] = r["batch"] / r["time_s"]
        if r["batch"] != B:
            est = r["time_s"] * B / r["batch"]
            m["step_s_at_batch_size_estimate"] = est
            fig += f"; ~{est:.1f} s at batch {B} (linear)"
        if not r["finite"]:
            raise Fail(fig, f"non-finite loss in {prec}: try precision=fp32; if that is finite, keep fp32 or lower lr; "
                       "if not, inspect the data (decode.cpu) and the config", m)
        return Result("", PASS, fig, measured=m)

    def check_train_bf16(self) -> Result:
        gpu, B, prec, cl, sizes = self._plan()
        torch = self.torch
        size = sizes[0]
        if gpu and not torch.cuda.is_bf16_supported():
            status_fix = "this GPU has no bf16: set precision=fp16 (autocast + grad scaler) or fp32"
            if prec == "bf16":
                raise Fail(f"{torch.cuda.get_device_name(self.device)}: no bf16 support", status_fix)
            raise Skip(f"{torch.cuda.get_device_name(self.device)} has no bf16 support (the run uses {prec})")
        if gpu:
            self._main_step()
            main = self._cache["train_main"]
            size = main["batch"] if main.get("ok") else size
        while True:
            ref = self._step(size, "fp32", False)
            low = self._step(size, "bf16", gpu)      # + channels_last_3d on a GPU
            if not (ref.get("oom") or low.get("oom")) or size == 1:
                break
            size //= 2                               # fp32 needs more memory than the run's bf16
        for r in (ref, low):
            if not r["ok"]:
                if r.get("oom"):
                    raise Fail(f"{r['precision']} at batch {size}: out of memory", "lower batch_size (see train.batch)")
                print(r.get("traceback", ""), file=sys.stderr)
                raise Fail(f"{r['precision']}: {r.get('error')}", "see the traceback on stderr")
        f, b = ref["terms"], low["terms"]
        # A term behind a discrete selection (FIMA's dense term: foreground cells above the median, positives by
        # a distance threshold; its count is the metric dense_pos_cells) jumps when bf16 moves a value across
        # the threshold: when such a count differs, that term and the total are not compared, the others are.
        flipped = [k for k in f if not k.startswith(("loss", "acc")) and k in b and f[k] != b[k]]
        excluded = {"loss"} | {f"loss_{k.split('_')[0]}" for k in flipped} if flipped else set()
        compared = [k for k in f if k.startswith("loss") and k in b and k not in excluded] or ["loss"]
        diffs = {k: abs(b[k] - f[k]) for k in compared}
        tols = {k: LOSS_RTOL * max(1.0, abs(f[k])) for k in compared}
        worst = max(compared, key=lambda k: diffs[k] / tols[k])
        layout = " + channels_last_3d" if gpu else " (CPU autocast, contiguous)"
        inside = sum(diffs[k] <= tols[k] for k in compared)
        fig = (f"batch {size}: loss fp32 {ref['loss']:.4f} ({ref['time_s']:.2f} s), bf16{layout} {low['loss']:.4f} "
               f"({low['time_s']:.2f} s); {inside} of {len(compared)} loss terms within {LOSS_RTOL:.0%} of "
               f"max(1, |fp32|), worst {worst} |diff| {diffs[worst]:.4f} (tolerance {tols[worst]:.4f})")
        if flipped:
            fig += ("; not compared: " + ", ".join(sorted(excluded)) + " (" +
                    ", ".join(f"{k} {f[k]:.3g} vs {b[k]:.3g}" for k in flipped) + ": a discrete selection flipped)")
        m = {"batch": size, "fp32_loss": ref["loss"], "bf16_loss": low["loss"], "compared": compared,
             "abs_diff": diffs, "tolerance": tols, "not_compared": sorted(excluded), "fp32_s": ref["time_s"],
             "bf16_s": low["time_s"], "bf16_channels_last_3d": gpu, "fp32_terms": f, "bf16_terms": b}
        needs_bf16 = prec == "bf16" and (gpu or self.run_backend == "cpu")    # this device trains in bf16
        if not all(math.isfinite(v) for v in f.values()):
            raise Fail(fig, "the fp32 loss is not finite: the model or the data is broken here (see train.step)", m)
        if not all(math.isfinite(v) for v in b.values()):
            fix = "bf16 gives a non-finite loss: use precision=fp32 (or fp16 with its grad scaler) on this device"
            if needs_bf16:
                raise Fail(fig, fix, m)
            return Result("", WARN, fig, fix + " (the run does not use bf16 here)", m)
        if diffs[worst] > tols[worst]:
            return Result("", WARN, fig, f"bf16 and fp32 disagree on {worst} more than expected: train with "
                          "precision=fp32 for a few steps and compare the logged losses", m)
        return Result("", PASS, fig, measured=m)

    def check_train_batch(self) -> Result:
        torch = self.torch
        gpu, B, prec, cl, sizes = self._plan()
        main = self._main_step()
        if gpu:
            total = torch.cuda.get_device_properties(self.device).total_memory
            limit = min(total, self.limit_gib * GiB) if self.limit_gib else total
            source = (f"--memory-limit-gib {self.limit_gib:g}" if self.limit_gib and self.limit_gib * GiB < total
                      else f"{torch.cuda.get_device_name(self.device)} memory")
        else:
            if self.limit_gib:
                limit, source = self.limit_gib * GiB, f"--memory-limit-gib {self.limit_gib:g}, simulated"
            else:
                limit, source = _mem_available(), "available RAM"
        if not main.get("ok"):
            raise Fail("no training step succeeded", "see train.step")
        b_main = main["batch"]
        if b_main == sizes[0] and sizes[1] != b_main:
            b_other = sizes[1]
        else:
            b_other = b_main // 2 if b_main > 1 else 2
        other = self._step(b_other, prec, cl, backward=gpu)   # CPU: the estimate needs only the forward
        if not other.get("ok") and not other.get("oom") and b_other < b_main:   # e.g. BatchNorm at batch 1
            other = self._step(b_main + 1, prec, cl, backward=gpu)
        points = {r["batch"]: r for r in (main, other) if r.get("ok")}
        if len(points) < 2:
            raise Fail("could not measure two batch sizes", other.get("error") or "see train.step")
        (b1, r1), (b2, r2) = sorted(points.items())[:2]
        per = max((r2["peak_bytes"] - r1["peak_bytes"]) / (b2 - b1), 1.0)
        fixed = r1["peak_bytes"] - per * b1
        budget = limit * (0.95 if gpu else 1.0)       # GPU: leave room for the allocator's fragmentation
        predicted = fixed + per * B
        largest = int((budget - fixed) // per)
        m = {"limit_bytes": limit, "limit_source": source, "per_sample_bytes": per, "fixed_bytes": fixed,
             "predicted_bytes_at_batch_size": predicted, "batch_size": B, "largest_batch_estimate": largest,
             "fit_points": {str(b): p["peak_bytes"] for b, p in points.items()}, "precision": prec,
             "peak_source": r1["peak_source"]}
        if gpu and largest >= 1:        # verify by running it (capped to keep the check quick)
            trial, verified = min(largest, 8 * max(B, 1), 1024), None
            for _ in range(3):
                if trial <= max(points):
                    verified = trial
                    break
                r = self._step(trial, prec, cl)
                if r.get("ok"):
                    verified = trial
                    break
                trial = int(trial * 0.85)
            m["largest_batch_verified"] = verified
            largest = verified if verified is not None else largest
        if gpu:     # the configured batch ran on this GPU: it fits unless a smaller --memory-limit-gib says not
            fits = main["batch"] == B and not self._cache.get("train_oom_at") and main["peak_bytes"] <= limit
            if fits:
                largest = max(largest, B)
        else:
            fits = predicted <= budget and largest >= B
        fig = (f"{_mib(fixed)} + {_mib(per)}/video ({prec}, fit over batch {b1} and {b2}): batch {B} needs "
               f"{_gib(predicted)} of {_gib(limit)} ({source}); largest that fits: {max(largest, 0)}")
        if gpu:
            v = m.get("largest_batch_verified")
            fig += (" (not verified: the trial steps failed)" if v is None else
                    " (ran; search capped at 8x the batch)" if v >= min(8 * max(B, 1), 1024) else " (ran)")
        if largest < 1:
            raise Fail(fig, "does not fit even at batch 1: lower crop or frames, use a smaller backbone (backbone=r3d18), "
                       "a smaller queue_size, or a device with more memory", m)
        if not fits:
            raise Fail(fig, f"batch_size={B} does not fit: lower batch_size to {largest} (the largest that fits; "
                       f"keep the global batch by running more processes), or lower crop/frames", m)
        return Result("", PASS, fig, measured=m)

    # ------------------------------------------------------------------ dist
    def check_dist_allreduce(self) -> Result:
        if "RANK" not in os.environ:
            raise Skip("one process (not under torchrun): run `torchrun --nproc-per-node=N -m train doctor ...` "
                       "(docker/entrypoint.sh doctor does) to check the all-reduce and the rendezvous")
        torch = self.torch
        import torch.distributed as dist
        from . import distributed as D
        env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                              "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
        backend = "nccl" if self.use_cuda else "gloo"
        rdzv = (f"{backend} via {env['MASTER_ADDR']}:{env['MASTER_PORT']}, world {env['WORLD_SIZE']} "
                f"({env['LOCAL_WORLD_SIZE']} per node), run id {env['TORCHELASTIC_RUN_ID']}")
        try:
            d = D.setup(self.use_cuda, timeout_min=5)
        except Exception as e:
            raise Fail(f"{rdzv}: process group failed: {type(e).__name__}: {e}",
                       "check that MASTER_ADDR:MASTER_PORT is reachable from every node (firewall, the right "
                       "interface: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), and that every node uses the same "
                       "rendezvous endpoint and id")
        try:
            dev = d.device
            w = d.world_size
            t = torch.full((4,), float(d.rank + 1), device=dev)
            dist.all_reduce(t)
            expect = w * (w + 1) / 2
            ok = torch.tensor([1.0 if bool((t == expect).all()) else 0.0], device=dev)
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
            nbytes = (256 if dev.type == "cuda" else 16) * MiB
            iters = 5 if dev.type == "cuda" else 3
            buf = torch.ones(nbytes // 4, device=dev)
            dist.all_reduce(buf)                              # warm-up (NCCL builds its rings here)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(iters):
                dist.all_reduce(buf)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            dt = torch.tensor([(time.perf_counter() - t0) / iters], device=dev, dtype=torch.float64)
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)        # the slowest rank's time
            sec = float(dt)
        finally:
            D.cleanup()
        algbw = nbytes / sec / 1e9
        busbw = algbw * 2 * (w - 1) / w                      # nccl-tests' bus bandwidth
        m = {"backend": backend, "world_size": w, "rendezvous": env, "correct": bool(ok.item() == 1.0),
             "bytes": nbytes, "seconds": sec, "algbw_gb_s": algbw, "busbw_gb_s": busbw}
        fig = (f"{backend}, {w} ranks: sum correct={m['correct']}, {nbytes // MiB} MiB in {sec * 1e3:.1f} ms, "
               f"bus bandwidth {busbw:.2f} GB/s; {rdzv}")
        if not m["correct"]:
            raise Fail(fig, "the all-reduce returned a wrong sum on some rank: a broken GPU/network path; rerun "
                       "with NCCL_DEBUG=INFO and check the node's GPUs and links", m)
        if backend == "nccl" and w > 1 and busbw < 5.0:
            return Result("", WARN, fig, "slow all-reduce for NCCL: check it uses NVLink/InfiniBand "
                          "(NCCL_DEBUG=INFO; NCCL_IB_HCA, NCCL_SOCKET_IFNAME), not TCP", m)
        return Result("", PASS, fig, measured=m)

    # ------------------------------------------------------------------ verdicts that need several checks
    def _finalise(self) -> None:
        """Decode speed against what a training step consumes (both measured by now)."""
        run = self._cache.get("train_main")
        if not (run and run.get("ok")):
            return
        need, basis = self._consumption()
        r = self.results.get(f"decode.{self.run_backend}")
        if r and r.status == PASS and "videos_per_s" in r.measured:
            r.measured["need_videos_per_s"] = need
            if r.measured["videos_per_s"] < need:
                r.status = WARN
                r.fix = (f"decoding ({r.measured['videos_per_s']:.1f} videos/s) is slower than training consumes "
                         f"({need:.1f}: {basis}): raise num_threads" +
                         (", or train with backend=gpu (NVDEC)" if self.run_backend == "cpu" else
                          "; re-shard with a shorter GOP (--gop) or one --size"))
            else:
                r.figure += f"; training consumes {need:.3g} videos/s"


# --------------------------------------------------------------------------------------------- small helpers


def _tar_header(fd: int, data_offset: int) -> tuple[str, int] | None:
    """(member name, size) of the tar header right before `data_offset`, or None when there is none."""
    if data_offset < 512:
        return None
    h = os.pread(fd, 512, data_offset - 512)
    if len(h) != 512:
        return None
    try:
        want = int(h[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return None
    if sum(h[:148]) + 8 * 32 + sum(h[156:]) != want:
        return None
    name = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
        if prefix:
            name = f"{prefix}/{name}"
    if h[124] & 0x80:
        size = int.from_bytes(h[125:136], "big")
    else:
        try:
            size = int(h[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            return None
    return name, size


def _driver_version() -> str | None:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=30).stdout.split()
            return out[0] if out else None
        except Exception:
            return None
    return None


def _has_nvidia_driver() -> bool:
    return Path("/proc/driver/nvidia/version").exists()


def _mem_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
