"""The shard format: the one place that names the fields of a sample and the files of a shard set.

A shard set is one folder (e.g. ``OUT/train``) holding

* ``{name}-{shard:06d}.tar``: WebDataset tars, one sample per video, samples shuffled across shards;
* ``{name}-{shard:06d}.idx``: a DALI index of that tar (``wds2idx`` v1.2 format), so DALI's reader
  starts without scanning the tar;
* ``manifest.json``: classes, shards with sample and frame counts, encoding settings, input -> key map.

Each sample ``<key>.<ext>`` has the fields below. ``lbl`` and ``nf`` are raw little-endian int32 so a
DALI pipeline reads them with ``dtypes=INT32`` without any Python; ``json`` is for people and tools.
``pipeline/`` imports this module and nothing else from ``preprocess/``.
"""
from __future__ import annotations

import contextlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

FORMAT_VERSION = 1

VIDEO_EXT = "mp4"   # the encoded video (VP9 in MP4 by default)
LABEL_EXT = "lbl"   # int32 LE class index, -1 for unlabelled videos
FRAMES_EXT = "nf"   # int32 LE number of frames in the encoded video
META_EXT = "json"   # {"source", "label", "label_name", "fps", "frames", "width", "height", "duration", ...}
VIDEO_CRC_FIELD = "video_crc32"   # in the json: zlib.crc32 of the mp4 member, checked by every read (older shards lack it)
SAMPLE_EXTS = (VIDEO_EXT, LABEL_EXT, FRAMES_EXT, META_EXT)  # order inside each sample in the tar

# --- codecs: one vocabulary for the sharder (names, ffmpeg encoders), the MP4 reader (sample-entry fourccs) and
# the loaders and doctor (which backend decodes what: DALI 2.4's CPU decoder handles those marked `cpu` only)
@dataclass(frozen=True)
class Codec:
    name: str                      # manifest `encoding.codec` and `python -m preprocess --codec`
    label: str                     # for people
    fourccs: tuple[str, ...]       # MP4 sample-entry types
    cpu: bool                      # DALI's CPU decoder handles it (every codec here decodes on NVDEC)
    encoder: str | None = None     # the ffmpeg encoder `python -m preprocess` writes it with (None: not written)
    aliases: tuple[str, ...] = ()  # other names for it in manifests and ffmpeg


CODECS = (
    Codec("vp9", "VP9", ("vp09",), True, "libvpx-vp9", ("libvpx-vp9", "vp09")),
    Codec("vp8", "VP8", ("vp08",), True, aliases=("libvpx",)),
    Codec("mjpeg", "MJPEG", ("mjpa", "mjpg", "jpeg"), True),
    Codec("h264", "H.264", ("avc1", "avc3"), False, "libx264", ("libx264", "avc")),
    Codec("hevc", "HEVC", ("hvc1", "hev1"), False, aliases=("h265", "libx265")),
    Codec("av1", "AV1", ("av01",), False),
    Codec("mpeg4", "MPEG-4", ("mp4v",), False),
)
WRITTEN_CODECS = tuple(c.name for c in CODECS if c.encoder)     # what `--codec` offers


def cpu_decodable_text() -> str:
    """The codecs DALI's CPU decoder handles, for messages: "VP9, VP8 and MJPEG" (the table's order)."""
    labels = [c.label for c in CODECS if c.cpu]
    return ", ".join(labels[:-1]) + " and " + labels[-1] if len(labels) > 1 else "".join(labels)


def codec_named(name: str) -> Codec | None:
    """The codec a manifest or ffmpeg names ("vp9", "libx264", ...), or None."""
    name = name.lower()
    return next((c for c in CODECS if name == c.name or name in c.aliases), None)


def codec_of_fourcc(fourcc: str) -> Codec | None:
    """The codec of an MP4 sample-entry type ("vp09", "avc1", ...), or None."""
    return next((c for c in CODECS if fourcc in c.fourccs), None)


MANIFEST = "manifest.json"
UNLABELLED = -1


def shard_name(name: str, index: int) -> str:
    return f"{name}-{index:06d}.tar"


def index_path(tar_path: str | Path) -> Path:
    """The DALI index that belongs to a tar: same stem, ``.idx``."""
    return Path(tar_path).with_suffix(".idx")


def pack_int32(value: int) -> bytes:
    return struct.pack("<i", int(value))


def unpack_int32(data: bytes) -> int:
    if len(data) != 4:
        raise ValueError(f"expected 4 bytes of little-endian int32, got {len(data)}")
    return struct.unpack("<i", data)[0]


def load_manifest(shard_dir: str | Path, samples: bool = True) -> dict:
    """Read and sanity-check a shard set's manifest; errors name the folder and what to do. ``samples=False``
    leaves out the per-sample list (``manifest_head``), ~110 bytes a sample that start-up does not need."""
    shard_dir = Path(shard_dir)
    path = shard_dir / MANIFEST
    if not shard_dir.is_dir():
        raise FileNotFoundError(f"shard folder {shard_dir} does not exist: run `python -m preprocess SRC OUT` first "
                                "and point at OUT/<split> (e.g. OUT/train)")
    if not path.is_file():
        tars = sorted(shard_dir.glob("*.tar"))
        hint = (f"it holds {len(tars)} .tar files but no manifest: the sharding run did not finish; re-run it "
                "(it resumes)") if tars else "it holds no shards: run `python -m preprocess SRC OUT` and point at OUT/<split>"
        raise FileNotFoundError(f"{path} not found: {hint}")
    manifest = json.loads(path.read_text()) if samples else manifest_head(path)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: shard format version {manifest.get('format_version')!r}, this code reads "
                         f"{FORMAT_VERSION}: re-shard with this version of `python -m preprocess`")
    if not manifest.get("shards"):
        raise ValueError(f"{path}: the shard set is empty (0 shards): every input was skipped; see errors.jsonl next to it")
    return manifest


def manifest_head(path: str | Path) -> dict:
    """A manifest without its per-sample list ("samples"), read without reading that list: the file is mapped,
    and the list, which `python -m preprocess` writes (indent 1, sorted keys) between "num_*" and "shards", is cut
    out of the text, so only the pages before and after it are touched (at 650,000 samples the list is ~70 MB of
    the file and ~1 KB per sample once parsed). Manifests laid out otherwise are parsed whole, the list dropped."""
    with _mapped_samples(path) as (mm, span):
        if mm is None:
            return json.loads(b"")              # the JSONDecodeError of an empty file
        if span is not None:
            head = json.loads(mm[:span[0]] + mm[span[1]:])
            if isinstance(head, dict):
                return head
        whole = json.loads(mm[:])
    if isinstance(whole, dict):
        whole.pop("samples", None)
    return whole


_NO_SAMPLES = b'\n "samples": [],'       # an empty per-sample list, right before "shards"


def _samples_span(mm) -> tuple[int, int] | None:
    """(start, end) of the text of a manifest's per-sample list as `python -m preprocess` writes it (from the
    newline before "samples" to the one before "shards"), found without reading the list; None for other layouts."""
    i = mm.find(b'\n "samples": [')
    j = mm.rfind(b'\n "shards": [') if i >= 0 else -1     # searched from the end: the list is not touched
    # the list's closing bracket right before "shards": nothing else sits between them
    # (the length first: slicing the whole list to compare it would copy it, ~90 MB at 650,000 samples)
    empty = j - i == len(_NO_SAMPLES) and mm[i:j] == _NO_SAMPLES
    if i >= 0 and j > i and (empty or mm.rfind(b'\n ]', i, j) == j - 4 and mm[j - 1:j] == b","):
        return i, j
    return None


@contextlib.contextmanager
def _mapped_samples(path: str | Path):
    """The manifest mapped read-only and the (start, end) of its per-sample list's text (span None: an empty file
    or another layout)."""
    import mmap
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            yield None, None
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm, _samples_span(mm)


def manifest_labels(path: str | Path):
    """The "label" of every per-sample record that has one, in list order (int64 array), read as numbers from the
    list's text without building a Python object per sample (at 650,000 samples: ~5 MB instead of ~700 MB); what
    ``[r["label"] for r in manifest["samples"] if "label" in r]`` gives. None when the manifest is laid out
    otherwise or a label is not a plain integer (the caller parses the list)."""
    import re
    import numpy as np
    with _mapped_samples(path) as (mm, span):
        if span is None:
            return None
        text = mm[span[0]:span[1]]
    # indent 1: a record's own keys sit at exactly 3 spaces (a string holds no raw newline, nested keys sit deeper)
    keys = text.count(b'\n   "label": ')
    found = re.findall(rb'\n   "label": (-?[0-9]+)(?=,?\n)', text)
    if len(found) != keys:
        return None
    return np.array(found, dtype=np.int64) if found else np.zeros(0, dtype=np.int64)


def manifest_records(path: str | Path, keys) -> tuple[dict[str, dict], bool] | None:
    """({key: record} for those of ``keys`` that the manifest's per-sample list holds, whether the list holds any
    record), read by finding each key in the list's text and parsing only its record: what
    ``{r.get("key"): r for r in manifest["samples"] if isinstance(r, dict)}`` gives for those keys (a key listed
    twice: the last record, as there). None when the manifest is laid out otherwise (the caller parses the list)."""
    with _mapped_samples(path) as (mm, span):
        if span is None:
            return None
        i, j = span
        if mm.find(b"\n  {", i, j) < 0:        # no record (an empty list, or none that is an object)
            return ({}, False) if mm[i:j] == _NO_SAMPLES else None
        found = {}
        for key in set(keys):
            # a record's own keys sit at exactly 3 spaces of indent, its braces at 2 (indent 1, sorted keys);
            # the key as json.dumps writes it, with and without \u escapes
            for text in {json.dumps(key).encode(), json.dumps(key, ensure_ascii=False).encode()}:
                at = max(mm.rfind(b'\n   "key": ' + text + b",\n", i, j),
                         mm.rfind(b'\n   "key": ' + text + b"\n  }", i, j))
                if at < 0:
                    continue
                start, end = mm.rfind(b"\n  {", i, at), mm.find(b"\n  }", at, j)
                if start < 0 or end < 0:
                    return None
                record = json.loads(mm[start:end + 4])
                if not isinstance(record, dict) or record.get("key") != key:
                    return None
                found[key] = record
                break
    return found, True


def shard_paths(shard_dir: str | Path, manifest: dict | None = None) -> list[Path]:
    """Absolute paths of a shard set's tars, in manifest order, checking that each tar and index exists."""
    shard_dir = Path(shard_dir)
    manifest = manifest or load_manifest(shard_dir)
    paths = []
    for shard in manifest["shards"]:
        p = shard_dir / shard["file"]
        for f in (p, index_path(p)):
            if not f.is_file():
                raise FileNotFoundError(f"{f} is listed in {shard_dir / MANIFEST} but missing: copy the whole shard "
                                        "folder, or re-run `python -m preprocess` (it resumes)")
        paths.append(p)
    return paths


# --- DALI index (the `wds2idx` v1.2 format that `fn.readers.webdataset(index_paths=...)` reads) ---------------
# First line "v1.2 <num_samples>"; then one line per sample with, for each of its files, four fields
# "ext data_offset size member_name" (data_offset: byte offset of the file's data, after its 512-byte header).
INDEX_VERSION = "v1.2"


def format_index(samples: list[list[tuple[str, int, int, str]]]) -> str:
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in comps) for comps in samples]
    return "\n".join(lines) + "\n"


def parse_index(path: str | Path) -> list[tuple[dict[str, tuple[int, int]], str]]:
    """Parse a wds2idx index: ``v1.2 N`` then per sample ``ext offset size [name]`` groups.

    Returns per sample ({ext: (offset, size)}, key); the key is "" when the index has no names."""
    lines = Path(path).read_text().split("\n")
    head = lines[0].split()
    if len(head) != 2 or not head[0].startswith("v1"):
        raise ValueError(f"{path}: not a DALI webdataset index (first line {lines[0]!r})")
    n = int(head[1])
    samples = []
    for line in lines[1:n + 1]:
        tok = line.split()
        # v1.2 written by DALI's wds2idx has a 4th field (the member name); accept 3-field groups too.
        quads = (len(tok) % 4 == 0 and all(t.isdigit() for t in tok[1::4] + tok[2::4])
                 and all(name.endswith("." + ext) for ext, name in zip(tok[0::4], tok[3::4])))
        step = 4 if quads else 3
        if len(tok) % step:
            raise ValueError(f"{path}: malformed index line {line!r}")
        comps = {tok[i]: (int(tok[i + 1]), int(tok[i + 2])) for i in range(0, len(tok), step)}
        key = tok[3].rsplit("/", 1)[-1].split(".", 1)[0] if quads else ""
        samples.append((comps, key))
    if len(samples) != n:
        raise ValueError(f"{path}: header says {n} samples, found {len(samples)} lines: re-run `python -m preprocess`")
    return samples


def read_index(path: str | Path) -> list[dict[str, tuple[int, int]]]:
    """The components of each sample of a DALI index: ext -> (data_offset, size) in the tar (``parse_index``
    without the keys)."""
    return [comps for comps, _ in parse_index(path)]


def frame_sizes(records) -> dict[str, int]:
    """{"WxH": number of samples} over sample records with "width" and "height"."""
    sizes: dict[str, int] = {}
    for r in records:
        if r.get("width"):
            k = f"{r['width']}x{r['height']}"
            sizes[k] = sizes.get(k, 0) + 1
    return dict(sorted(sizes.items()))


def sample_key(member_name: str) -> str:
    """WebDataset's rule: the key is the member name up to the first dot of its base name."""
    slash = member_name.rfind("/") + 1
    dot = member_name.find(".", slash)
    return member_name[:dot]


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write to a temp file in the same folder, fsync, rename: readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
