"""Fine-tuning: pretrained backbone + dropout + linear classifier, trained end to end on the train split.

    python -m evaluate finetune --checkpoint RUN/checkpoints/ckpt-N.pt --data shards/ucf101
    torchrun --nproc-per-node=8 -m evaluate finetune --checkpoint ... --data ...    # DDP, global batch split

One random window per video per epoch (random-resized crop, flip, grayscale / colour jitter), SGD (or Adam)
with the lr multiplied by lr_decay at each milestone epoch, bf16 autocast on a GPU (fp32 on a CPU),
channels_last_3d, SyncBatchNorm across GPUs. A checkpoint after every epoch (and on SIGTERM / SIGUSR1, exit 75)
in OUT/checkpoints; ``--resume auto`` continues the same sample stream. The test after the last epoch
averages the per-clip softmax (or logits) of ``test_clips`` uniform clips x centre crop per video and reports
top-1 / top-5 of that last epoch (never a best test epoch).
"""
from __future__ import annotations

import signal
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Classifier
from pipeline import eval_loader
from train import distributed as D
from train.checkpoint import CheckpointManager, PreemptionFlag, ResumeError, restore, resume_from, snapshot
from train.run_log import RunLog
from train.recipe import build_optimizer

from . import metrics
from .backbone import EvalError
from .context import Context
from .data import train_config
from .features import test_loop
from .protocols import parse_ints
from .report import pct, write_results

# settings a resumed run must share with its checkpoint (epochs may grow)
RESUME_KEYS = ("frames", "stride", "crop", "batch_size", "optimizer", "lr", "lr_batch", "backbone_lr_mult", "momentum",
               "weight_decay", "milestones", "lr_decay", "dropout", "min_area", "grayscale_p", "jitter_p", "seed")


class FineTuner(nn.Module):
    """backbone [B,3,T,H,W] -> [B,C,T',H',W'] -> global average pool -> dropout -> linear -> logits [B, K]."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = Classifier(backbone.feature_dim, num_classes, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def lr_at_epoch(epoch: int, base: float, milestones: list[int], decay: float) -> float:
    return base * decay ** sum(epoch >= m for m in milestones)


def run(ctx: Context) -> int:
    s, rt, d = ctx.settings, ctx.rt, ctx.rt.d
    train_split, test_split = ctx.splits["train"], ctx.splits["test"]
    num_classes = len(train_split.classes)
    if s["batch_size"] % d.world_size:
        raise EvalError(f"--batch-size {s['batch_size']} (the global batch) does not divide over {d.world_size} ranks")
    per_rank = s["batch_size"] // d.world_size

    # --- model, optimiser ----------------------------------------------------------------------------------
    torch.manual_seed(s["seed"])                                   # the same head init on every rank
    model = FineTuner(ctx.backbone, num_classes, s["dropout"]).to(d.device)
    if rt.use_cuda:
        model = model.to(memory_format=torch.channels_last_3d)
        if d.enabled:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for p in model.parameters():
        p.requires_grad_(True)
    scale = s["batch_size"] / s["lr_batch"] if s["lr_batch"] and s["optimizer"] == "sgd" else 1.0
    base_lr = s["lr"] * scale
    groups = [{"params": list(model.backbone.parameters()), "mult": s["backbone_lr_mult"]},
              {"params": list(model.head.parameters()), "mult": 1.0}]
    opt = build_optimizer(s, groups, base_lr)                      # the trainer's: SGD with momentum, or Adam
    milestones = parse_ints(s["milestones"])
    raw = model
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if rt.use_cuda else None)

    # --- data ----------------------------------------------------------------------------------------------
    loader = eval_loader(train_split.dir, "train", batch_size=per_rank, config=train_config(s),
                         outputs=("video", "label"), seed=s["seed"], rank=d.rank, world_size=d.world_size,
                         backend=rt.backend, device_id=d.local_rank if rt.backend == "gpu" else None,
                         num_threads=rt.num_threads)
    steps_per_epoch = len(loader)

    # --- resume --------------------------------------------------------------------------------------------
    ckpts = CheckpointManager(ctx.out / "checkpoints", keep=2, is_main=d.is_main)
    identity = {"backbone": ctx.info["backbone"], "init_sha256": ctx.info["sha256"],
                "train_manifest": train_split.manifest_sha, "test_manifest": test_split.manifest_sha}
    step, start_epoch, history = 0, 0, []
    parts = {"model": raw, "optimizer": opt, "loader": loader}       # what a checkpoint restores
    identity |= {k: s[k] for k in RESUME_KEYS}
    try:   # the settings part of older checkpoints' identity lives in their config
        found = resume_from(ckpts, ctx.extra.get("resume", "auto"), identity,
                            stored=lambda st: {**{k: st.get("config", {}).get(k) for k in RESUME_KEYS},
                                               **st.get("identity", {})})
    except ResumeError as e:
        raise EvalError(str(e)) from None
    if found:
        state, path = found
        restore(state, parts, d.rank)
        step, start_epoch = state["step"], loader.epoch
        history = list(state.get("history", []))
        if d.is_main:
            print(f"resumed from {path} at step {step} (epoch {loader.epoch}, batch {loader.step})")
    else:
        torch.manual_seed(s["seed"] * 1000 + d.rank + 1)              # per-rank dropout stream

    def save() -> None:
        ckpts.save(snapshot(parts, d, step=step, epoch=loader.epoch, identity=identity, history=history,
                            config={**s, "backbone": ctx.info["backbone"], "backbone_width": ctx.info["backbone_width"],
                                    "num_classes": num_classes, "classes": train_split.classes}), step)

    # --- the loop ------------------------------------------------------------------------------------------
    total_steps = s["epochs"] * steps_per_epoch
    metrics_log = RunLog(ctx.out, total_steps, step, enabled=d.is_main, progress=rt.progress)
    if d.is_main:
        metrics_log.print(f"fine-tune {ctx.info['backbone']} ({ctx.info['source']}): {train_split.num_videos} videos, "
                          f"{num_classes} classes, {steps_per_epoch} steps per epoch x {s['epochs']} epochs, global "
                          f"batch {s['batch_size']} on {d.world_size} {'GPU' if rt.use_cuda else 'CPU'} process(es), "
                          f"{s['optimizer']} lr {base_lr:.4g} (x{s['lr_decay']} at {milestones}), dropout "
                          f"{s['dropout']}, {rt.precision}")
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    preempted = PreemptionFlag()
    try:
        for epoch in range(start_epoch, s["epochs"]):
            loader.set_epoch(epoch)
            lr = lr_at_epoch(epoch, base_lr, milestones, s["lr_decay"])
            for g in opt.param_groups:
                g["lr"] = lr * g["mult"]
            model.train()
            sums, t_epoch, wait, t_ready = {"loss": 0.0, "correct": 0, "n": 0}, time.perf_counter(), 0.0, time.perf_counter()
            for batch in loader:
                wait += time.perf_counter() - t_ready
                with rt.amp():
                    logits = model(batch["video"])
                loss = F.cross_entropy(logits.float(), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                sums["loss"] += float(loss.detach()) * len(logits)
                sums["correct"] += int((logits.argmax(1) == batch["label"]).sum())
                sums["n"] += len(logits)
                metrics_log.step(postfix={"loss": float(loss.detach()), "lr": lr})
                if D.any_rank(bool(preempted), d):
                    save()
                    metrics_log.print(f"pre-empted (signal {preempted.signum or 'on another rank'}): checkpoint at "
                                      f"step {step} saved in {ckpts.folder}; resume with the same command")
                    return PreemptionFlag.EXIT_PREEMPTED
                t_ready = time.perf_counter()
            seconds = time.perf_counter() - t_epoch
            scalars = D.mean_over_ranks({"finetune/train_loss": sums["loss"] / max(sums["n"], 1),
                                         "finetune/train_clip_top1": sums["correct"] / max(sums["n"], 1)}, d)
            scalars |= {"finetune/lr": lr, "finetune/videos_per_s": steps_per_epoch * s["batch_size"] / seconds,
                        "finetune/data_wait_fraction": wait / seconds}
            metrics_log.log(epoch + 1, scalars)
            history.append({"epoch": epoch + 1, **{k.split("/")[1]: v for k, v in scalars.items()}})
            save()
            last = epoch + 1 == s["epochs"]
            if s["eval_every"] and (epoch + 1) % s["eval_every"] == 0 and not last:
                top, _ = _test(raw, ctx)                         # monitoring only: the result is the last epoch's
                metrics_log.log(epoch + 1, {"finetune/test_top1_monitor": top[1]})
    finally:
        metrics_log.close()
        loader.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)

    # --- the test: last epoch ------------------------------------------------------------------------------
    top, info = _test(raw, ctx)
    if not d.is_main:
        return 0
    result = {"top1": top[1], "top5": top[5], "clip_top1": info["clip_top1"], "epoch": s["epochs"],
              "test_videos": info["videos"], "clips_per_video": info["clips_per_video"], "average": s["average"],
              "effective_lr": base_lr, "test_speed": info["speed"], "history": history,
              "checkpoint": str(ckpts.paths()[0]) if ckpts.paths() else None,
              "undecodable_records": {"train": [{k: r.get(k) for k in ("key", "index", "error")}
                                                for r in loader.bad.values()],
                                      "test": info["speed"]["undecodable"]}}
    rows = [("top-1 (%)", pct(top[1])), ("top-5 (%)", pct(top[5])), ("single-clip top-1 (%)", pct(info["clip_top1"])),
            ("epochs", str(s["epochs"])), ("test videos", str(info["videos"])),
            ("clips per video", str(info["clips_per_video"]))]
    title = ctx.title("fine-tune", f"{s['protocol']} protocol, last epoch, {s['test_clips']} clips x "
                      f"{s.get('test_crops', 1)} crop(s) per video, {s['average']} averaged")
    write_results(ctx.out, "finetune", {**ctx.describe(), "result": result},
                  {"top1": top[1], "top5": top[5], "clip_top1": info["clip_top1"]}, rows, title, step=s["epochs"])
    return 0


def _test(model: FineTuner, ctx: Context) -> tuple[dict[int, float], dict]:
    """The test protocol on the test split: per-video averaged scores, top-1 / top-5."""
    model.eval()
    rows, speed = test_loop(model, ctx.splits["test"], ctx.settings, ctx.rt, desc="test")
    model.train()
    videos, scores, labels = metrics.average_per_video(rows["out"], rows["index"], ctx.settings["average"], rows["label"])
    top = metrics.topk_accuracy(scores, labels, (1, 5))
    clip_top1 = metrics.topk_accuracy(rows["out"], rows["label"], (1,))[1]
    return top, {"clip_top1": clip_top1, "videos": len(videos), "clips_per_video": len(rows["index"]) // len(videos),
                 "speed": speed}
