"""Protocol presets: the FAME/FIMA recipe (default) and the CoCLR recipe, as plain values every flag overrides.

Precedence: command-line flag > preset > the checkpoint's pretraining config (frames, stride, crop) > the
backbone's usual input (16 x 2, 224 for I3D, 112 for the ResNets). `notes/multilevel-and-evaluation.md` Part B
compares the recipes; what our pipeline cannot reproduce exactly is said in each preset's "note".
"""
from __future__ import annotations

from pipeline.config import clip_problem

# key: (type, help, commands it applies to). Every key is a --flag (underscores become dashes).
ALL = ("finetune", "linear", "retrieval", "knn", "cam", "temporal")
FEAT = ("finetune", "linear", "retrieval", "knn", "temporal")
TRAINED = ("finetune", "linear", "temporal")           # commands that train something (a model, a probe, a head)
KEYS: dict[str, tuple[type, str, tuple[str, ...]]] = {
    # sampling (all commands)
    "frames": (int, "frames per clip (T); default: the checkpoint's pretraining value", ALL),
    "stride": (int, "temporal stride inside a clip (a window is frames*stride frames); default: the checkpoint's", ALL),
    "crop": (int, "crop side in pixels after resizing (S); default: the checkpoint's pretraining crop", ALL),
    "test_clips": (int, "uniformly spaced clips per video, averaged per video (linear/retrieval: also the train "
                        "split's features; cam: clips shown per video)", ALL),
    "test_crops": (int, "test: spatial crops per clip, 1 (centre) or 3 (both ends and centre of the long side)", FEAT),
    "test_crop_fraction": (float, "test crop side as a fraction of the frame's short side (0.875: 224 of 256)", ALL),
    "batch_size": (int, "clips per batch over all ranks (fine-tune: the training batch; linear/retrieval: the "
                        "extraction batch)", FEAT),
    "average": (str, "per-video test score: softmax (mean of per-clip softmax) or logits (mean logits, FAME/FIMA code)",
                ("finetune", "linear")),
    # optimisation (fine-tune and linear probe)
    "optimizer": (str, "sgd or adam", ("finetune", "temporal")),
    "lr": (float, "learning rate (fine-tune SGD: for a global batch of lr_batch, scaled linearly)", TRAINED),
    "lr_batch": (int, "the global batch the fine-tune lr is given for (0: no scaling)", ("finetune",)),
    "backbone_lr_mult": (float, "backbone lr = lr * this (CoCLR: 0.1)", ("finetune",)),
    "momentum": (float, "SGD momentum", TRAINED),
    "weight_decay": (float, "weight decay", TRAINED),
    "epochs": (int, "training epochs (the result is the last epoch's, never the best test epoch)", TRAINED),
    "milestones": (str, "comma-separated epochs at which the lr is multiplied by lr_decay (e.g. 60,120)", TRAINED),
    "lr_decay": (float, "lr factor at each milestone", TRAINED),
    "dropout": (float, "dropout before the classifier; default by dataset: ucf101 0.7, hmdb51 0.5, others 0.5",
                ("finetune",)),
    "min_area": (float, "training random-resized-crop: smallest area fraction", ("finetune",)),
    "flip_p": (float, "training horizontal-flip probability (0 for labels that flip with the image, e.g. the "
                      "synthetic sample's left/right motions)", ("finetune",)),
    "grayscale_p": (float, "training colour augmentation: grayscale probability", ("finetune",)),
    "jitter_p": (float, "training colour augmentation: colour jitter probability (0: none)", ("finetune",)),
    "eval_every": (int, "also test every N epochs, for TensorBoard only (0: only after the last epoch)", ("finetune",)),
    "probe_batch": (int, "linear probe / temporal head: cached clip features per step", ("linear", "temporal")),
    "center": (str, "retrieval: subtract each split's mean feature before cosine similarity (yes/no); both are "
                    "reported, this picks the headline", ("retrieval",)),
    "ks": (str, "retrieval: comma-separated k of Recall@k", ("retrieval",)),
    "knn_k": (int, "kNN: neighbours that vote (weighted by exp(cosine / knn_temperature))", ("knn",)),
    "knn_temperature": (float, "kNN: temperature of the vote weights", ("knn",)),
    "motion_probe": (str, "kNN: also classify every test clip replaced by its middle frame repeated (no motion left; "
                          "yes/no); the drop in top-1 is how much the features rely on motion rather than scene",
                     ("knn",)),
}

# the multi-level paper's temporal-order head (visualization/main_temporal.py): bias-free Linear(C, 2) on pooled
# last-layer features, Adam 1e-3, wd 1e-3, 50 epochs, x0.1 at 30, batch 256; the same under both presets
TEMPORAL = {"optimizer": "adam", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-3, "epochs": 50, "milestones": "30",
            "lr_decay": 0.1, "probe_batch": 256, "test_clips": 4, "test_crops": 1}

# weighted kNN on L2-normalised frozen features (Wu et al. 2018; DINO's eval_knn: k 20, T 0.07); the same under
# both presets
KNN = {"knn_k": 20, "knn_temperature": 0.07, "motion_probe": "yes"}

FIMA = {
    "note": "FAME/FIMA eval.py: SGD lr 0.01 at batch 16, wd 1e-4, 150 epochs, x0.1 at 60 and 120, dropout 0.7 UCF101 / "
            "0.5 HMDB51, one random window per video per epoch with crop 0.2-1, flip, grayscale 0.2, jitter 0.8; test "
            "10 uniform clips x centre crop. Linear probe on cached features: L2-norm, BatchNorm1d (no affine), linear; "
            "SGD lr 0.1, wd 1e-3, 100 epochs, x0.1 at 60 and 80 (the notes' recommendation: the reference gives none).",
    "test_clips": 10, "test_crops": 1, "test_crop_fraction": 0.875, "batch_size": 32, "average": "softmax",
    "finetune": {"batch_size": 16, "optimizer": "sgd", "lr": 0.01, "lr_batch": 16, "backbone_lr_mult": 1.0, "momentum": 0.9,
                 "weight_decay": 1e-4, "epochs": 150, "milestones": "60,120", "lr_decay": 0.1, "min_area": 0.2, "flip_p": 0.5,
                 "grayscale_p": 0.2, "jitter_p": 0.8, "eval_every": 0},
    "linear": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3, "epochs": 100, "milestones": "60,80", "lr_decay": 0.1,
               "probe_batch": 256},
    "retrieval": {"center": "no", "ks": "1,5,10,20,50"},
    "knn": KNN,
    "cam": {"test_clips": 1},
    "temporal": TEMPORAL,
}

COCLR = {
    "note": "CoCLR main_classifier.py: 32 consecutive frames, crop resized to 128, Adam lr 1e-3 (backbone x0.1), wd 1e-3, "
            "dropout 0.9, 500 epochs x0.1 at 400 and 450, batch 32, softmax averaging. Differences: the test uses "
            "test_clips uniform windows x 3 crops, not all half-overlapping windows x 10 crops, and no test-time "
            "colour jitter (deterministic). Linear: its cached-feature probe (SGD lr 1.0, wd 1e-3, batch 1024).",
    "frames": 32, "stride": 1, "crop": 128, "test_clips": 10, "test_crops": 3, "test_crop_fraction": 0.875,
    "batch_size": 32, "average": "softmax",
    "finetune": {"batch_size": 32, "optimizer": "adam", "lr": 1e-3, "lr_batch": 0, "backbone_lr_mult": 0.1, "momentum": 0.9,
                 "weight_decay": 1e-3, "epochs": 500, "milestones": "400,450", "lr_decay": 0.1, "dropout": 0.9,
                 "min_area": 0.2, "flip_p": 0.5, "grayscale_p": 0.0, "jitter_p": 0.3, "eval_every": 0},
    "linear": {"lr": 1.0, "momentum": 0.9, "weight_decay": 1e-3, "epochs": 100, "milestones": "60,80", "lr_decay": 0.1,
               "probe_batch": 1024},
    "retrieval": {"center": "yes", "ks": "1,5,10,20,50"},
    "knn": KNN,
    "cam": {"test_clips": 1, "test_crops": 1},
    "temporal": TEMPORAL,
}

PRESETS = {"fima": FIMA, "coclr": COCLR}
DROPOUT_BY_DATASET = {"ucf101": 0.7, "hmdb51": 0.5}
DEFAULT_DROPOUT = 0.5
BACKBONE_CROP = {"i3d": 224, "r3d18": 112, "r2plus1d18": 112}


def resolve(command: str, preset: str, flags: dict, pretrain: dict | None, backbone: str, dataset: str = "") -> dict:
    """The settings of one run: flags over the preset over the checkpoint's config over the backbone's usual input."""
    if preset not in PRESETS:
        raise ValueError(f"unknown protocol {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    s = {k: v for k, v in p.items() if k in KEYS and command in KEYS[k][2]}
    s.update({k: v for k, v in p.get(command, {}).items()})
    pretrain = pretrain or {}
    for key, fallback in (("frames", 16), ("stride", 2), ("crop", BACKBONE_CROP.get(backbone, 224))):
        s.setdefault(key, pretrain.get(key, fallback))
    if command == "finetune":
        s.setdefault("dropout", DROPOUT_BY_DATASET.get(dataset.lower(), DEFAULT_DROPOUT))
    for k, v in flags.items():
        if v is None:
            continue
        if k in KEYS and command not in KEYS[k][2]:
            raise ValueError(f"--{k.replace('_', '-')} does not apply to `{command}`")
        s[k] = v
    _check(s)
    return s


def parse_ints(text: str | list | tuple) -> list[int]:
    if isinstance(text, (list, tuple)):
        return [int(v) for v in text]
    return [int(v) for v in str(text).replace(" ", "").split(",") if v]


def _check(s: dict) -> None:
    if s.get("test_crops", 1) not in (1, 3):
        raise ValueError(f"--test-crops {s['test_crops']}: choose 1 or 3")
    for key in ("frames", "stride", "crop", "test_clips", "batch_size", "probe_batch", "knn_k"):
        if key in s and s[key] < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1, not {s[key]}")
    problem = clip_problem(s["frames"], s["stride"], s["crop"])
    if problem:
        raise ValueError(problem.format(frames="--frames", stride="--stride", crop="--crop"))
    if "epochs" in s and s["epochs"] < 0:
        raise ValueError("--epochs must not be negative")
    if s.get("average", "softmax") not in ("softmax", "logits"):
        raise ValueError(f"--average {s['average']!r}: choose softmax or logits")
    if s.get("optimizer", "sgd") not in ("sgd", "adam"):
        raise ValueError(f"--optimizer {s['optimizer']!r}: choose sgd or adam")
    if str(s.get("center", "no")).lower() not in ("yes", "no", "true", "false", "1", "0"):
        raise ValueError(f"--center {s['center']!r}: yes or no")
    for key in ("milestones", "ks"):
        if key in s:
            try:
                parse_ints(s[key])
            except ValueError:
                raise ValueError(f"--{key} {s[key]!r}: give comma-separated integers, e.g. 60,120") from None
    if s.get("motion_probe", "no") not in ("yes", "no"):
        raise ValueError(f"--motion-probe {s['motion_probe']!r}: give yes or no")
    if "knn_temperature" in s and s["knn_temperature"] <= 0:
        raise ValueError(f"--knn-temperature {s['knn_temperature']}: must be positive")
    if "dropout" in s and not 0 <= s["dropout"] < 1:
        raise ValueError(f"--dropout {s['dropout']}: must be in [0, 1)")
