"""The doctor's vocabulary: check names, statuses, tolerances, and the two exceptions a check raises."""
from __future__ import annotations

from dataclasses import dataclass, field

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

# name -> what it checks (table order = this order; the run order is run.RUN_ORDER)
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
    """One row of the report. A check returns it with an empty name; the runner names and times it."""
    name: str
    status: str
    figure: str = ""
    fix: str = ""                      # what to do (FAIL/WARN), or why (SKIP)
    measured: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"status": self.status, "figure": self.figure, "fix": self.fix, "measured": self.measured,
                "seconds": round(self.seconds, 3)}


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / MiB:.1f} MiB"
