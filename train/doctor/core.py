"""The doctor's core: check names and tolerances, results, and the machinery every check group uses."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path


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


class DoctorBase:
    """Set-up, running and reporting of the checks, and what several check groups reuse (shards, samples, decode)."""
    def __init__(self, cfg: dict, selected: list[str], samples: int = 8, memory_limit_gib: float | None = None,
                 preset: str | None = None):
        import torch
        self.torch = torch
        self.cfg, self.selected, self.n, self.limit_gib, self.preset = cfg, selected, samples, memory_limit_gib, preset
        self.results: dict[str, Result] = {}
        self.cuda = torch.cuda.is_available()
        from ..recipe import device_and_backend
        self.use_cuda, self.run_backend = device_and_backend(cfg)     # the trainer's rule and CUDA switches
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
        from preprocess import integrity, shard_format as fmt
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
                headers = integrity.read_headers(fd, comps)
                lo = min(o for o, _ in comps.values())
                hi = max(o + z for o, z in comps.values())
                span = os.pread(fd, hi - lo, lo)
            finally:
                os.close(fd)
            found = integrity.sample_member_problems(comps, headers)
            for p in found:
                if p.kind == "member":
                    what = "no tar header" if p.found is None else f"{p.found[0]!r}, {p.found[1]} bytes"
                    problems.append(f"{where}: the index's {p.ext} offset {p.offset} does not point at its tar member "
                                    f"(found {what})")
                else:
                    problems.append(f"{where}: its members belong to different samples {p.found}")
            bad = {p.ext for p in found}
            keys = {integrity.member_key(headers[e][0]) for e in comps if e not in bad}
            part = {ext: span[o - lo:o - lo + z] for ext, (o, z) in comps.items()}
            info = {"shard": t, "pos": j, "key": next(iter(keys)) if len(keys) == 1 else "", "bytes": hi - lo,
                    "tar": str(tar), "lo": lo, "hi": hi}
            rec = records.get(info["key"])
            found = integrity.sample_problems(part, rec, n_classes)
            unreadable = [p for p in found if p.kind == "unreadable" and p.ext != fmt.META_EXT]
            if unreadable:
                problems.append(f"{where}: lbl/nf unreadable ({unreadable[0].expected})")
                infos.append(info)
                continue
            info["label"] = fmt.unpack_int32(part[fmt.LABEL_EXT])
            info["nf"] = fmt.unpack_int32(part[fmt.FRAMES_EXT])
            problems += [_sample_problem(p, where, n_classes) for p in found]
            meta, _ = integrity.read_meta(part)
            try:
                track = parse_mp4(np.frombuffer(part[fmt.VIDEO_EXT], dtype=np.uint8)) if fmt.VIDEO_EXT in part else None
            except Exception as e:
                track = None
                problems.append(f"{where}: the video is not a readable MP4 ({type(e).__name__}: {e})")
            info.update(codec=track.codec if track else "", width=track.width if track else meta.get("width"),
                        height=track.height if track else meta.get("height"),
                        stream_frames=track.num_samples if track else None)
            if track is not None and track.num_samples and track.num_samples < info["nf"]:
                problems.append(f"{where}: nf {info['nf']} but the MP4 holds {track.num_samples} frames")
            if track is not None and meta.get("width") and (meta["width"], meta["height"]) != (track.width, track.height):
                problems.append(f"{where}: JSON says {meta['width']}x{meta['height']}, the MP4 is "
                                f"{track.width}x{track.height}")
            if records and info["key"] and rec is None:
                problems.append(f"{where}: key {info['key']!r} is not in the manifest")
            if rec is not None and rec.get("shard", t) != t:
                problems.append(f"{where}: the manifest puts {info['key']!r} in shard {rec['shard']}")
            infos.append(info)
        value = {"infos": infos, "problems": problems}
        self._cache["samples"] = value
        return value

    def _aug(self):
        """The trainer's AugConfig for this config."""
        from ..recipe import aug_config
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
        outside0 = self._gpu_bytes_outside_torch() if gpu else 0
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
            # what DALI holds on the GPU while it feeds a run (its pool, NVDEC surfaces): train.batch's budget
            dali_bytes = max(0, self._gpu_bytes_outside_torch() - outside0) if gpu else 0
        finally:
            loader.close()
        batch = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
        videos = bs * len(batches)
        if len(times) > 1:   # the first batch includes building the pipeline
            vps = bs * (len(times) - 1) / sum(times[1:])
        else:
            vps = videos / times[0]
        value = {"batch": batch, "videos": videos, "batch_size": bs, "first_s": times[0], "vps": vps,
                 "steady": len(times) > 1, "short": int(short), "gpu_bytes_outside_torch": dali_bytes}
        self._cache[key] = value
        return value

    def _gpu_bytes_outside_torch(self) -> int:
        """Bytes in use on this process's GPU that torch's caching allocator does not hold (CUDA context, DALI)."""
        torch = self.torch
        torch.cuda.synchronize(self.device)
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total - free - torch.cuda.memory_reserved(self.device))

    # ------------------------------------------------------------------ env

    def _finalise(self) -> None:
        """Decode speed against what a training step consumes (both measured by now)."""
        run = self._cache.get("train_main")
        if not (run and run.get("ok")):
            return
        need, basis = self._decode_need(self.run_backend)
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


def _sample_problem(p, where: str, n_classes: int) -> str:
    """data.samples' words for an integrity problem of a sample against its records (preprocess/integrity.py)."""
    field = "lbl" if p.ext == "lbl" else "nf"
    if p.kind == "unreadable":
        return f"{where}: its JSON record does not parse ({p.expected})"
    if p.kind == "json":
        return (f"{where}: lbl {p.found} but the JSON record says label {p.expected}" if field == "lbl" else
                f"{where}: nf {p.found} but the JSON record says {p.expected} frames")
    if p.kind == "record":
        return f"{where}: {field} {p.found}, the manifest says {p.expected}"
    if p.kind == "label":
        return f"{where}: label {p.found} outside the manifest's {n_classes} classes"
    if p.kind == "crc":
        return f"{where}: the video's CRC-32 is {p.found:08x}, {p.expected:08x} when it was sharded (bytes changed since)"
    return f"{where}: frame count {p.found}"
