"""The backbone under evaluation: pretrained weights from a checkpoint, or a seeded random init (the baseline).

Exported backbones (`python -m evaluate export`: OUT/ with backbone.safetensors and model_card.json) load too.
Checkpoints from `python -m train` hold the objective's state dict ("model") and the run config ("config"); the
backbone is the query encoder (`encoder_q.*`, as FAME/FIMA's eval.py takes it; projector, key encoder, decoder
and queues are dropped). Fine-tuned checkpoints written by `python -m evaluate finetune` (`backbone.*`) and
bare backbone state dicts load too; `module.` / `_orig_mod.` prefixes (DDP, torch.compile) are stripped.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from model import BACKBONES, build_backbone
from train.checkpoint import CheckpointManager

PREFIXES = ("encoder_q.", "backbone.")
# an exported backbone (`python -m evaluate export` writes it, evaluate/export.py): OUT/WEIGHTS and its model card
CARD = "model_card.json"
WEIGHTS = "backbone.safetensors"
FORMAT = "motionpretrain-backbone-v1"


class EvalError(ValueError):
    """Bad input to an evaluation (checkpoint, shards, settings); the message says what to do."""


def weights_hash(module: nn.Module) -> str:
    """sha256 of the backbone's tensors (parameters and buffers), names and shapes included."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _strip(sd: dict) -> dict:
    out = {}
    for k, v in sd.items():
        for junk in ("module.", "_orig_mod."):
            k = k.replace(junk, "")
        out[k] = v
    return out


def backbone_state(state: dict) -> tuple[dict, dict]:
    """(backbone state dict, pretraining config) from a loaded checkpoint."""
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    sd = state.get("model", state.get("state_dict", state))
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        raise EvalError("the checkpoint holds no tensors under 'model': not a checkpoint of `python -m train` or "
                        "`python -m evaluate finetune`")
    sd = _strip({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, config
    return sd, config


def _fits(module: nn.Module, sd: dict) -> tuple[list, list, list]:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    return missing, unexpected, shapes


def _width_kwargs(name: str, width: float) -> dict:
    """Builder kwargs for a channel-width multiplier (train config `backbone_width`; every backbone has one)."""
    if width == 1.0:
        return {}
    if width <= 0:
        raise EvalError(f"backbone width {width} for {name!r} must be positive (the pretraining run's backbone_width)")
    return {"width": width}


def load_exported(path: Path) -> tuple[dict, dict]:
    """(backbone state dict, model card) of an exported folder or its backbone.safetensors."""
    from safetensors.torch import load_file
    folder = path if path.is_dir() else path.parent
    card_path = folder / CARD
    if not card_path.is_file():
        raise FileNotFoundError(f"{folder} holds no {CARD}: export with `python -m evaluate export`")
    card = json.loads(card_path.read_text())
    if card.get("format") != FORMAT:
        raise ValueError(f"{card_path}: format {card.get('format')!r}, this code reads {FORMAT!r}")
    return load_file(str(folder / card["weights"])), card


def load_backbone(checkpoint: str | Path | None, backbone: str | None = None, random_init: bool = False,
                  seed: int = 0, width: float | None = None) -> tuple[nn.Module, dict]:
    """(backbone in eval mode on the CPU, info: source, path, backbone, backbone_width, objective, pretrain config,
    step, sha256). ``width``: the random-init baseline's I3D width; a checkpoint's comes from its config."""
    if random_init:
        if checkpoint:
            raise EvalError("--random-init and --checkpoint exclude each other: the baseline has no checkpoint")
        name = backbone or "i3d"
        if name not in BACKBONES:
            raise EvalError(f"unknown backbone {name!r}; choose from {sorted(BACKBONES)}")
        width = 1.0 if width is None else float(width)
        torch.manual_seed(seed)
        module = build_backbone(name, **_width_kwargs(name, width)).eval()
        return module, {"source": "random-init", "path": None, "backbone": name, "backbone_width": width,
                        "objective": None, "pretrain": {}, "step": 0, "seed": seed, "sha256": weights_hash(module)}
    if not checkpoint:
        raise EvalError("give --checkpoint CKPT (a file from `python -m train`), or --random-init [--backbone NAME] "
                        "for the random-init baseline")
    path = Path(checkpoint)
    if path.is_dir() and not (path / CARD).is_file():   # a run folder (or its checkpoints/ folder): its newest checkpoint
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = CheckpointManager(folder, is_main=False).paths()
        if not found:
            raise EvalError(f"{path} holds no ckpt-*.pt checkpoint (looked in {folder})")
        path = found[0]
    if path.suffix == ".safetensors" or (path / CARD).is_file():   # `python -m evaluate export`
        sd, card = load_exported(path)
        config = {**(card.get("pretrain_config") or {}), "backbone": card["backbone"],
                  "backbone_width": card["backbone_width"]}
        state = {"step": card.get("steps")}
    else:
        state = CheckpointManager.load(path)
        sd, config = backbone_state(state)
    trained = config.get("backbone")
    if backbone and trained and backbone != trained:
        raise EvalError(f"{path} was trained with backbone {trained!r} (its config), not {backbone!r}: drop --backbone "
                        f"or pass a checkpoint of a {backbone} run")
    trained_width = float(config.get("backbone_width", 1.0))
    if width is not None and float(width) != trained_width:
        raise EvalError(f"{path} was trained with backbone_width {trained_width} (its config), not {width}: drop "
                        "--backbone-width (a checkpoint brings its own)")
    candidates = [backbone or trained] if (backbone or trained) else sorted(BACKBONES)
    reports = {}
    for name in candidates:
        if name not in BACKBONES:
            raise EvalError(f"{path}: backbone {name!r} is not one this code builds ({sorted(BACKBONES)})")
        module = build_backbone(name, **_width_kwargs(name, trained_width))
        missing, unexpected, shapes = _fits(module, sd)
        if not (missing or unexpected or shapes):
            module.load_state_dict(sd, strict=True)
            module.eval()
            return module, {"source": "checkpoint", "path": str(path.resolve()), "backbone": name,
                            "backbone_width": trained_width, "objective": config.get("objective"), "pretrain": config,
                            "step": state.get("step", state.get("epoch")), "sha256": weights_hash(module)}
        reports[name] = (missing, unexpected, shapes)
    fits = [n for n in sorted(BACKBONES) if n not in reports and not any(_fits(build_backbone(n), sd))]
    name = candidates[0]
    missing, unexpected, shapes = reports[name]
    detail = "; ".join(part for part in (
        f"{len(missing)} missing keys (e.g. {missing[:2]})" if missing else "",
        f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]})" if unexpected else "",
        f"{len(shapes)} shape mismatches (e.g. {shapes[:2]})" if shapes else "") if part)
    said = f"its config says it was trained with backbone {trained!r}" if trained else "it carries no config"
    hint = f"; its weights fit {fits[0]!r}" if fits else ""
    raise EvalError(f"{path}: the state dict does not match a {name} backbone ({detail}); {said}{hint}. Is this a "
                    "checkpoint of another architecture, or of a changed model?")
