"""Dataset layouts -> a list of videos with split and label.

Each reader turns the layout an official download unpacks to into `Video` records. Annotation files are
looked for in SRC, in the official sub-folder, or taken from ``--annotations``. Missing videos that an
annotation names are returned separately (`missing`), never fatal.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

VIDEO_SUFFIXES = {".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ogv",
                  ".ts", ".mts", ".gif"}
FORMATS = ("folders", "list", "ucf101", "hmdb51", "kinetics", "diving48")


@dataclass
class Video:
    source: str            # path relative to SRC (posix), the video's identity in the manifest
    path: Path             # absolute path on disk
    split: str             # shard set it goes to: train / test / val / ...
    label: int = -1        # class index, -1 unlabelled
    extra: dict = field(default_factory=dict)   # format-specific metadata kept in the JSON record

    @property
    def key(self) -> str:
        """Unique, dot-free sample key: a readable slug of the file name plus a hash of the whole source path."""
        stem = Path(self.source).stem
        slug = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_")[:60] or "video"
        digest = hashlib.sha1(self.source.encode("utf-8", "surrogateescape")).hexdigest()[:10]
        return f"{slug}-{digest}"


@dataclass
class Dataset:
    classes: list[str]
    videos: list[Video]
    missing: list[tuple[str, str]] = field(default_factory=list)   # (source, reason)


class LayoutError(Exception):
    """The source folder or an annotation file does not match the chosen --format."""


def _is_video(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".")


def _rel(src: Path, p: Path) -> str:
    return p.relative_to(src).as_posix()


def _find(src: Path, annotations: Path | None, names: list[str], what: str) -> Path:
    """The first existing candidate among annotations dir/file, SRC, and official sub-folders."""
    bases = [annotations] if annotations else []
    bases += [src]
    for base in bases:
        if base.is_file() and base.name in [Path(n).name for n in names]:
            return base
        for n in names:
            if (base / n).is_file():
                return base / n
    raise LayoutError(f"{what} not found: looked for {', '.join(names)} in {', '.join(map(str, bases))}; "
                      "pass the folder or file with --annotations")


def _resolve(src: Path, rel: str, missing: list, note: str = "listed in annotations but not found") -> Path | None:
    p = src / rel
    if p.is_file():
        return p
    missing.append((rel, note))
    return None


def read_folders(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    """SRC/<class>/<video>, or SRC/<split>/<class>/<video> when SRC holds only train/val/test folders."""
    subdirs = sorted(d.name for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    split_names = {"train", "val", "test"}
    if subdirs and set(subdirs) <= split_names and "train" in subdirs:
        roots = [(s, src / s) for s in subdirs]
    else:
        roots = [("train", src)]
    classes = sorted({d.name for _, root in roots for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")})
    if not classes:
        raise LayoutError(f"{src}: no class folders found (expected SRC/<class>/<video> or SRC/train/<class>/<video>)")
    index = {c: i for i, c in enumerate(classes)}
    videos = [Video(_rel(src, p), p, split_name, index[cdir.name])
              for split_name, root in roots
              for cdir in sorted(d for d in root.iterdir() if d.is_dir() and d.name in index)
              for p in sorted(cdir.rglob("*")) if _is_video(p)]
    return Dataset(classes, videos)


def read_list(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    """Text files of `path[ label]` or `path,label` lines; --annotations FILE (split "train") or a folder of
    <split>.txt / <split>.csv files. Labels may be integers or class names; paths are relative to SRC."""
    if annotations is None:
        raise LayoutError("--format list needs --annotations: a list file, or a folder of <split>.txt files")
    files = [annotations] if annotations.is_file() else sorted(
        p for p in annotations.iterdir() if p.suffix in (".txt", ".csv", ".lst"))
    if not files:
        raise LayoutError(f"{annotations}: no .txt/.csv/.lst list files")
    rows, missing = [], []
    for f in files:
        split_name = "train" if annotations.is_file() else f.stem
        for n, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if (src / line).is_file():            # a whole line that names a file: a path (maybe with spaces), no label
                path, label = line, ""
            elif "," in line or " " in line:
                path, _, label = line.rpartition("," if "," in line else " ")
            else:
                path, label = line, ""
            rows.append((split_name, path.strip(), label.strip(), f"{f.name}:{n}"))
    named = sorted({lab for *_, lab, _ in rows if lab and not lab.lstrip("-").isdigit()})
    if named:
        classes, index = named, {c: i for i, c in enumerate(named)}
    else:
        ints = sorted({int(lab) for *_, lab, _ in rows if lab})
        classes = [str(i) for i in range(ints[-1] + 1)] if ints else []
        index = {str(i): i for i in range(len(classes))}
    videos = []
    for split_name, path, label, where in rows:
        p = _resolve(src, path, missing, f"listed at {where} but not found")
        if p is not None:
            videos.append(Video(_rel(src, p) if p.is_relative_to(src) else path, p, split_name,
                                index[label] if label else -1))
    return Dataset(classes, videos, missing)


def read_ucf101(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    names = lambda f: [f, f"ucfTrainTestlist/{f}"]   # noqa: E731
    class_ind = _find(src, annotations, names("classInd.txt"), "UCF101 classInd.txt")
    base = class_ind.parent
    classes = []
    for line in class_ind.read_text().split("\n"):
        if line.strip():
            idx, name = line.split()
            assert int(idx) == len(classes) + 1, f"{class_ind}: indices must be 1..N in order"
            classes.append(name)
    index = {c: i for i, c in enumerate(classes)}
    videos, missing = [], []
    for split_name, fname in (("train", f"trainlist0{split}.txt"), ("test", f"testlist0{split}.txt")):
        lst = base / fname
        if not lst.is_file():
            raise LayoutError(f"{lst} not found (UCF101 split {split}); --split takes 1, 2 or 3")
        for line in lst.read_text().split("\n"):
            if not line.strip():
                continue
            rel = line.split()[0]
            cls = rel.split("/")[0]
            p = _resolve(src, rel, missing)
            if p is not None:
                videos.append(Video(rel, p, split_name, index[cls]))
    return Dataset(classes, videos, missing)


def read_hmdb51(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    sub = "testTrainMulti_7030_splits"
    dirs = ([annotations] if annotations and annotations.is_dir() else []) + [src / sub, src]
    files = []
    for d in dirs:
        files = sorted(d.glob(f"*_test_split{split}.txt"))
        if files:
            break
    if not files:
        raise LayoutError(f"HMDB51 split files *_test_split{split}.txt not found in {', '.join(map(str, dirs))}; "
                          "pass their folder with --annotations")
    classes = sorted(f.name[: -len(f"_test_split{split}.txt")] for f in files)
    index = {c: i for i, c in enumerate(classes)}
    videos, missing = [], []
    for f in files:
        cls = f.name[: -len(f"_test_split{split}.txt")]
        for line in f.read_text().split("\n"):
            parts = line.split()
            if len(parts) < 2 or parts[1] not in ("1", "2"):   # 0 = not used in this split
                continue
            rel = f"{cls}/{parts[0]}"
            p = _resolve(src, rel, missing)
            if p is not None:
                videos.append(Video(rel, p, "train" if parts[1] == "1" else "test", index[cls]))
    return Dataset(classes, videos, missing)


KINETICS_NAME = re.compile(r"^(?P<yid>.{11})_(?P<start>\d{6})_(?P<end>\d{6})$")


def read_kinetics(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    """SRC/<split>/.../<youtube_id>_<start:06d>_<end:06d>.<ext> with annotations/<split>.csv."""
    csv_dir = annotations if annotations and annotations.is_dir() else (
        annotations.parent if annotations else (src / "annotations" if (src / "annotations").is_dir() else src))
    csvs = [annotations] if annotations and annotations.is_file() else sorted(csv_dir.glob("*.csv"))
    csvs = [c for c in csvs if c.stem in ("train", "val", "validate", "test")]
    if not csvs:
        raise LayoutError(f"Kinetics annotation CSVs (train.csv, val.csv, ...) not found in {csv_dir}; "
                          "pass the folder with --annotations")
    rows = []
    for c in csvs:
        with c.open(newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                rows.append((c.stem, r))
    classes = sorted({r["label"] for _, r in rows if r.get("label")})
    index = {c: i for i, c in enumerate(classes)}
    on_disk = {}
    for p in src.rglob("*"):
        m = KINETICS_NAME.match(p.stem)
        if m and p.suffix.lower() in VIDEO_SUFFIXES:
            on_disk[(m["yid"], int(m["start"]), int(m["end"]))] = p
    videos, missing = [], []
    for split_name, r in rows:
        k = (r["youtube_id"], int(float(r["time_start"])), int(float(r["time_end"])))
        p = on_disk.get(k)
        name = f"{k[0]}_{k[1]:06d}_{k[2]:06d}"
        if p is None:
            missing.append((f"{split_name}/{name}", "in the CSV but not downloaded"))
            continue
        split_name = "val" if split_name == "validate" else split_name
        videos.append(Video(_rel(src, p), p, split_name, index.get(r.get("label", ""), -1),
                            {"youtube_id": k[0], "time_start": k[1], "time_end": k[2]}))
    return Dataset(classes, videos, missing)


def read_diving48(src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    ann = annotations if annotations and annotations.is_dir() else src
    vocab_path = _find(src, ann, ["Diving48_vocab.json"], "Diving48_vocab.json")
    vocab = json.loads(vocab_path.read_text())
    classes = ["-".join(map(str, v)) if isinstance(v, list) else str(v) for v in vocab]
    videos, missing = [], []
    for split_name in ("train", "test"):
        path = _find(src, ann, [f"Diving48_V2_{split_name}.json"], f"Diving48_V2_{split_name}.json")
        for r in json.loads(path.read_text()):
            rel = next((f"rgb/{r['vid_name']}{s}" for s in (".mp4", ".avi", ".webm") if
                        (src / f"rgb/{r['vid_name']}{s}").is_file()), None)
            if rel is None:
                missing.append((f"rgb/{r['vid_name']}.mp4", "listed in annotations but not found"))
                continue
            videos.append(Video(rel, src / rel, split_name, int(r["label"]),
                                {k: r[k] for k in ("start_frame", "end_frame") if k in r}))
    return Dataset(classes, videos, missing)


READERS = {"folders": read_folders, "list": read_list, "ucf101": read_ucf101, "hmdb51": read_hmdb51,
           "kinetics": read_kinetics, "diving48": read_diving48}


def read_dataset(fmt: str, src: Path, annotations: Path | None = None, split: int = 1) -> Dataset:
    if fmt not in READERS:
        raise LayoutError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if not src.is_dir():
        raise LayoutError(f"source folder {src} does not exist")
    ds = READERS[fmt](src, annotations, split)
    keys: dict[str, str] = {}
    for v in ds.videos:   # the hash makes collisions practically impossible; still, never write two samples as one
        if keys.setdefault(v.key, v.source) != v.source:
            raise LayoutError(f"sample key collision between {keys[v.key]} and {v.source}")
    seen: dict[str, str] = {}
    unique = []
    for v in ds.videos:
        if seen.setdefault(v.source, v.split) != v.split:
            raise LayoutError(f"{v.source} is in both the {seen[v.source]} and {v.split} splits")
        if v.key in keys and keys[v.key] is None:
            ds.missing.append((v.source, "listed twice; kept once"))
            continue
        keys[v.key] = None
        unique.append(v)
    ds.videos = unique
    return ds
