"""The first-GPU acceptance run: everything owed about the GPU path, measured by one command in a few minutes.

    ./run acceptance                      # = python benchmarks/acceptance.py (one node; every visible GPU)
    python benchmarks/acceptance.py --budget 600 --json acceptance.json      # what docker/gpu_visit.sh runs
    python benchmarks/acceptance.py --quick --work /tmp/acc     # the CPU smoke form (what the test suite runs)

It makes its own data (the synthetic sample at short side 256: 320x240 sources become 336x256 with the default
16-alignment and 342x256 with `--align 2`, in VP9 and, on a GPU, H.264) and needs nothing but this checkout, its
Python packages and, for the GPU rows, a CUDA device. Rows, most informative first:

* env            GPU, driver, CUDA, cuDNN, DALI, torch, and whether torch and DALI can use the GPU: when an NVIDIA
                 GPU is visible but torch is a CPU build, or torch or DALI cannot use it, this row FAILs loudly
                 and nothing else runs (no CPU fallback that would spend the hour measuring a CPU)
* doctor.*       the doctor's env.driver / env.gpus rows, mixed (NVDEC) decoding against the CPU backend on the same
                 samples (decode.gpu, decode.match: does NVDEC take the trimmed IVF stream?), decode.cache
* decode.<codec>.<align>.<trim>   videos/s and decoded frames/s of the real FIMA pretraining views, GOP trimming
                 on and off, 16-aligned and unaligned (DALI's decoder-cache trap shows as a gap), VP9 and H.264
* train.*        the doctor's train.step / train.bf16 / train.batch at the paper's size (I3D 16x224^2; bf16 +
                 channels_last_3d vs fp32: loss agreement, peak memory, the largest batch that fits), and
                 benchmarks/train.py's data-stall ratio and bf16 speed-up, all with the paper preset's settings
                 (k400_i3d_fima: cuDNN autotuning on, bf16, channels_last_3d)
* dist.allreduce the doctor's NCCL all-reduce under `torchrun --nproc-per-node=<GPUs>` (two or more GPUs)

Every step runs in a child process (a CUDA error that poisons the context, a crash in a decoder or a hang ends
that step's rows, FAIL with the reason, never the run); each row is printed when it completes and the JSON
report (`--json`) is rewritten, atomically, after every row, so a run cut off by a time limit keeps what it
measured ("complete": false). `--budget SECONDS` skips a step whose estimate does not fit in what is left (and
says so) and stops a step that overruns it. A row that cannot run here says why (SKIP); `--quick` shrinks every
size for a CPU. Exit code 0 unless a row FAILs (1) or the run was stopped by a signal (128 + its number).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
NO_GPU = "no CUDA device on this machine"
PAPER_PRESET = "k400_i3d_fima"        # the GPU rows run the papers' recipe and its CUDA settings
STEP_TIMEOUT_S = 900                  # a step's limit when no --budget is given


def row(name: str, status: str, figure: str = "", measured: dict | None = None) -> dict:
    return {"row": name, "status": status, "figure": figure, "measured": measured or {}}


# ----------------------------------------------------------------------------------------------- configurations

def speed_config(quick: bool) -> tuple[str, list[str]]:
    """(preset, overrides) of the training-step rows. The GPU form is the paper preset itself, so cuDNN
    autotuning, bf16 and channels_last_3d are what every paper run uses (the demo preset turns autotuning off);
    --quick is CPU-sized on the demo preset."""
    if quick:
        return "demo", ["objective=fima", "frames=16", "backbone_width=0.25", "crop=48", "batch_size=2",
                        "precision=fp32", "channels_last=false"]
    return PAPER_PRESET, ["objective=fima", "backbone_width=1.0", "crop=224", "batch_size=16", "num_threads=8"]


def decode_config(quick: bool) -> tuple[str, list[str]]:
    """(preset, overrides) of the doctor's decode rows: the paper preset's views on a GPU, the demo's on a CPU."""
    return ("demo", []) if quick else (PAPER_PRESET, ["num_threads=8"])


# ----------------------------------------------------------------------------------------------- the GPU gate

def nvidia_gpus_visible() -> list[str]:
    """The NVIDIA GPUs this machine shows, whatever torch makes of them: `nvidia-smi -L` lines, or the driver's
    /proc entry when there is no nvidia-smi. None when CUDA_VISIBLE_DEVICES hides them on purpose (empty, -1)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "x").strip() in ("", "-1", "NoDevFiles"):
        return []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30).stdout
            gpus = [line.strip() for line in out.splitlines() if line.startswith("GPU ")]
            if gpus:
                return gpus
        except (OSError, subprocess.TimeoutExpired):
            pass
    if Path("/proc/driver/nvidia/version").exists():
        return ["an NVIDIA driver is loaded (/proc/driver/nvidia/version)"]
    return []


def gpu_unusable(torch, visible: list[str]) -> str:
    """Why torch or DALI cannot use the visible GPU ('' when they can, or when no GPU is visible)."""
    if not visible:
        return ""
    what = f"{len(visible)} NVIDIA GPU(s) visible ({visible[0]})"
    if torch.version.cuda is None:
        return (f"{what}, but torch {torch.__version__} is a CPU-only build: install the CUDA build (torch=="
                f"{torch.__version__.split('+')[0]} from https://download.pytorch.org/whl/cu130), not a CPU "
                "virtual environment carried over")
    if not torch.cuda.is_available():
        try:
            torch.cuda.init()
            why = "torch.cuda.is_available() is False"
        except Exception as e:       # the driver's own words: too old, no device, CUDA_VISIBLE_DEVICES
            why = f"{type(e).__name__}: {str(e)[:300]}"
        return f"{what}, but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use it: {why}"
    try:
        dali_gpu_probe()
    except Exception as e:
        return (f"{what}, torch uses it, but DALI cannot ({type(e).__name__}: {str(e)[:300]}): install the DALI "
                f"build for CUDA {torch.version.cuda.split('.')[0]} (nvidia-dali-cuda"
                f"{torch.version.cuda.split('.')[0]}0)")
    return ""


def dali_gpu_probe() -> None:
    """Build and run a one-op DALI pipeline on GPU 0 (raises when DALI cannot use it)."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=0, prefetch_queue_depth=1)
    def probe():
        return fn.random.uniform(range=[0.0, 1.0], shape=[4]).gpu()

    pipe = probe()
    pipe.build()
    (out,) = pipe.run()
    if out.as_cpu().as_array().shape != (1, 4):
        raise RuntimeError(f"DALI's GPU probe returned {out.as_cpu().as_array().shape}, expected (1, 4)")


def environment() -> dict:
    import torch
    import nvidia.dali as dali
    cuda = torch.cuda.is_available()
    m = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "dali": dali.__version__,
         "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu": None, "gpus": 0, "driver": None,
         "cuda": cuda, "visible": nvidia_gpus_visible()}
    if cuda:
        m.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    m["unusable"] = gpu_unusable(torch, m["visible"])
    return m


# ----------------------------------------------------------------------------------------------- what steps do

def shard_set(work: Path, codec: str, align: int, videos: int) -> Path:
    """OUT/train of the synthetic sample (320x240 sources at short side 256) in ``codec``, ``align``; made once."""
    from benchmarks._common import sample_shards
    from preprocess.cli import main as preprocess_main
    src = sample_shards(work / "sample", short_side=256, train_per_class=max(1, videos // 6), test_per_class=1)
    out = work / f"{codec}-a{align}"
    if not (out / "train" / "manifest.json").is_file():
        rc = preprocess_main([str(src.parent / "videos"), str(out), "--codec", codec, "--align", str(align),
                              "--max-per-shard", "32", "--no-progress"])
        if rc != 0:
            raise RuntimeError(f"sharding {out} failed (exit {rc})")
    return out / "train"


def doctor_rows(data: Path, backend: str, only: str, preset: str, overrides: list[str], work: Path, tag: str) -> dict:
    """The doctor's checks ``only`` on ``data``: {check: its JSON (status, figure, fix, measured)}."""
    from train.doctor import main as doctor_main
    path = work / f"doctor-{tag}.json"
    path.unlink(missing_ok=True)
    doctor_main(["--config", preset, f"data={data}", f"backend={backend}", f"out_dir={work / 'doctor-run'}",
                 "--only", only, "--samples", "4", "--json", str(path), *overrides])
    return json.loads(path.read_text())["checks"]


def decode_rate(data: Path, backend: str, trim: bool, crop: int, batch: int, steps: int) -> dict:
    """Videos/s and decoded frames/s of FIMA pretraining views (two windows, global + local diff clips)."""
    import torch
    from model import OBJECTIVES
    from pipeline import AugConfig, pretrain_loader
    loader = pretrain_loader(data, OBJECTIVES["fima"].required_inputs, batch_size=batch, config=AugConfig(crop_size=crop),
                             backend=backend, device_id=0 if backend == "gpu" else None, trim=trim)
    try:
        it = iter(loader)
        next(it)                                       # build + first batch (decoder creation) untimed
        frames0 = loader.stats["decoded_frames"]
        t0, n = time.perf_counter(), 0
        while n < steps:
            try:
                next(it)
            except StopIteration:
                it = iter(loader)
                continue
            n += 1
        if backend == "gpu":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return {"videos_per_s": round(n * batch / dt, 2),
                "decoded_frames_per_s": round((loader.stats["decoded_frames"] - frames0) / dt, 1)}
    finally:
        loader.close()


def _doctor_to_rows(checks: dict, names: list[str], suffix: dict | None = None) -> list[dict]:
    out = []
    for name in names:
        c = checks[name]
        out.append(row(f"doctor.{name}{(suffix or {}).get(name, '')}", c["status"],
                       c["figure"] + (f"; fix: {c['fix']}" if c.get("fix") else ""), c.get("measured")))
    return out


def run_step(step: str, a) -> list[dict]:
    """The rows of one step, in this process (the child's side)."""
    import torch
    cuda = torch.cuda.is_available()
    backend = "gpu" if cuda else "cpu"
    work, quick, videos = a.work, a.quick, a.videos
    if step == "env":
        env = environment()
        fig = (f"{env['gpu'] or 'CPU only'}, driver {env['driver']}, CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}, "
               f"DALI {env['dali']}, torch {env['torch']}")
        if env["unusable"]:
            return [row("env", FAIL, f"{fig}: {env['unusable']}", env)]
        return [row("env", PASS, fig, env)]
    if step.startswith("doctor.align"):
        align = int(step.removeprefix("doctor.align"))
        preset, extra = decode_config(quick)
        checks = doctor_rows(shard_set(work, "vp9", align, videos), backend, "env,decode", preset, extra, work,
                             f"a{align}")
        names = ["env.driver", "env.gpus", "decode.gpu", "decode.match", "decode.cache"] if align == 16 else \
            ["decode.cache"]
        return _doctor_to_rows(checks, names, {"decode.cache": f".align{align}"})
    if step.startswith("decode."):
        _, codec, align, trim = step.split(".")
        crop, batch, steps = (112, 4, 3) if quick else (224, 16, 20)
        m = decode_rate(shard_set(work, codec, int(align.removeprefix("align")), videos), backend, trim == "trimmed",
                        crop, batch, steps)
        return [row(step, PASS, f"{m['videos_per_s']} videos/s, {m['decoded_frames_per_s']} decoded frames/s "
                    f"({backend}, crop {crop}, batch {batch})", m)]
    if step == "train.doctor":
        preset, size = speed_config(quick)
        checks = doctor_rows(shard_set(work, "vp9", 16, videos), backend, "train", preset, size, work, "train")
        return _doctor_to_rows(checks, ["train.step", "train.bf16", "train.batch"])
    if step == "train.data_stall":
        preset, size = speed_config(quick)
        data = shard_set(work, "vp9", 16, videos)
        r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), "--config", preset, "--steps",
                            "2" if quick else "10", *size, f"backend={backend}", f"data={data}"],
                           cwd=REPO, capture_output=True, text=True)
        if r.returncode != 0:
            return [row(step, FAIL, f"benchmarks/train.py failed (exit {r.returncode}): {r.stderr[-300:]}")]
        tb = json.loads(r.stdout.strip().splitlines()[-1])
        return [row(step, PASS, f"DALI-fed {tb['real_data_fp32_videos_per_s']} videos/s vs cached "
                    f"{tb['cached_fp32_videos_per_s']}: ratio {tb['data_stall_ratio']}; bf16+cl3d / fp32 "
                    f"{tb['bf16_cl3d_over_fp32']} ({preset} settings)", tb)]
    if step == "dist.allreduce":
        gpus = torch.cuda.device_count() if cuda else 0
        path = work / "doctor-dist.json"
        path.unlink(missing_ok=True)
        preset, extra = decode_config(quick)
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                            "-m", "train", "doctor", "--config", preset, *extra,
                            f"data={shard_set(work, 'vp9', 16, videos)}", "backend=gpu", "--only", "dist.allreduce",
                            "--json", str(path)], cwd=REPO, capture_output=True, text=True)
        c = json.loads(path.read_text())["checks"]["dist.allreduce"] if path.is_file() else None
        return [row(step, c["status"] if c else FAIL, c["figure"] if c else r.stderr[-300:],
                    c.get("measured") if c else None)]
    raise SystemExit(f"unknown step {step!r}")


# ----------------------------------------------------------------------------------------------- the plan

# (step, rows it reports, estimated seconds on a GPU node (guessed: no GPU has run them yet), with --quick on
# a CPU (measured here on 2 shared cores, sharding included)) in the order they run: the
# open questions first (does torch/DALI see the GPU, does NVDEC decode the trimmed IVF stream, does the paper's
# step fit and run in bf16), then the comparisons that refine them.
def plan(cuda: bool, gpus: int, quick: bool) -> list[dict]:
    def step(name, rows, gpu_s, cpu_s, run=True, why=""):
        return {"step": name, "rows": rows, "estimate_s": gpu_s if cuda else cpu_s, "run": run, "why": why}

    paper_on_cpu = not cuda and not quick
    no_paper = ("the paper-size step (I3D 16x224^2, batch 16) is a GPU measurement: " + NO_GPU +
                "; --quick runs these rows at CPU size")
    steps = [
        step("doctor.align16", ["doctor.env.driver", "doctor.env.gpus", "doctor.decode.gpu", "doctor.decode.match",
                                "doctor.decode.cache.align16"], 90, 40),
        step("decode.vp9.align16.trimmed", ["decode.vp9.align16.trimmed"], 40, 20),
        step("train.doctor", ["doctor.train.step", "doctor.train.bf16", "doctor.train.batch"], 180, 60,
             run=not paper_on_cpu, why=no_paper),
        step("train.data_stall", ["train.data_stall"], 150, 200, run=not paper_on_cpu, why=no_paper),
        step("decode.vp9.align16.whole", ["decode.vp9.align16.whole"], 40, 20),
        step("decode.vp9.align2.trimmed", ["decode.vp9.align2.trimmed"], 60, 30),
        step("decode.vp9.align2.whole", ["decode.vp9.align2.whole"], 40, 20),
        step("doctor.align2", ["doctor.decode.cache.align2"], 30, 15),
    ]
    for align in (16, 2):
        steps.append(step(f"decode.h264.align{align}.trimmed", [f"decode.h264.align{align}.trimmed"], 0, 0, run=False,
                          why="GOP trimming cuts VP9 into IVF; H.264 samples are fed whole"))
        steps.append(step(f"decode.h264.align{align}.whole", [f"decode.h264.align{align}.whole"], 90, 0, run=cuda,
                          why=f"h264 decodes on the GPU only: {NO_GPU}"))
    steps.append(step("dist.allreduce", ["dist.allreduce"], 90, 0, run=gpus >= 2,
                      why=f"needs two or more GPUs on this node ({gpus} here)"))
    return steps


# ----------------------------------------------------------------------------------------------- the parent

class Report:
    """The rows so far; printed and written (atomically) after every row."""

    def __init__(self, path: Path | None, quick: bool, budget: float | None):
        self.path, self.t0 = path, time.perf_counter()
        self.data = {"benchmark": "acceptance", "device": "cpu", "quick": quick, "budget_s": budget,
                     "complete": False, "seconds": 0.0, "rows": []}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, r: dict, seconds: float | None = None) -> None:
        if seconds is not None:      # of the step that measured the row (a step may report several rows)
            r["seconds"] = round(seconds, 1)
        self.data["rows"].append(r)
        print(f"{r['row']:<32}  {r['status']:<4}  {r['figure'][:160]}", flush=True)
        self.write()

    def write(self) -> None:
        self.data["seconds"] = round(self.elapsed(), 1)
        if self.path:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps(self.data, default=str) + "\n")
            os.replace(tmp, self.path)


class Stopped(Exception):
    pass


def _on_signal(signum, frame):
    raise Stopped(signum)


def run_child(step: dict, a, timeout: float | None) -> list[dict]:
    """Run one step in a child process (its own process group); its rows, or FAIL rows saying what happened."""
    out = a.work / "steps" / f"{step['step']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--step", step["step"], "--work", str(a.work), "--videos",
           str(a.videos), "--step-out", str(out)] + (["--quick"] if a.quick else [])
    log = a.work / "steps" / f"{step['step']}.log"
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = p.wait(timeout=timeout)
            why = f"exit code {rc}" if rc >= 0 else f"killed by signal {signal.Signals(-rc).name}"
        except subprocess.TimeoutExpired:
            limit = (f"the per-step limit of {STEP_TIMEOUT_S} s: a hang?" if timeout >= STEP_TIMEOUT_S else
                     f"the --budget ran out; its estimate was ~{step.get('estimate_s', '?')} s")
            rc, why = None, f"stopped after {timeout:.0f} s ({limit})"
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    if rc == 0 and out.is_file():
        return json.loads(out.read_text())
    tail = " ".join(log.read_text(errors="replace").split()[-60:])[-400:] if log.is_file() else ""
    return [row(name, FAIL, f"the step did not finish ({why}; log {log}): {tail}") for name in step["rows"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized: 48-px crops, I3D width 0.25, few steps")
    p.add_argument("--work", type=Path, help="folder for the data and reports (default: a temp folder)")
    p.add_argument("--videos", type=int, default=24, help="videos per shard set (default 24)")
    p.add_argument("--json", type=Path, help="write the JSON report here, rewritten after every row")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="wall-clock budget: a step whose estimate does not fit in what is left is skipped (SKIP, "
                        "saying so), and a running step is stopped when the budget runs out")
    p.add_argument("--step", help=argparse.SUPPRESS)          # the child's side: run one step
    p.add_argument("--step-out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.work = (a.work or Path(tempfile.mkdtemp(prefix="acceptance-"))).resolve()
    a.work.mkdir(parents=True, exist_ok=True)

    if a.step:                                                # child: one step, rows to --step-out
        try:
            rows = run_step(a.step, a)
        except Exception as e:
            traceback.print_exc()
            rows = [row(name, FAIL, f"{type(e).__name__}: {str(e)[:400]}") for name in
                    next((s["rows"] for s in plan(True, 8, a.quick) if s["step"] == a.step), [a.step])]
        a.step_out.write_text(json.dumps(rows, default=str))
        return 0

    report = Report(a.json.resolve() if a.json else None, a.quick, a.budget)
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    stopped = None
    try:
        print(f"acceptance run: work folder {a.work}" + (f", budget {a.budget:g} s" if a.budget else ""), flush=True)
        t = time.perf_counter()
        env_rows = run_child({"step": "env", "rows": ["env"]}, a, STEP_TIMEOUT_S)
        report.add(env_rows[0], time.perf_counter() - t)
        env = env_rows[0].get("measured") or {}
        cuda, gpus = bool(env.get("cuda")), int(env.get("gpus") or 0)
        report.data["device"] = env.get("gpu") or "cpu"
        for s in plan(cuda, gpus, a.quick):
            left = None if a.budget is None else a.budget - report.elapsed()
            if env_rows[0]["status"] != PASS:
                why = f"not run: the env row FAILed ({env_rows[0]['figure'][-200:]}); fix that and rerun"
            elif not s["run"]:
                why = s["why"]
            elif left is not None and s["estimate_s"] > left:
                why = f"not run: needs ~{s['estimate_s']} s, {max(0.0, left):.0f} s of the --budget left"
            else:
                t = time.perf_counter()
                timeout = STEP_TIMEOUT_S if left is None else max(1.0, min(left, STEP_TIMEOUT_S))
                rows = run_child(s, a, timeout)
                for r in rows:
                    r["step"] = s["step"]
                    report.add(r, time.perf_counter() - t)
                continue
            for name in s["rows"]:
                report.add(row(name, SKIP, why), 0.0)
        report.data["complete"] = True
    except Stopped as e:
        stopped = e.args[0]
        report.data["stopped_by"] = signal.Signals(stopped).name
        print(f"stopped by {signal.Signals(stopped).name} after {report.elapsed():.0f} s: the rows above are in the "
              "report", flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    report.write()
    rows = report.data["rows"]
    width = max(len(r["row"]) for r in rows)
    print(f"\nacceptance run on {report.data['device']} ({report.data['seconds']} s)")
    for r in rows:
        print(f"{r['row']:<{width}}  {r['status']:<4}  {r['figure'][:150]}")
    print(json.dumps(report.data, default=str), flush=True)
    if stopped:
        return 128 + stopped
    return 1 if any(r["status"] == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
