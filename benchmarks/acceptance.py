"""The first-GPU acceptance run: everything owed about the GPU path, measured by one command in a few minutes.

    ./run acceptance                      # = python benchmarks/acceptance.py (one node; every visible GPU)
    python benchmarks/acceptance.py --quick --work /tmp/acc     # the CPU smoke form (what the test suite runs)

It makes its own data (the synthetic sample at short side 256: 320x240 sources become 336x256 with the default
16-alignment and 342x256 with `--align 2`, in VP9 and, on a GPU, H.264) and needs nothing but this checkout, its
Python packages and, for the GPU rows, a CUDA device. Rows (one JSON line with all of them, then a table):

* env            GPU, driver, CUDA, cuDNN, DALI, torch, and the doctor's env.driver / env.gpus rows
* decode.match   mixed (NVDEC) decoding against the CPU backend on the same samples (the doctor's pixel check)
* decode.cache   the doctor's decoder-cache row on the 16-aligned and the unaligned set
* decode.<codec>.<align>.<trim>   videos/s and decoded frames/s of the real FIMA pretraining views, GOP trimming
                 on and off, 16-aligned and unaligned (DALI's decoder-cache trap shows as a gap), VP9 and H.264
* train.*        the doctor's train.step / train.bf16 / train.batch at the paper's size (I3D 16x224^2; bf16 +
                 channels_last_3d vs fp32: loss agreement, peak memory, the largest batch that fits), and
                 benchmarks/train.py's data-stall ratio (videos/s fed by DALI / videos/s on a cached batch) and
                 bf16 speed-up
* dist.allreduce the doctor's NCCL all-reduce under `torchrun --nproc-per-node=<GPUs>` (two or more GPUs)

A row that cannot run here says why (status SKIP); `--quick` shrinks every size for a CPU. Exit code 0 unless a
row FAILs.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import sample_shards  # noqa: E402

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def row(name: str, status: str, figure: str = "", measured: dict | None = None) -> dict:
    return {"row": name, "status": status, "figure": figure, "measured": measured or {}}


def shard_sets(work: Path, codecs: list[str], videos: int) -> dict[tuple[str, int], Path]:
    """(codec, align) -> OUT/train of the synthetic sample, 320x240 sources at short side 256."""
    from preprocess.cli import main as preprocess_main
    src = sample_shards(work / "sample", short_side=256, train_per_class=max(1, videos // 6), test_per_class=1)
    sets = {}
    for codec in codecs:
        for align in (16, 2):
            out = work / f"{codec}-a{align}"
            if not (out / "train" / "manifest.json").is_file():
                rc = preprocess_main([str(src.parent / "videos"), str(out), "--codec", codec, "--align", str(align),
                                      "--max-per-shard", "32", "--no-progress"])
                if rc != 0:
                    raise SystemExit(f"sharding {out} failed")
            sets[(codec, align)] = out / "train"
    return sets


def environment(cuda: bool) -> dict:
    import nvidia.dali as dali
    m = {"torch": torch.__version__, "torch_cuda": torch.version.cuda, "dali": dali.__version__,
         "cudnn": torch.backends.cudnn.version() if cuda else None, "gpu": None, "gpus": 0, "driver": None}
    if cuda:
        m.update(gpu=torch.cuda.get_device_name(0), gpus=torch.cuda.device_count())
        try:
            m["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                         capture_output=True, text=True, timeout=30).stdout.split()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            pass
    return m


def doctor_rows(data: Path, backend: str, only: str, overrides: list[str], work: Path, tag: str) -> dict:
    """The doctor's checks ``only`` on ``data``: {check: its JSON (status, figure, fix, measured)}."""
    from train.doctor import main as doctor_main
    path = work / f"doctor-{tag}.json"
    doctor_main(["--config", "demo", f"data={data}", f"backend={backend}", f"out_dir={work / 'doctor-run'}",
                 "--only", only, "--samples", "4", "--json", str(path), *overrides])
    return json.loads(path.read_text())["checks"]


def decode_rate(data: Path, backend: str, trim: bool, crop: int, batch: int, steps: int) -> dict:
    """Videos/s and decoded frames/s of FIMA pretraining views (two windows, global + local diff clips)."""
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


def train_bench(data: Path, overrides: list[str]) -> dict:
    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "train.py"), *overrides, f"data={data}"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-1500:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU-sized: 48-px crops, I3D width 0.25, few steps")
    p.add_argument("--work", type=Path, help="folder for the data and reports (default: a temp folder)")
    p.add_argument("--videos", type=int, default=24, help="videos per shard set (default 24)")
    p.add_argument("--json", type=Path, help="also write the JSON report here")
    a = p.parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="acceptance-"))
    work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    no_gpu = "no CUDA device on this machine"
    t_start = time.perf_counter()
    rows: list[dict] = []

    env = environment(cuda)
    rows.append(row("env", PASS, f"{env['gpu'] or 'CPU only'}, driver {env['driver']}, CUDA {env['torch_cuda']}, "
                    f"cuDNN {env['cudnn']}, DALI {env['dali']}, torch {env['torch']}", env))
    codecs = ["vp9", "h264"] if cuda else ["vp9"]
    sets = shard_sets(work, codecs, a.videos)
    backend = "gpu" if cuda else "cpu"

    # the doctor's environment and decoding rows, on both alignments
    for align in (16, 2):
        checks = doctor_rows(sets[("vp9", align)], backend, "env,decode", [], work, f"a{align}")
        names = ["decode.cache"] + (["env.driver", "env.gpus", "decode.gpu", "decode.match"] if align == 16 else [])
        for name in names:
            c = checks[name]
            rows.append(row(f"doctor.{name}" + (f".align{align}" if name == "decode.cache" else ""), c["status"],
                            c["figure"] + (f"; fix: {c['fix']}" if c.get("fix") else ""), c.get("measured")))

    # decode throughput of the real pretraining views
    crop, batch, steps = (112, 4, 3) if a.quick else (224, 16, 20)
    for codec in ("vp9", "h264"):
        for align in (16, 2):
            for trim in (True, False):
                name = f"decode.{codec}.align{align}.{'trimmed' if trim else 'whole'}"
                if (codec, align) not in sets:
                    rows.append(row(name, SKIP, f"{codec} decodes on the GPU only: {no_gpu}"))
                    continue
                if codec == "h264" and trim:
                    rows.append(row(name, SKIP, "GOP trimming cuts VP9 into IVF; H.264 samples are fed whole"))
                    continue
                m = decode_rate(sets[(codec, align)], backend, trim, crop, batch, steps)
                rows.append(row(name, PASS, f"{m['videos_per_s']} videos/s, {m['decoded_frames_per_s']} decoded "
                                f"frames/s ({backend}, crop {crop}, batch {batch})", m))

    # the training step: the doctor's rows and the data-stall ratio, at the paper's size on a GPU
    size = (["backbone_width=0.25", "crop=48", "batch_size=2", "precision=fp32", "channels_last=false"] if a.quick
            else ["backbone_width=1.0", "crop=224", "batch_size=16", "precision=bf16", "channels_last=true", "num_threads=8"])
    checks = doctor_rows(sets[("vp9", 16)], backend, "train", ["objective=fima", "frames=16", *size], work, "train")
    for name in ("train.step", "train.bf16", "train.batch"):
        c = checks[name]
        rows.append(row(f"doctor.{name}", c["status"], c["figure"], c.get("measured")))
    try:
        tb = train_bench(sets[("vp9", 16)], ["--config", "demo", "--steps", "2" if a.quick else "10",
                                             "objective=fima", f"backend={backend}", *size])
        rows.append(row("train.data_stall", PASS, f"DALI-fed {tb['real_data_fp32_videos_per_s']} videos/s vs cached "
                        f"{tb['cached_fp32_videos_per_s']}: ratio {tb['data_stall_ratio']}; bf16+cl3d / fp32 "
                        f"{tb['bf16_cl3d_over_fp32']}", tb))
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        rows.append(row("train.data_stall", FAIL, f"benchmarks/train.py failed: {str(e)[-300:]}"))

    # NCCL across the GPUs of this node
    gpus = torch.cuda.device_count() if cuda else 0
    if gpus >= 2:
        path = work / "doctor-dist.json"
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
                            "-m", "train", "doctor", "--config", "demo", f"data={sets[('vp9', 16)]}", "backend=gpu",
                            "--only", "dist.allreduce", "--json", str(path)], cwd=REPO, capture_output=True,
                           text=True, timeout=600)
        c = json.loads(path.read_text())["checks"]["dist.allreduce"] if path.is_file() else None
        rows.append(row("dist.allreduce", c["status"] if c else FAIL, c["figure"] if c else r.stderr[-300:],
                        c.get("measured") if c else None))
    else:
        rows.append(row("dist.allreduce", SKIP, f"needs two or more GPUs on this node ({gpus} here)"))

    report = {"benchmark": "acceptance", "device": env["gpu"] or "cpu", "quick": a.quick,
              "seconds": round(time.perf_counter() - t_start, 1), "rows": rows}
    width = max(len(r["row"]) for r in rows)
    print(f"\nacceptance run on {report['device']} ({report['seconds']} s)")
    for r in rows:
        print(f"{r['row']:<{width}}  {r['status']:<4}  {r['figure'][:150]}")
    line = json.dumps(report, default=str)
    if a.json:
        a.json.write_text(line + "\n")
    print(line)
    return 1 if any(r["status"] == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
