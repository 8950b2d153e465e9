"""Fine-tuning: pretrained backbone + dropout + linear classifier, trained end to end on the train split.

    python -m evaluate finetune --checkpoint RUN/checkpoints/ckpt-N.pt --data shards/ucf101
    torchrun --nproc-per-node=8 -m evaluate finetune --checkpoint ... --data ...    # DDP, global batch split

One random window per video per epoch (random-resized crop, flip, grayscale / colour jitter), SGD (or Adam)
with the lr multiplied by lr_decay at each milestone epoch, bf16 autocast on a GPU (fp32 on a CPU),
channels_last_3d, SyncBatchNorm across GPUs. The steps run in pretraining's loop (train/loop.py; fine-tuning is
the objective ``FineTuning``): the same non-finite guard, logging (one window per epoch), pre-emption and resume.
A checkpoint after every epoch (and on SIGTERM / SIGUSR1, exit 75) in OUT/checkpoints; ``--resume auto``
continues the same sample stream. The test after the last epoch
averages the per-clip softmax (or logits) of ``test_clips`` uniform clips x centre crop per video and reports
top-1 / top-5 of that last epoch (never a best test epoch).
"""
from __future__ import annotations

import signal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import Classifier
from pipeline import eval_loader
from train.checkpoint import CheckpointManager, ResumeError, resume_from, snapshot
from train.loop import Loop, TrainingError
from train.recipe import build_optimizer
from train.run_log import RunLog

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


class FineTuning(nn.Module):
    """Fine-tuning as an objective, for the shared loop (train/loop.py): the classifier's cross-entropy on labelled
    clips. It holds the FineTuner (whose state_dict checkpoints keep, under the same keys as before the loop was
    shared) and adds no parameters."""

    required_inputs = ("video", "label")

    def __init__(self, net: FineTuner):
        super().__init__()
        self.net = net

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = self.net(batch["video"])                                  # [B, K]
        return {"loss": F.cross_entropy(logits.float(), batch["label"]),
                "clip_top1": (logits.argmax(1) == batch["label"]).float().mean()}

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch (the loader reshuffles by itself)."""

    def after_backward(self) -> None:
        """Every parameter trains."""


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
    raw = FineTuner(ctx.backbone, num_classes, s["dropout"]).to(d.device)   # what checkpoints hold
    if rt.use_cuda:
        raw = raw.to(memory_format=torch.channels_last_3d)
        if d.enabled:
            raw = nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    for p in raw.parameters():
        p.requires_grad_(True)
    scale = s["batch_size"] / s["lr_batch"] if s["lr_batch"] and s["optimizer"] == "sgd" else 1.0
    base_lr = s["lr"] * scale
    groups = [{"params": list(raw.backbone.parameters()), "mult": s["backbone_lr_mult"]},
              {"params": list(raw.head.parameters()), "mult": 1.0}]
    opt = build_optimizer(s, groups, base_lr)                      # the trainer's: SGD with momentum, or Adam
    milestones = parse_ints(s["milestones"])
    model = FineTuning(raw)
    if d.enabled:
        model = DDP(model, device_ids=[d.local_rank] if rt.use_cuda else None)

    # --- data ----------------------------------------------------------------------------------------------
    loader = eval_loader(train_split.dir, "train", batch_size=per_rank, config=train_config(s),
                         outputs=FineTuning.required_inputs, seed=s["seed"], rank=d.rank, world_size=d.world_size,
                         backend=rt.backend, device_id=d.local_rank if rt.backend == "gpu" else None,
                         num_threads=rt.num_threads)
    steps_per_epoch = len(loader)
    total_steps = s["epochs"] * steps_per_epoch

    # --- resume --------------------------------------------------------------------------------------------
    ckpts = CheckpointManager(ctx.out / "checkpoints", keep=2, is_main=d.is_main)
    identity = {"backbone": ctx.info["backbone"], "init_sha256": ctx.info["sha256"],
                "train_manifest": train_split.manifest_sha, "test_manifest": test_split.manifest_sha}
    parts = {"model": raw, "optimizer": opt, "loader": loader}       # what a checkpoint restores
    identity |= {k: s[k] for k in RESUME_KEYS}
    try:   # the settings part of older checkpoints' identity lives in their config
        state = resume_from(ckpts, ctx.extra.get("resume", "auto"), identity, parts, d,
                            stored=lambda st: {**{k: st.get("config", {}).get(k) for k in RESUME_KEYS},
                                               **st.get("identity", {})}) or {}
    except ResumeError as e:
        raise EvalError(str(e)) from None
    step, history = state.get("step", 0), list(state.get("history", []))
    if not state:
        torch.manual_seed(s["seed"] * 1000 + d.rank + 1)              # per-rank dropout stream

    def checkpoint(step: int) -> dict:
        return snapshot(parts, d, step=step, epoch=step // steps_per_epoch, identity=identity, history=history,
                        config={**s, "backbone": ctx.info["backbone"], "backbone_width": ctx.info["backbone_width"],
                                "num_classes": num_classes, "classes": train_split.classes})

    def epoch_done(step: int, scalars: dict) -> None:
        """The per-epoch history kept in checkpoints and results (logged every epoch: one window per epoch)."""
        if step % steps_per_epoch == 0:
            history.append({"epoch": step // steps_per_epoch, "train_loss": scalars["loss/loss"],
                            "train_clip_top1": scalars["metric/clip_top1"], "lr": scalars["lr"],
                            "videos_per_s": scalars["videos_per_s"], "data_wait_fraction": scalars["data_wait_fraction"]})

    def test_monitor(step: int) -> None:
        """Monitoring only, every eval_every epochs: the result is the last epoch's test, below."""
        if step < total_steps:
            top, _ = _test(raw, ctx)
            metrics_log.log(step, {"finetune/test_top1_monitor": top[1]})

    # --- the loop (train/loop.py, shared with pretraining): lr per epoch, a checkpoint and a log line per epoch --
    metrics_log = RunLog(ctx.out, total_steps, step, enabled=d.is_main, progress=rt.progress)
    if d.is_main:
        metrics_log.print(f"fine-tune {ctx.info['backbone']} ({ctx.info['source']}): {train_split.num_videos} videos, "
                          f"{num_classes} classes, {steps_per_epoch} steps per epoch x {s['epochs']} epochs, global "
                          f"batch {s['batch_size']} on {d.world_size} {'GPU' if rt.use_cuda else 'CPU'} process(es), "
                          f"{s['optimizer']} lr {base_lr:.4g} (x{s['lr_decay']} at {milestones}), dropout "
                          f"{s['dropout']}, {rt.precision}")
    loop = Loop(model, loader, opt, torch.amp.GradScaler(d.device.type, enabled=False), rt.amp(), d, metrics_log,
                lr_at=lambda step: lr_at_epoch(step // steps_per_epoch, base_lr, milestones, s["lr_decay"]),
                log_every=steps_per_epoch, ckpt_every=steps_per_epoch, eval_every=s["eval_every"] * steps_per_epoch,
                ckpts=ckpts, snapshot=checkpoint, global_batch=s["batch_size"],
                evaluate=test_monitor if s["eval_every"] else None,
                on_log=epoch_done)
    old_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        step, code = loop.run(step, total_steps)
    except TrainingError as e:
        raise EvalError(str(e)) from None
    finally:
        metrics_log.close()
        loader.close()
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
    if code:
        return code

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
