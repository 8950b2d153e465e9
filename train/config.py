"""Run configuration: one flat dict of plain values, a named preset (YAML) on top, then `key=value` overrides.

Every key has a default and a type here; a preset or an override may only set known keys (a typo is an
error that lists the valid keys), and values are parsed as YAML scalars and checked against the default's
type and, where there is one, the list of choices. The resolved config is written into the run folder and
stored in every checkpoint.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import yaml

from pipeline.config import clip_problem

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"   # the checkout's presets (editable install)
CONFIGS_ENV = "MOTIONPRETRAIN_CONFIGS"


def config_dirs() -> list[Path]:
    """Where preset names are looked up, first match wins: $MOTIONPRETRAIN_CONFIGS (the image sets it to
    /app/configs), the checkout's configs/ beside the packages, and ./configs of the working directory. A
    non-editable install (the image's `pip install .`) puts the packages in site-packages, where the checkout's
    configs/ is not, so the first and the last are what find the presets there."""
    dirs = [Path(os.environ[CONFIGS_ENV])] if os.environ.get(CONFIGS_ENV) else []
    dirs += [CONFIG_DIR, Path.cwd() / "configs"]
    out = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [o.resolve() for o in out]:
            out.append(d)
    return out

# name: (default, help). Types come from the defaults; None means "a string or nothing".
DEFAULTS: dict[str, tuple[object, str]] = {
    # data
    "data": ("", "shard set folder written by `python -m preprocess` (e.g. shards/k400/train)"),
    "backend": ("auto", "DALI backend: gpu (NVDEC + GPU ops), cpu, or auto (gpu when CUDA is available)"),
    "num_threads": (4, "DALI CPU threads per rank"),
    "frames": (16, "frames per clip (T)"),
    "stride": (2, "temporal stride of the global clip (windows are frames*stride long)"),
    "crop": (224, "spatial crop size (S)"),
    "min_area": (0.2, "random-resized-crop: smallest area fraction"),
    "flip_p": (0.5, "horizontal-flip probability per clip; 0 for data whose labels flip with the image (the "
                    "synthetic sample's right/left and clockwise/counter-clockwise)"),
    "frame0": ("wrap", "frame difference of frame 0: wrap (reference: X0 - X(T-1)) or zero"),
    "max_bad_samples": (0.01, "samples that cannot be read or decoded are set aside (OUT_DIR/bad_samples.jsonl) and "
                              "replaced by the next good one; the run stops, with a checkpoint, once more than this "
                              "many were: a count (>= 1) or a fraction of the shard set (< 1; rounded up and at "
                              "least one, so one bad file never stops a run on a small set; 0 = none)"),
    "exclude_samples": ("", "file of sample keys to set aside from the start, one per line (e.g. the bad_keys.txt of "
                            "`python -m preprocess verify`)"),
    # model and objective
    "objective": ("fima", "pretraining objective: fima, moco, fame or multilevel"),
    "backbone": ("i3d", "backbone: i3d, r3d18, r2plus1d18, or r3d18_ml (the multi-level R3D-18 variant)"),
    "backbone_width": (1.0, "channel-width multiplier of the backbone (1.0 = the published network; 0.25 makes a "
                            "CPU-sized I3D, ~6x faster per step; the ResNets scale their four stage widths)"),
    "queue_size": (65536, "instance (and motion) queue length K"),
    "dense_queue_size": (0, "FIMA dense queue length (0 = off)"),
    "momentum_ema": (0.999, "EMA momentum of the key encoder"),
    "temperature": (0.1, "instance / local contrastive temperature"),
    "dense_temperature": (0.1, "FIMA dense contrastive temperature"),
    "dense_weight": (1.0, "FIMA weight of the dense loss"),
    "pos_ratio": (0.7, "FIMA positive rule: centre distance / larger cell diagonal must be below this"),
    "dense_coords": ("normalized", "FIMA positive-rule coordinates: normalized (reference, per-axis) or pixel"),
    "self_negative_bug": (False, "FIMA/MoCo/FAME: reproduce the reference's second-direction self-negative (its "
                                 "own key and the batch's fresh keys among the n->m negatives)"),
    "batch_negatives": (False, "FIMA/MoCo/FAME instance loss: the other videos' keys of the same step are negatives "
                                "too (SimCLR / MoCo v3; not in the reference): a collapsed representation that drifts "
                                "cannot find its positive by key age among them (see README Status)"),
    "bn_groups": (0, "BatchNorm over this many sub-batches on one process, key batch permuted: shuffle-BN "
                     "emulation (MoCo's single-GPU demo); 0 = auto: min(8, batch_size // 4) on one process, 1 (off) "
                     "with several processes, where shuffle-BN is real"),
    "fame_beta": (0.5, "FAME: foreground fraction"),
    "fame_skip_shared_background": (False, "FAME with batch_negatives: drop the one in-batch negative that shares "
                                           "the merged query's background (the reference's queue never holds one)"),
    "fame_hue_wrap_bug": (False, "FAME: reproduce the reference's hue taken as turns though already in radians (x 2 pi "
                                  "again: the angle wraps ~6.3 times and unrelated hues share histogram bins)"),
    "cluster": (1000, "multilevel: number of prototypes K (the reference forgets to pass it)"),
    "split": (20, "multilevel: epoch from which the graph constraint is on"),
    "graph_threshold": (0.05, "multilevel: instance-graph threshold"),
    "proto_queue": (1024, "multilevel: prototype queue length"),
    "proto_queue_start": (10, "multilevel: epoch from which the prototype queue is used"),
    "per_frame_colour": (False, "multilevel: the reference's per-frame colour jitter/grey instead of per clip"),
    # optimisation
    "batch_size": (8, "clips (videos) per rank per step"),
    "epochs": (100, "training epochs"),
    "max_steps": (0, "stop after this many steps (0 = run all epochs); the schedule still spans all epochs"),
    "lr": (0.01, "learning rate per 64 videos of global batch (scaled linearly with the global batch)"),
    "warmup_epochs": (0.0, "linear warm-up before the cosine decay"),
    "optimizer": ("sgd", "sgd (momentum) or adam"),
    "lr_scaling": ("linear", "linear: lr is per 64 videos and scales with the global batch; none: lr as given"),
    "schedule": ("cosine", "cosine (per step, after warm-up) or step (x0.1 at decay_epoch)"),
    "decay_epoch": (0, "step schedule: the epoch at which the lr drops x0.1"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (1e-4, "weight decay"),
    # system
    "precision": ("bf16", "bf16 (autocast), fp16 (autocast + grad scaler) or fp32"),
    "channels_last": (True, "keep clips and weights in channels_last_3d"),
    "compile": (False, "torch.compile the backbones"),
    "sync_bn": (False, "SyncBatchNorm across GPUs: multilevel only (its reference uses it); refused for fima, moco "
                       "and fame, whose key encoder needs per-process shuffle-BN"),
    "cudnn_benchmark": (True, "cuDNN autotuning (fixed clip shapes)"),
    "seed": (0, "seed of sampling, augmentation and initialisation"),
    "out_dir": ("runs/default", "run folder: config, checkpoints, TensorBoard logs"),
    "ckpt_every": (500, "save a checkpoint every N steps (and at the end, and on SIGTERM/SIGUSR1)"),
    "keep_ckpts": (3, "keep the newest N checkpoints"),
    "log_every": (10, "console / TensorBoard scalars every N steps"),
    "max_bad_steps": (5, "stop after this many non-finite losses in a row"),
    # quality monitor (train/monitor.py)
    "monitor": ("", "labelled shard folder (OUT with train/ and test/): log kNN top-1 of the query backbone on it "
                    "every monitor_every steps, the random-init value at step 0 as the reference line"),
    "monitor_every": (100, "steps between quality measurements (and one at the end)"),
    "monitor_clips": (1, "uniformly spaced clips per video for the monitor's features"),
    "monitor_k": (20, "neighbours of the monitor's weighted kNN"),
}

CHOICES = {
    "backend": ("auto", "gpu", "cpu"),
    "frame0": ("wrap", "zero"),
    "objective": ("fima", "moco", "fame", "multilevel"),
    "backbone": ("i3d", "r3d18", "r2plus1d18", "r3d18_ml"),
    "dense_coords": ("normalized", "pixel"),
    "precision": ("bf16", "fp16", "fp32"),
    "optimizer": ("sgd", "adam"),
    "schedule": ("cosine", "step"),
    "lr_scaling": ("linear", "none"),
}


class ConfigError(ValueError):
    """A bad preset, key or value; the message says what is valid."""


def presets() -> list[str]:
    return sorted({p.stem for d in config_dirs() for p in d.glob("*.yaml")})


def preset_path(name: str) -> Path | None:
    """The YAML file of preset ``name`` (see config_dirs), or None."""
    return next((d / f"{name}.yaml" for d in config_dirs() if (d / f"{name}.yaml").is_file()), None)


SYNC_BN_REFUSED = ("sync_bn=true is refused for {objective}: its key encoder relies on shuffle-BN (each process "
                   "normalises a shuffled sub-batch, so a query cannot find its key through shared batch "
                   "statistics); SyncBatchNorm would make those statistics span the global batch and silently "
                   "cancel the shuffle. sync_bn is for the multi-level objective (no key encoder), as in its "
                   "reference")


def _check(key: str, value, where: str):
    if key not in DEFAULTS:
        close = difflib.get_close_matches(key, DEFAULTS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r} in {where}{hint}; valid keys: {', '.join(DEFAULTS)}")
    default = DEFAULTS[key][0]
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:   # strings: a YAML number given for a path-like key (out_dir=2024) is still a string
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(f"{key}={value!r} in {where}: expected {type(default).__name__} like {default!r} "
                          f"({DEFAULTS[key][1]})")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r} in {where}: choose one of {', '.join(CHOICES[key])}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"{key}={value!r} in {where}: must not be negative")
    return value


def _read_preset(preset: str | Path) -> tuple[Path, dict]:
    path = Path(preset)
    if not path.is_file() and preset_path(str(preset)):
        path = preset_path(str(preset))
    if not path.is_file():
        where = ", ".join(map(str, config_dirs())) or f"none of ${CONFIGS_ENV}, {CONFIG_DIR}, ./configs exists"
        raise ConfigError(f"config preset {preset!r} not found; presets: {', '.join(presets()) or '(none)'} "
                          f"(in {where}), or a path to a YAML file; a non-editable install finds the presets "
                          f"through ${CONFIGS_ENV}=CHECKOUT/configs")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a mapping of key: value")
    return path, data


def _preset_chain(preset: str | Path | None) -> list[tuple[Path, dict]]:
    """[(path, keys)] from the root preset down to ``preset``: a preset's `extends: NAME` names the preset it
    changes (a name or a path), so a recipe that differs in three keys says only those three."""
    chain: list[tuple[Path, dict]] = []
    while preset:
        path, data = _read_preset(preset)
        if any(path.resolve() == p.resolve() for p, _ in chain):
            raise ConfigError(f"{path}: `extends` goes round in a circle ({' -> '.join(str(p) for p, _ in chain)})")
        preset = data.pop("extends", None)
        chain.append((path, data))
    return chain[::-1]


def load_config(preset: str | Path | None = None, overrides: list[str] = ()) -> dict:
    """Defaults <- preset files (the `extends` chain, root first) <- key=value overrides, each checked."""
    cfg = {k: v for k, (v, _) in DEFAULTS.items()}
    for path, data in _preset_chain(preset):
        for k, v in data.items():
            cfg[k] = _check(k, v, str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. batch_size=16)")
        k, v = item.split("=", 1)
        try:
            value = yaml.safe_load(v) if v != "" else ""
        except yaml.YAMLError:
            value = v
        cfg[k] = _check(k, value, "the command line")
    problem = clip_problem(cfg["frames"], cfg["stride"], cfg["crop"])
    if problem:
        raise ConfigError(problem.format(frames="frames", stride="stride", crop="crop"))
    if cfg["flip_p"] > 1:
        raise ConfigError(f"flip_p={cfg['flip_p']} is a probability: give a value in [0, 1]")
    if cfg["backbone_width"] <= 0:
        raise ConfigError("backbone_width must be positive (1.0 = the published network)")
    if cfg["monitor_every"] < 1 or cfg["monitor_clips"] < 1 or cfg["monitor_k"] < 1:
        raise ConfigError("monitor_every, monitor_clips and monitor_k must be at least 1")
    if cfg["bn_groups"] and cfg["batch_size"] < 2 * cfg["bn_groups"]:
        raise ConfigError(f"bn_groups={cfg['bn_groups']} needs batch_size >= {2 * cfg['bn_groups']} (two samples per "
                          "BatchNorm group); lower bn_groups, or 0 for the automatic choice")
    if cfg["batch_size"] < 1:
        raise ConfigError("batch_size must be at least 1")
    if cfg["sync_bn"] and cfg["objective"] != "multilevel":
        raise ConfigError(SYNC_BN_REFUSED.format(objective=cfg["objective"]))
    return cfg


def describe() -> str:
    """Every key with its default and meaning, for --help."""
    width = max(map(len, DEFAULTS))
    lines = []
    for k, (v, h) in DEFAULTS.items():
        choices = f" [{'|'.join(CHOICES[k])}]" if k in CHOICES else ""
        lines.append(f"  {k:<{width}}  {v!r:<14} {h}{choices}")
    return "\n".join(lines)
