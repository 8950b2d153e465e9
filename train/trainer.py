"""A pretraining run, top to bottom: FIMA, MoCo, FAME or the multi-level method on DALI batches, one process or many.

    python -m train --config demo                                   # one process (CPU or one GPU)
    torchrun --nproc-per-node=8 -m train --config k400_i3d_fima     # one node, 8 GPUs
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m train --config ...

Order of things: distributed set-up, run folder, model, data (what the model requires), optimiser,
precision/compile/DDP wrapping, resume, then the loop (train/loop.py, the one fine-tuning runs too; here with the
quality monitor as its periodic evaluation, when given). Checkpoints hold everything a resumed run needs to continue the same sample stream
with the same augmentations (the pipeline draws every random parameter from (seed, epoch, position)).
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from model import build_objective
from pipeline import pretrain_loader
from preprocess.shard_format import atomic_write

from . import distributed as D
from .bad_samples import BadSamples
from .checkpoint import CheckpointManager, ResumeError, lock_run_folder, resume_from, snapshot
from .config import DEFAULTS
from .loop import Loop, TrainingError
from .monitor import QualityMonitor
from .recipe import (aug_config, build_optimizer, device_and_backend, lr_at, objective_kwargs, peak_lr,
                     precision_context, wrap)
from .run_log import RunLog

# keys that change the model or the sample stream: a resumed run must agree on them
ARCH_KEYS = ("objective", "backbone", "backbone_width", "frames", "stride", "crop", "queue_size", "dense_queue_size",
             "cluster", "data", "seed")


def train(cfg: dict, resume: str = "auto", progress: bool = True) -> int:
    # --- distributed, device, seeds -----------------------------------------------------------------------
    use_cuda, backend = device_and_backend(cfg)
    d = D.setup(use_cuda)
    torch.manual_seed(cfg["seed"])                       # identical initial weights on every rank
    out_dir = Path(cfg["out_dir"])
    ckpts = CheckpointManager(out_dir / "checkpoints", cfg["keep_ckpts"], d.is_main)
    if d.is_main:
        try:
            run_lock = lock_run_folder(out_dir)   # noqa: F841 (held while this function runs)
        except RuntimeError as e:
            raise TrainingError(str(e)) from None
        atomic_write(out_dir / "config.yaml", yaml.safe_dump(cfg, sort_keys=False))

    # --- model and data ------------------------------------------------------------------------------------
    # the model is the contract: the loader produces exactly the inputs the built objective requires
    model = build_objective(cfg["objective"], **objective_kwargs(cfg, d.world_size)).to(d.device)
    loader = pretrain_loader(cfg["data"], tuple(model.required_inputs), batch_size=cfg["batch_size"],
                             config=aug_config(cfg), seed=cfg["seed"], rank=d.rank, world_size=d.world_size,
                             backend=backend, device_id=d.local_rank if backend == "gpu" else None,
                             num_threads=cfg["num_threads"])
    bad = BadSamples(out_dir, loader, cfg["max_bad_samples"], cfg["exclude_samples"], d)   # set aside, not fatal
    monitor = None
    if cfg["monitor"] and d.is_main:   # rank 0 measures; the others wait at the next collective
        monitor = QualityMonitor(cfg["monitor"], frames=cfg["frames"], stride=cfg["stride"], crop=cfg["crop"],
                                 clips=cfg["monitor_clips"], k=cfg["monitor_k"], batch_size=cfg["batch_size"],
                                 backend=backend, device_id=d.local_rank if backend == "gpu" else None,
                                 num_threads=cfg["num_threads"])
    steps_per_epoch = len(loader)
    total_steps = cfg["epochs"] * steps_per_epoch
    stop_step = min(total_steps, cfg["max_steps"]) if cfg["max_steps"] else total_steps
    global_batch = cfg["batch_size"] * d.world_size

    # --- optimiser, precision, wrapping (train/recipe.py) --------------------------------------------------------
    peak = peak_lr(cfg, global_batch)
    opt = build_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], peak)
    decay_step = cfg["decay_epoch"] * steps_per_epoch if cfg["schedule"] == "step" else None
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg["precision"] == "fp16")
    amp = precision_context(cfg["precision"], d.device)
    model, raw_model = wrap(model, cfg, d, use_cuda)     # raw_model: unwrapped, what checkpoints hold
    torch.manual_seed(cfg["seed"] * 1000 + d.rank + 1)   # per-rank stream for dropout / FAME permutations

    # --- resume -------------------------------------------------------------------------------------------
    parts = {"model": raw_model, "optimizer": opt, "scaler": scaler, "loader": loader}   # what a checkpoint restores
    identity = {k: cfg[k] for k in ARCH_KEYS}                                            # what it must agree on
    try:   # checkpoints from before "identity" was stored: the same keys from their config (later keys: defaults)
        state = resume_from(ckpts, resume, identity, parts, d,
                            stored=lambda st: st.get("identity") or {k: st["config"].get(k, DEFAULTS[k][0])
                                                                     for k in ARCH_KEYS}) or {}
    except ResumeError as e:
        raise TrainingError(str(e)) from None
    step, monitor_base = state.get("step", 0), state.get("monitor_random_init")

    metrics = RunLog(out_dir, stop_step, step, enabled=d.is_main, progress=progress)

    def measure_quality(step: int) -> None:
        """The monitor's kNN top-1 (rank 0), logged with the random-init value measured at step 0."""
        nonlocal monitor_base
        if monitor is None:
            return
        scalars = monitor.measure(raw_model.encoder_q, amp)
        if step == 0:
            monitor_base = scalars["monitor/knn_top1"]
        if monitor_base is not None:
            scalars["monitor/knn_top1_random_init"] = monitor_base
        metrics.log(step, scalars)
        metrics.print(f"step {step}: kNN top-1 on {cfg['monitor']} {scalars['monitor/knn_top1']:.1%}"
                      + (f" (random init {monitor_base:.1%})" if monitor_base is not None else ""))

    # --- the loop (train/loop.py, shared with fine-tuning) -------------------------------------------------
    if d.is_main:
        metrics.print(f"{cfg['objective']} / {cfg['backbone']}: {loader.num_videos} videos, {steps_per_epoch} steps "
                      f"per epoch x {cfg['epochs']} epochs, global batch {global_batch} on {d.world_size} "
                      f"{'GPU' if use_cuda else 'CPU'} process(es), peak lr {peak:.4g}, {cfg['precision']}")
        if bad.excluded:
            metrics.print(f"{bad.excluded} samples set aside from the start ({bad.path.name} / exclude_samples)")
        for warning in raw_model.run_warnings(global_batch=global_batch, steps_per_epoch=steps_per_epoch,
                                              total_steps=stop_step, num_videos=loader.num_videos):
            metrics.print(f"warning: {warning}")
    warmup = int(cfg["warmup_epochs"] * steps_per_epoch)
    loop = Loop(model, loader, opt, scaler, amp, d, metrics, global_batch=global_batch,
                lr_at=lambda s: lr_at(s, total_steps, warmup, peak, decay_step),
                log_every=cfg["log_every"], ckpt_every=cfg["ckpt_every"], ckpts=ckpts,
                snapshot=lambda step: snapshot(parts, d, step=step, config=cfg, identity=identity,
                                               monitor_random_init=monitor_base),
                max_bad_steps=cfg["max_bad_steps"], evaluate=measure_quality if monitor else None,
                eval_every=cfg["monitor_every"] if monitor else 0, bad=bad, data=cfg["data"])
    try:
        if step == 0:
            measure_quality(0)
        step, code = loop.run(step, stop_step)
        if d.is_main and code == 0:
            metrics.print(f"done: {step} steps, checkpoints in {ckpts.folder}, TensorBoard logs in {out_dir / 'tb'}")
        return code
    finally:
        metrics.close()
        loader.close()
        if monitor is not None:
            monitor.close()
        D.barrier(d)
        D.cleanup()
