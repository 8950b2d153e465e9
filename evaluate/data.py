"""Labelled shard sets (OUT/train and OUT/test from `python -m preprocess`), checked before any model runs."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import AugConfig, ShardSet
from preprocess import shard_format as fmt

from .backbone import EvalError


@dataclass
class Split:
    name: str               # "train" or "test"
    dir: Path
    shards: ShardSet
    classes: list[str]
    dataset: str
    manifest_sha: str       # identifies the content (sample keys, labels, encoding), not the folder's path

    @property
    def num_videos(self) -> int:
        return len(self.shards)


def resolve_dirs(data: str | None, train: str | None, test: str | None, need: tuple[str, ...]) -> dict[str, Path]:
    """--data OUT (OUT/train, OUT/test) or --train DIR / --test DIR."""
    dirs = {}
    if data:
        if train or test:
            raise EvalError("give either --data OUT or --train DIR --test DIR, not both")
        dirs = {s: Path(data) / s for s in need}
    else:
        given = {"train": train, "test": test}
        missing = [s for s in need if not given[s]]
        if missing:
            raise EvalError(f"no shards for {', '.join(missing)}: give --data OUT (holding OUT/train and OUT/test from "
                            "`python -m preprocess SRC OUT`) or " + " ".join(f"--{s} DIR" for s in missing))
        dirs = {s: Path(given[s]) for s in need}
    return dirs


def open_split(name: str, path: Path, labelled: bool = True) -> Split:
    try:
        shards = ShardSet(path)
    except FileNotFoundError as e:
        raise EvalError(f"{name} shards: {e}") from None
    m = shards.manifest
    if labelled:
        # the manifest's labels: a damaged sample's bytes must not make the whole set look unlabelled
        # read as numbers from the list's text (shard_format.manifest_labels), parsed only for other layouts
        listed = fmt.manifest_labels(path / fmt.MANIFEST)
        if listed is None:
            listed = [r["label"] for r in m.get("samples", []) if "label" in r]
        labels = np.asarray(listed) if len(listed) == len(shards) else shards.labels()
        missing = int((labels < 0).sum())
        if missing:
            raise EvalError(f"{path}: {missing} of {len(labels)} videos have no label (label -1): evaluation needs a "
                            "labelled shard set (e.g. `python -m preprocess SRC OUT --format ucf101|hmdb51|diving48|"
                            "folders`); an unlabelled pretraining set cannot be used here")
        classes = list(m.get("classes") or [])
        if not classes:
            raise EvalError(f"{path}: the manifest lists no classes; re-shard it with labels")
        if labels.max() >= len(classes):
            raise EvalError(f"{path}: label {int(labels.max())} but the manifest lists {len(classes)} classes")
    digest = hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()
    return Split(name, path, shards, list(m.get("classes") or []), str(m.get("dataset", "")), digest)


def open_splits(dirs: dict[str, Path], labelled: bool = True) -> dict[str, Split]:
    splits = {name: open_split(name, path, labelled) for name, path in dirs.items()}
    if labelled and "train" in splits and "test" in splits:
        a, b = splits["train"].classes, splits["test"].classes
        if a != b:
            if len(a) != len(b):
                what = f"train has {len(a)} classes, test has {len(b)}"
            else:
                i = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                what = f"class {i} is {a[i]!r} in train but {b[i]!r} in test"
            raise EvalError(f"class mismatch between {splits['train'].dir} and {splits['test'].dir}: {what}. Shard both "
                            "splits in one `python -m preprocess` run so they share one class list")
    return splits


def test_config(s: dict) -> AugConfig:
    """The deterministic test sampling: test_clips uniform windows x test_crops fixed crops, no colour augmentation."""
    return AugConfig(num_frames=s["frames"], stride=s["stride"], crop_size=s["crop"], color_aug=False, blur_p=0.0,
                     flip_p=0.0, test_clips=s["test_clips"], test_crops=s.get("test_crops", 1),
                     test_crop_fraction=s["test_crop_fraction"])


def train_config(s: dict) -> AugConfig:
    """Fine-tune training clips: one random window, random-resized crop, flip, grayscale / colour jitter, no blur."""
    return AugConfig(num_frames=s["frames"], stride=s["stride"], crop_size=s["crop"], crop_area=(s["min_area"], 1.0),
                     flip_p=s["flip_p"], grayscale_p=s["grayscale_p"], jitter_p=s["jitter_p"], blur_p=0.0,
                     color_aug=s["grayscale_p"] > 0 or s["jitter_p"] > 0)
