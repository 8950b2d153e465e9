"""env.*: the Python, torch, DALI, driver, GPU, ffmpeg, disk and shared-memory checks, each a function of the Facts."""
from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

from preprocess.shard_format import CODECS

from .core import PASS, WARN, FAIL, DRIVER_FOR_CUDA, GiB, MiB, Skip, Fail, Result, gib, mib
from .facts import Facts, has_nvidia_driver

ENCODERS = tuple(c.encoder for c in CODECS if c.encoder)   # what `python -m preprocess` writes with


def check_python(facts: Facts) -> Result:
    fig = f"{platform.python_implementation()} {platform.python_version()} ({sys.executable})"
    if sys.version_info < (3, 11):
        raise Fail(fig, "this project needs Python >= 3.11 (pyproject.toml): use the image or a newer venv")
    return Result("", PASS, fig, measured={"version": platform.python_version()})


def check_torch(facts: Facts) -> Result:
    torch = facts.torch
    m = {"version": torch.__version__, "cuda": torch.version.cuda,
         "cudnn": torch.backends.cudnn.version() if torch.version.cuda else None}
    if torch.version.cuda is None:
        fig = f"torch {torch.__version__}, CPU-only build"
        if facts.cfg["backend"] == "gpu" or has_nvidia_driver():
            raise Fail(fig, "a GPU run needs a CUDA build of torch: pip install torch==" +
                       torch.__version__.split("+")[0] + " --index-url https://download.pytorch.org/whl/cu130 "
                       "(the cuXYZ matching DALI's CUDA major), or use the project's image", m)
        return Result("", PASS, fig + " (fine for backend=cpu)", measured=m)
    fig = f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {m['cudnn']}"
    if facts.cuda:
        try:
            m["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
            fig += f", NCCL {m['nccl']}"
        except Exception:
            pass
    return Result("", PASS, fig, measured=m)


def check_dali(facts: Facts) -> Result:
    try:
        import nvidia.dali as dali
    except ImportError as e:
        raise Fail(f"DALI not importable ({e})", "pip install nvidia-dali-cuda130==2.4.0 (the CUDA major of "
                   "torch; pyproject.toml pins it), from https://pypi.nvidia.com")
    torch_major, dali_major, dist_name = facts.cuda_majors
    m = {"version": dali.__version__, "cuda_major": dali_major, "package": dist_name, "torch_cuda_major": torch_major}
    fig = f"DALI {dali.__version__} ({dist_name or 'package name unknown'}, CUDA {dali_major})"
    if torch_major is None:
        return Result("", PASS, fig + "; torch is CPU-only, majors not compared", measured=m)
    if dali_major is None:
        return Result("", WARN, fig, f"cannot tell DALI's CUDA major: make sure it is {torch_major} "
                      f"(nvidia-dali-cuda{torch_major}0)", measured=m)
    if dali_major != torch_major:
        status = FAIL if facts.use_cuda or facts.cfg["backend"] == "gpu" else WARN
        return Result("", status, fig + f" vs torch CUDA {torch_major}: mismatch",
                      f"install the DALI build for CUDA {torch_major}: pip uninstall {dist_name}; pip install "
                      f"--extra-index-url https://pypi.nvidia.com nvidia-dali-cuda{torch_major}0 (or torch built "
                      f"for CUDA {dali_major})", measured=m)
    return Result("", PASS, fig + f" = torch CUDA {torch_major}", measured=m)


def check_driver(facts: Facts) -> Result:
    version = _driver_version()
    if version is None:
        why = "no CUDA device: no NVIDIA driver found (no /proc/driver/nvidia/version, no nvidia-smi)"
        if facts.cfg["backend"] == "gpu":
            raise Fail(why, "backend=gpu needs the NVIDIA driver: run on a GPU node (docker: --gpus all)")
        raise Skip(why)
    torch_major, dali_major, _ = facts.cuda_majors
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


def check_gpus(facts: Facts) -> Result:
    torch = facts.torch
    facts.require_cuda("training")
    n = torch.cuda.device_count()
    gpus, busy = [], []
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        gpus.append({"index": i, "name": p.name, "total_bytes": total, "free_bytes": free,
                     "capability": f"{p.major}.{p.minor}"})
        if free < 0.9 * total:
            busy.append(f"GPU {i}: {gib(total - free)} already in use")
    names = sorted({g["name"] for g in gpus})
    fig = f"{n}x {', '.join(names)} ({gib(gpus[0]['total_bytes'])} each, {gib(gpus[0]['free_bytes'])} free on 0)"
    m = {"count": n, "gpus": gpus}
    procs = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if procs > n:
        raise Fail(fig, f"torchrun starts {procs} processes per node but only {n} GPUs are visible: "
                   f"--nproc-per-node={n} (NPROC_PER_NODE), or check CUDA_VISIBLE_DEVICES / --gpus", m)
    if busy:
        return Result("", WARN, fig, "; ".join(busy) + ": another process holds GPU memory (nvidia-smi)", m)
    return Result("", PASS, fig, measured=m)


def check_ffmpeg(facts: Facts) -> Result:
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
    have = {enc: bool(re.search(rf"^\s*V\S*\s+{re.escape(enc)}\s", encoders, re.M)) for enc in ENCODERS}
    m = {"path": exe, "version": version, **{f"encoder_{k}": v for k, v in have.items()}}
    fig = f"{version.split(' Copyright')[0]}; " + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in have.items())
    if not all(have.values()):
        lacking = [k for k, v in have.items() if not v]
        return Result("", WARN, fig, f"this ffmpeg lacks {', '.join(lacking)}: sharding with that codec fails; "
                      "use imageio-ffmpeg's binary (pip install imageio-ffmpeg) or set FFMPEG_BINARY", m)
    return Result("", PASS, fig, measured=m)


def check_disk(facts: Facts) -> Result:
    out = Path(facts.cfg["out_dir"]).resolve()
    probe = out
    while not probe.exists():
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    writable = os.access(probe, os.W_OK)
    state = facts.checkpoint_bytes
    keep = facts.cfg["keep_ckpts"]
    need = state * (keep + 1) + GiB     # kept checkpoints + the one being written + ~1 GiB of logs
    m = {"path": str(out), "free_bytes": usage.free, "checkpoint_bytes_estimate": state, "need_bytes": need,
         "writable": writable}
    fig = f"{gib(usage.free)} free at {probe}; ~{mib(state)} per checkpoint x {keep + 1} + 1 GiB logs"
    if not writable:
        raise Fail(fig + "; not writable", f"cannot write under {probe}: set out_dir= to a writable folder "
                   "(a bind mount with your uid: docker run --user $(id -u):$(id -g))", m)
    if usage.free < need:
        raise Fail(fig, f"needs ~{gib(need)}: free space, lower keep_ckpts, or point out_dir= at a larger disk", m)
    if usage.free < 2 * need:
        return Result("", WARN, fig, "little headroom: free space or point out_dir= at a larger disk", m)
    return Result("", PASS, fig, measured=m)


def check_shm(facts: Facts) -> Result:
    import resource
    try:
        shm = shutil.disk_usage("/dev/shm").total
    except OSError:
        shm = 0
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    unlimited = soft == resource.RLIM_INFINITY
    m = {"shm_bytes": shm, "memlock_bytes": None if unlimited else soft}
    fig = f"/dev/shm {gib(shm)}, memlock {'unlimited' if unlimited else mib(soft)}"
    if facts.run_backend == "gpu":
        problems = []
        if shm < GiB:
            problems.append("/dev/shm under 1 GiB: docker run --shm-size=64g (or --ipc=host); compose sets shm_size")
        if not unlimited and soft < 64 * MiB:
            problems.append("memlock limited: ulimit -l unlimited (docker: --ulimit memlock=-1) for pinned memory")
        if problems:
            return Result("", WARN, fig, "; ".join(problems), m)
    return Result("", PASS, fig + ("" if facts.run_backend == "gpu" else " (GPU runs need these)"), measured=m)


def _driver_version() -> str | None:
    """The kernel module's version, or nvidia-smi's; None without an NVIDIA driver."""
    try:
        m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)",
                      Path("/proc/driver/nvidia/version").read_text())
        if m:
            return m.group(1)
    except OSError:
        pass
    smi = shutil.which("nvidia-smi")
    try:
        out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split() if smi else []
    except Exception:
        return None
    return out[0] if out else None
