"""The recipe: a run config turned into the objects a run is made of, in one place.

The trainer, fine-tuning, the doctor and the benchmarks all call these, so a setting means the same thing
everywhere: augmentation settings, the objective's arguments, the optimiser, the learning-rate schedule,
the precision context, device and backend choice (with the CUDA switches), model wrapping (channels_last_3d,
compile, SyncBN, DDP) and the training step itself. The trainer (train/trainer.py) keeps the loop.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from pipeline import AugConfig

from . import distributed as D
from .config import SYNC_BN_REFUSED


def bn_groups(cfg: dict, world_size: int) -> int:
    """BatchNorm sub-batches per process: real shuffle-BN across processes needs none; one process emulates it."""
    if cfg["bn_groups"]:
        return cfg["bn_groups"]
    return 1 if world_size > 1 else max(1, min(8, cfg["batch_size"] // 4))


# config keys that are also the objectives' constructor arguments, under the same names (model/ takes plain
# keywords, not configs); FAME's fame_* keys drop the prefix (the config is flat, FAME's arguments are its own)
MOCO_KEYS = ("queue_size", "momentum_ema", "temperature", "self_negative_bug", "batch_negatives")
FIMA_KEYS = ("dense_queue_size", "dense_temperature", "dense_weight", "pos_ratio", "dense_coords")
FAME_KEYS = ("fame_beta", "fame_hue_wrap_bug", "fame_skip_shared_background")
MULTILEVEL_KEYS = ("cluster", "temperature", "split", "graph_threshold", "proto_queue", "proto_queue_start")


def objective_kwargs(cfg: dict, world_size: int = 1) -> dict:
    """Config keys -> the objective's constructor arguments."""
    kw = {"backbone": cfg["backbone"]}
    if cfg["backbone_width"] != 1.0:
        kw["backbone_kwargs"] = {"width": cfg["backbone_width"]}
    if cfg["objective"] == "multilevel":
        return kw | {k: cfg[k] for k in MULTILEVEL_KEYS}
    kw |= {k: cfg[k] for k in MOCO_KEYS} | {"bn_groups": bn_groups(cfg, world_size)}
    if cfg["objective"] == "fima":
        kw |= {k: cfg[k] for k in FIMA_KEYS}
    if cfg["objective"] == "fame":
        kw |= {k.removeprefix("fame_"): cfg[k] for k in FAME_KEYS}
    return kw


def aug_config(cfg: dict) -> AugConfig:
    """The pipeline's augmentation settings for a run config."""
    return AugConfig(num_frames=cfg["frames"], stride=cfg["stride"], crop_size=cfg["crop"],
                     crop_area=(cfg["min_area"], 1.0), flip_p=cfg["flip_p"], frame0=cfg["frame0"],
                     per_frame_colour=cfg["per_frame_colour"])


def build_optimizer(cfg: dict, params, lr: float) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "adam":   # L2-regularised Adam, as the multi-level reference (not AdamW)
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(params, lr=lr, momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])


def lr_at(step: int, total: int, warmup: int, peak: float, decay_step: int | None = None) -> float:
    """Linear warm-up, then cosine to zero per step, or (decay_step given) constant then x0.1 from decay_step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if decay_step is not None:
        return peak * (0.1 if step >= decay_step else 1.0)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def precision_context(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def peak_lr(cfg: dict, global_batch: int) -> float:
    """The configured lr, scaled linearly per 64 videos of global batch when lr_scaling=linear (the papers')."""
    return cfg["lr"] * global_batch / 64 if cfg["lr_scaling"] == "linear" else cfg["lr"]


def cuda_switches(cudnn_benchmark: bool = True) -> None:
    """The CUDA switches, set in one place for training, the doctor, the benchmarks and evaluation.

    cuDNN autotuning as given (every preset: on; clip shapes are fixed). TF32 for cuDNN convolutions (torch's
    default; bf16 autocast is the default precision, so TF32 only touches what precision=fp32 runs). TF32 for
    matmuls stays OFF: the one place fp32 matmuls remain under autocast is the contrastive logits, which
    model/infonce.py computes in fp32 with autocast off on purpose (q @ queue.T over 65536 keys divided by a
    temperature of 0.1); TF32's 10-bit mantissa there would undo that. Harmless without CUDA (plain flags)."""
    torch.backends.cudnn.benchmark = bool(cudnn_benchmark)
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False


def device_and_backend(cfg: dict) -> tuple[bool, str]:
    """(use CUDA?, DALI backend) for a config, with the CUDA switches (``cuda_switches``) set when CUDA is used."""
    use_cuda = torch.cuda.is_available() and cfg["backend"] != "cpu"
    backend = cfg["backend"] if cfg["backend"] != "auto" else ("gpu" if use_cuda else "cpu")
    if use_cuda:
        cuda_switches(cfg["cudnn_benchmark"])
    return use_cuda, backend


def has_key_encoder(model: torch.nn.Module) -> bool:
    """True for the MoCo family (MoCo, FAME, FIMA): an EMA key encoder whose BatchNorm must see per-process,
    shuffled batches (shuffle-BN)."""
    return isinstance(getattr(model, "encoder_k", None), torch.nn.Module)


def wrap(model: torch.nn.Module, cfg: dict, d: D.Dist, use_cuda: bool) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to call, unwrapped model whose state_dict checkpoints hold): channels_last_3d, compile (in place, so
    state_dict keys stay the same; the objective says which modules), SyncBN and DDP as configured."""
    if cfg["channels_last"]:
        model = model.to(memory_format=torch.channels_last_3d)
    if cfg["compile"]:
        for module in model.compile_targets():
            module.compile()
    if cfg["sync_bn"] and has_key_encoder(model):     # load_config refuses it already; a built cfg may not
        raise ValueError(SYNC_BN_REFUSED.format(objective=cfg["objective"]))
    if d.enabled and use_cuda and cfg["sync_bn"]:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw = model
    if d.enabled:   # queues are identical on every rank already: no buffer broadcast
        model = DDP(model, device_ids=[d.local_rank] if use_cuda else None, broadcast_buffers=False)
    return model, raw


def train_step(model: torch.nn.Module, batch: dict, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
               amp, d: D.Dist) -> tuple[dict, bool]:
    """One step: forward under ``amp``, and unless the loss is non-finite on some rank (all ranks agree), backward,
    the objective's after-backward hook, and the update, which is skipped too when a gradient entry is non-finite
    on some rank (a finite loss can still give one, e.g. from a low-precision kernel; a single NaN would poison the
    weights for good). Returns (the objective's outputs, updated?)."""
    with amp:
        out = model(batch)
    loss = out["loss"]
    opt.zero_grad(set_to_none=True)
    finite = not D.any_rank(not bool(torch.isfinite(loss.detach())), d)
    if finite:
        scaler.scale(loss).backward()
        getattr(model, "module", model).after_backward()
        scaler.unscale_(opt)      # fp16: true gradients (the scaler's own inf check is recorded); else a no-op
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        bad = bool(grads) and not bool(torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)))
        finite = not D.any_rank(bad, d)
        if finite:
            scaler.step(opt)
        else:
            opt.zero_grad(set_to_none=True)
        scaler.update()           # fp16: a non-finite gradient lowers the scale
    return out, finite
