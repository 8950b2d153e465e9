"""What every command shares: where this process runs (``Runtime``) and what it evaluates (``Context``)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from train import distributed as D
from train.recipe import cuda_switches, precision_context

from .data import Split


@dataclass
class Runtime:
    """Where and how this process runs: torchrun rank/device, DALI backend, precision, threads."""
    d: D.Dist
    backend: str            # DALI backend: "gpu" or "cpu"
    precision: str          # "bf16" (autocast) or "fp32"
    num_threads: int
    progress: bool = True

    @property
    def use_cuda(self) -> bool:
        return self.d.device.type == "cuda"

    def amp(self):
        return precision_context(self.precision, self.d.device)


def make_runtime(backend: str = "auto", precision: str = "auto", num_threads: int = 0, progress: bool = True) -> Runtime:
    use_cuda = torch.cuda.is_available() and backend != "cpu"
    if backend == "gpu" and not use_cuda:
        raise ValueError("--backend gpu needs CUDA, which this machine does not have: use --backend cpu")
    d = D.setup(use_cuda)
    if use_cuda:
        cuda_switches(cudnn_benchmark=True)    # the trainer's switches (train/recipe.py): fixed clip shapes
    if precision == "auto":
        precision = "bf16" if use_cuda else "fp32"   # bf16 autocast on the GPU; fp32 is the fast path on a CPU
    threads = num_threads or max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return Runtime(d, "gpu" if use_cuda else "cpu", precision, threads, progress and d.is_main)



@dataclass
class Context:
    command: str
    settings: dict                 # resolved protocol values (protocols.resolve) plus seed and protocol name
    backbone: nn.Module            # eval mode, on the CPU until a command moves it
    info: dict                     # load_backbone's: source, path, backbone, objective, pretrain config, sha256
    splits: dict[str, Split]
    rt: Runtime
    out: Path
    cache_dir: Path | None = None
    extra: dict = field(default_factory=dict)   # command-specific flags (cam's --videos, finetune's --resume, ...)

    def title(self, what: str, details: str, how: dict | None = None) -> str:
        """The printed table's title: "<what>: <backbone> <source> (<checkpoint or seed>); <details>", plus where
        the features came from when ``how`` (extract_train_test's second result) is given."""
        model = self.info["path"] or f"seed {self.info.get('seed')}"
        features = ""
        if how is not None:
            features = "; features: " + ", ".join(f"{n} {'cached' if h['cached'] else 'extracted'}"
                                                  for n, h in how.items())
        return f"{what}: {self.info['backbone']} {self.info['source']} ({model}); {details}{features}"

    def describe(self) -> dict:
        """The run's identity for results.json."""
        return {"protocol": self.settings.get("protocol"), "settings": self.settings,
                "model": {k: v for k, v in self.info.items() if k != "pretrain"},
                "pretrain_config": self.info.get("pretrain") or None,
                "data": {n: {"dir": str(s.dir), "videos": s.num_videos, "classes": len(s.classes), "dataset": s.dataset,
                             "manifest_sha256": s.manifest_sha} for n, s in self.splits.items()},
                "world_size": self.rt.d.world_size, "device": str(self.rt.d.device), "precision": self.rt.precision,
                "dali_backend": self.rt.backend}
