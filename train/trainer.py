"""The pretraining loop, top to bottom: FIMA, MoCo or FAME on DALI batches, one process or many.

    python -m train --config demo                                   # one process (CPU or one GPU)
    torchrun --nproc-per-node=8 -m train --config k400_i3d_fima     # one node, 8 GPUs
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m train --config ...

Order of things: distributed set-up, run folder, model, data (what the model requires), optimiser,
precision/compile/DDP wrapping, resume, then the loop (with the quality monitor, when given). Checkpoints hold everything a resumed run needs to continue the same sample stream
with the same augmentations (the pipeline draws every random parameter from (seed, epoch, position)).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import yaml

from model import build_objective
from pipeline import pretrain_loader

from . import distributed as D
from .bad_samples import BadSamples
from .checkpoint import (CheckpointError, CheckpointManager, PreemptionFlag, ResumeError, lock_run_folder, restore,
                         resume_from, snapshot)
from .config import DEFAULTS
from .run_log import RunLog
from .monitor import QualityMonitor
from .recipe import (aug_config, build_optimizer, device_and_backend, lr_at, objective_kwargs, peak_lr,
                     precision_context, train_step, wrap)

# keys that change the model or the sample stream: a resumed run must agree on them
ARCH_KEYS = ("objective", "backbone", "backbone_width", "frames", "stride", "crop", "queue_size", "dense_queue_size",
             "cluster", "data", "seed")


class TrainingError(RuntimeError):
    """A run that cannot continue (bad data, repeated non-finite losses, an incompatible checkpoint)."""


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
        tmp = out_dir / f".config.yaml.{os.getpid()}"
        tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
        os.replace(tmp, out_dir / "config.yaml")

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
    step, monitor_base = 0, None
    parts = {"model": raw_model, "optimizer": opt, "scaler": scaler, "loader": loader}   # what a checkpoint restores
    try:   # checkpoints from before "identity" was stored: the same keys from their config (later keys: defaults)
        found = resume_from(ckpts, resume, {k: cfg[k] for k in ARCH_KEYS},
                            stored=lambda st: st.get("identity") or {k: st["config"].get(k, DEFAULTS[k][0])
                                                                     for k in ARCH_KEYS})
    except ResumeError as e:
        raise TrainingError(str(e)) from None
    if found:
        state, path = found
        restore(state, parts, d.rank)
        step = state["step"]
        monitor_base = state.get("monitor_random_init")
        if d.is_main:
            print(f"resumed from {path} at step {step} (epoch {loader.epoch}, batch {loader.step})")

    def save() -> None:
        """A checkpoint (rank 0 writes; every rank takes part): a write that fails stops every rank together."""
        state = snapshot(parts, d, step=step, config=cfg, identity={k: cfg[k] for k in ARCH_KEYS},
                         monitor_random_init=monitor_base)
        if d.is_main and len(set(state["rank_checksums"])) > 1:   # DDP keeps weights equal; say so if not
            metrics.print(f"warning: the ranks' weights differ at step {step} (checksums {state['rank_checksums']})")
        error = None
        try:
            ckpts.save(state, step)
        except CheckpointError as e:
            error = e
        if D.any_rank(error is not None, d):
            raise TrainingError(str(error) if error else "rank 0 could not write a checkpoint (see its message)")

    def measure_quality() -> None:
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

    # --- the loop -----------------------------------------------------------------------------------------
    metrics = RunLog(out_dir, stop_step, step, enabled=d.is_main, progress=progress)
    if d.is_main:
        metrics.print(f"{cfg['objective']} / {cfg['backbone']}: {loader.num_videos} videos, {steps_per_epoch} steps "
                      f"per epoch x {cfg['epochs']} epochs, global batch {global_batch} on {d.world_size} "
                      f"{'GPU' if use_cuda else 'CPU'} process(es), peak lr {peak:.4g}, {cfg['precision']}")
        if bad.excluded:
            metrics.print(f"{bad.excluded} samples set aside from the start ({bad.path.name} / exclude_samples)")
        # MoCo-style queues take 2 keys per video per step; one that outlives an epoch holds each video's own
        # earlier keys as negatives (on a small dataset that stalls the instance task)
        queued = cfg["objective"] in ("moco", "fame", "fima")   # the objectives with a queue and an EMA key encoder
        span = cfg["queue_size"] / (2 * global_batch)
        if queued and span >= steps_per_epoch:
            fit = max(2 * global_batch, 2 * global_batch * (steps_per_epoch // 8))
            metrics.print(f"warning: queue_size {cfg['queue_size']} holds the keys of the last {span:.0f} steps, more "
                          f"than an epoch ({steps_per_epoch} steps of {loader.num_videos} videos): every video's own "
                          f"earlier keys are among its negatives. The UCF101 recipe's queue spans ~1/8 of an epoch "
                          f"(2240 keys, 9537 videos); consider queue_size={fit}")
        kept = cfg["momentum_ema"] ** stop_step          # share of the key encoder's initial weights left at the end
        if queued and kept > 0.5:
            metrics.print(f"warning: with momentum_ema {cfg['momentum_ema']} over {stop_step} steps the key encoder "
                          f"keeps {kept:.0%} of its random initial weights; a short run "
                          f"wants a lower momentum (e.g. momentum_ema={max(0.0, min(0.99, 1 - 5 / stop_step)):.3g})")
    preempted = PreemptionFlag()
    bad_in_a_row, window = 0, {"n": 0, "wait": 0.0, "time": 0.0, "sums": {}}
    model.train()
    try:
        if step == 0:
            measure_quality()
        while step < stop_step:
            raw_model.set_epoch(loader.epoch)    # objectives with epoch-dependent terms (multi-level)
            t_ready = time.perf_counter()
            for batch in loader:
                t_batch = time.perf_counter()
                lr = lr_at(step, total_steps, int(cfg["warmup_epochs"] * steps_per_epoch), peak, decay_step)
                for g in opt.param_groups:
                    g["lr"] = lr
                out, updated = train_step(model, batch, opt, scaler, amp, d)
                loss = out["loss"]
                if updated:
                    bad_in_a_row = 0
                else:   # the update was skipped on every rank (they agreed); keep going unless it persists
                    bad_in_a_row += 1
                    metrics.print(f"step {step}: non-finite loss or gradient (loss {float(loss):.3g}), update skipped "
                                  f"({bad_in_a_row} in a row)")
                step += 1
                if use_cuda:
                    torch.cuda.synchronize(d.device)   # honest step times for the data-wait fraction
                t_done = time.perf_counter()
                window["n"] += 1
                window["wait"] += t_batch - t_ready
                window["time"] += t_done - t_ready
                for k, v in out.items():
                    if v.numel() == 1:
                        window["sums"][k] = window["sums"].get(k, 0.0) + float(v.detach())
                metrics.step(postfix={"loss": float(loss.detach()), "lr": lr})
                if bad_in_a_row >= cfg["max_bad_steps"]:
                    save()
                    raise TrainingError(f"{bad_in_a_row} non-finite losses or gradients in a row at step {step}: lower "
                                        "lr, use precision=fp32 to check, or inspect the data; a checkpoint was saved")
                if step % cfg["log_every"] == 0 or step == stop_step:
                    n = window["n"]
                    scalars = D.mean_over_ranks({f"loss/{k}" if k.startswith("loss") else f"metric/{k}": s / n
                                                 for k, s in window["sums"].items()}, d)
                    scalars.update({"lr": lr, "epoch": step / steps_per_epoch,
                                    "videos_per_s": n * global_batch / window["time"],
                                    "data_wait_fraction": window["wait"] / window["time"]})
                    scalars["data/bad_samples"] = bad.count
                    if use_cuda:
                        scalars["gpu_mem_gib"] = torch.cuda.max_memory_allocated(d.device) / 2**30
                    metrics.log(step, scalars)
                    window = {"n": 0, "wait": 0.0, "time": 0.0, "sums": {}}
                if step % cfg["monitor_every"] == 0 or step == stop_step:
                    measure_quality()
                found = loader.take_new_bad()            # one collective for both rank-wide decisions
                stop, any_found = D.max_over_ranks([int(bool(preempted)), len(found)], d)
                for r in bad.share(found, bool(any_found)):
                    metrics.print(f"step {step}: bad sample set aside: {r['error']}")
                if bad.over_limit():
                    save()
                    raise TrainingError(bad.stop_message(step, cfg["data"]))
                if stop or step % cfg["ckpt_every"] == 0 or step == stop_step:
                    save()
                if stop:
                    metrics.print(f"pre-empted (signal {preempted.signum or 'on another rank'}): checkpoint at step "
                                  f"{step} saved in {ckpts.folder}; resume with --resume auto")
                    return PreemptionFlag.EXIT_PREEMPTED
                if step >= stop_step:
                    break
                t_ready = time.perf_counter()
        if d.is_main:
            metrics.print(f"done: {step} steps, checkpoints in {ckpts.folder}, TensorBoard logs in {out_dir / 'tb'}")
        return 0
    finally:
        metrics.close()
        loader.close()
        if monitor is not None:
            monitor.close()
        D.barrier(d)
        D.cleanup()
