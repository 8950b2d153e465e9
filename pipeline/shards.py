"""Random access to the samples of a shard set, through the DALI index files (no tar scan).

A ``ShardSet`` lists every sample of ``OUT/<split>`` in manifest order (shard by shard, then tar order),
which defines the *sample index* used everywhere in ``pipeline/`` (the ``index`` output). Reading a
sample is one ``pread`` of the byte span its components occupy in the tar.
"""
from __future__ import annotations

import json
import os
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.container import Track, parse_mp4
from preprocess import integrity, shard_format

# fourcc -> label, from the one codec table (preprocess/shard_format.py): what DALI's CPU decoder handles, and not
CPU_CODECS = {f: c.label for c in shard_format.CODECS if c.cpu for f in c.fourccs}
GPU_ONLY_CODECS = {f: c.label for c in shard_format.CODECS if not c.cpu for f in c.fourccs}


# what a read refuses (preprocess/integrity.py's kinds): what would break decoding or training. The records'
# agreement (json and manifest against lbl and nf) is for `python -m preprocess verify` and the doctor.
READ_REFUSES = ("unreadable", "crc", "label", "frames")


class CodecError(ValueError):
    """The backend cannot decode the shard's codec."""


class SampleError(ValueError):
    """One sample cannot be read or decoded: the loaders set it aside (``VideoLoader.bad``) and go on."""

    def __init__(self, message: str, index: int = -1, key: str = "", shard: str = "", offset: int = -1):
        super().__init__(message)
        self.index, self.key, self.shard, self.offset = index, key, shard, offset


@dataclass(frozen=True)
class Sample:
    """One sample read from a shard: the encoded video and what the pipeline needs to sample it."""
    index: int           # position in the shard set (manifest order)
    key: str
    data: np.ndarray     # encoded video, uint8 [nbytes]
    label: int
    num_frames: int
    height: int
    width: int
    codec: str           # fourcc of the video sample entry ("vp09", ...), "" when unknown
    track: Track | None  # the MP4's sample table (for trimming to the needed GOPs), None if not an MP4


class _Manifest(dict):
    """A split manifest read without its per-sample list ("samples"), which is read from the file the first time
    something asks for it (``m["samples"]``, ``m.get("samples")``, ``"samples" in m``)."""

    def __init__(self, path: Path, head: dict):
        super().__init__(head)
        self._path = path

    def _full(self) -> None:
        if self._path is not None:
            samples = json.loads(self._path.read_text()).get("samples")
            self._path = None
            if samples is not None:
                super().__setitem__("samples", samples)

    def __getitem__(self, k):
        if k == "samples":
            self._full()
        return super().__getitem__(k)

    def get(self, k, default=None):
        if k == "samples":
            self._full()
        return super().get(k, default)

    def __contains__(self, k):
        if k == "samples":
            self._full()
        return super().__contains__(k)


class _Index:
    """Every sample's components as arrays (the lean index): for a set whose index lines all list the same
    members in the same order (what `python -m preprocess` writes), per sample the tar number, the offset and size
    of each member (int64 / int32, 5 numbers a member) and where its line starts in the .idx file (so its key is
    read on demand): ~40 bytes a sample instead of ~1 KB of Python objects. Other sets keep the parsed lines."""

    def __init__(self, tars: list[Path]):
        self.idx = [shard_format.index_path(t) for t in tars]
        self.exts: tuple[str, ...] | None = None
        self.lines: list[tuple[int, dict, str]] | None = None     # the fallback: (tar, components, key)
        # the arrays are allocated once from the files' "v1.x N" headers and filled file by file: concatenating
        # per-file arrays held two copies at once (at 650k samples a 183 MB peak for 75 MB kept)
        total = sum(_header_count(p) for p in self.idx)
        tar, off, size, line = np.empty(total, np.int32), None, None, np.empty(total, np.int64)
        at = 0
        for t, path in enumerate(self.idx):
            parsed = self._fast(path) if self.lines is None else None
            if parsed is not None and off is None:
                off = np.empty((total, parsed[0].shape[1]), np.int64)
                size = np.empty((total, parsed[0].shape[1]), np.int32)
            if parsed is None:
                if self.lines is None:     # first odd file: the files parsed so far move to the general form
                    self.lines = [(int(u), self.comps_of(a, b), self._key_at(u, c)) for u, a, b, c in
                                  zip(tar[:at], off[:at], size[:at], line[:at])] if at else []
                self.lines += [(t, comps, key) for comps, key in shard_format.parse_index(path)]
                continue
            o, z, ln = parsed
            n = len(o)
            tar[at:at + n], off[at:at + n], size[at:at + n], line[at:at + n] = t, o, z, ln
            at += n
        if self.lines is None:
            if off is None:                # no samples at all
                off, size = np.empty((0, 0), np.int64), np.empty((0, 0), np.int32)
            self.tar, self.off, self.size, self.line, self.n = tar[:at], off[:at], size[:at], line[:at], at
        else:
            self.n = len(self.lines)

    def _fast(self, path: Path):
        """(offsets int64 [n, E], sizes int32 [n, E], line starts int64 [n]) of one .idx whose lines all hold the
        same E members in the same order as name-carrying quads; None when the file is laid out otherwise."""
        data = path.read_bytes()
        tok = data.split()
        if len(tok) < 2 or not tok[0].startswith(b"v1"):
            return None
        try:
            n = int(tok[1])
        except ValueError:
            return None
        first = data.split(b"\n", 2)[1].split() if n and data.count(b"\n") >= 2 else []
        width = len(first)
        if n == 0 or width == 0 or width % 4 or len(tok) != 2 + n * width:
            return None
        exts = tuple(e.decode() for e in first[0::4])
        if self.exts is not None and exts != self.exts:
            return None
        body = tok[2:]
        for j, ext in enumerate(first[0::4]):
            if body[4 * j::width] != [ext] * n:
                return None
            # every name of this column ends with ".ext" (tokens hold no spaces: count the endings in one pass)
            if (b" ".join(body[4 * j + 3::width]) + b" ").count(b"." + ext + b" ") != n:
                return None
        nums = b" ".join(body[1::4]), b" ".join(body[2::4])
        if not all(x.replace(b" ", b"").isdigit() for x in nums):    # every offset and size all digits
            return None
        off = np.fromstring(nums[0], dtype=np.int64, sep=" ").reshape(n, -1)
        size = np.fromstring(nums[1], dtype=np.int64, sep=" ").reshape(n, -1)
        if size.max() >= 2**31:
            return None
        newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
        if len(newlines) < n:
            return None
        self.exts = exts
        return off, size.astype(np.int32), newlines[:n] + 1

    def comps_of(self, off, size) -> dict[str, tuple[int, int]]:
        return {e: (int(o), int(z)) for e, o, z in zip(self.exts, off, size)}

    def entry(self, i: int) -> tuple[int, dict[str, tuple[int, int]]]:
        """(tar number, {ext: (data offset, size)}) of sample i."""
        if self.lines is not None:
            t, comps, _ = self.lines[i]
            return t, comps
        return int(self.tar[i]), self.comps_of(self.off[i], self.size[i])

    def key(self, i: int) -> str:
        if self.lines is not None:
            return self.lines[i][2]
        return self._key_at(int(self.tar[i]), int(self.line[i]))

    def _key_at(self, t: int, start: int) -> str:
        """The key of the index line of tar t that starts at byte ``start`` (its first member's name)."""
        with open(self.idx[t], "rb") as f:
            f.seek(int(start))
            line = f.readline()
        name = line.split()[3].decode()
        return name.rsplit("/", 1)[-1].split(".", 1)[0]

    def find(self, keys: set[str]) -> dict[str, int]:
        """{key: index} of those of ``keys`` in the set (one pass over the index files when keys are asked for)."""
        if not keys:
            return {}
        if self.lines is not None:
            return {k: i for i, (_, _, k) in enumerate(self.lines) if k in keys}
        found, base = {}, 0
        width = 4 * len(self.exts)
        for path in self.idx:
            tok = path.read_bytes().split()
            names = tok[2 + 3::width]
            for j, name in enumerate(names):
                k = name.decode().rsplit("/", 1)[-1].split(".", 1)[0]
                if k in keys:
                    found[k] = base + j
            base += len(names)
        return found


def _header_count(path: Path) -> int:
    """The sample count a DALI index states in its first line ("v1.2 N"); 0 when it does not (the file is then
    parsed in the general form)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64).split()
        return int(head[1]) if len(head) > 1 and head[0].startswith(b"v1") else 0
    except (OSError, ValueError):
        return 0


class ShardSet:
    """The samples of one shard folder (``OUT/<split>``), read by offset through the ``.idx`` files."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        head = shard_format.load_manifest(self.dir, samples=False)   # clear errors for a missing/empty folder
        self.manifest = _Manifest(self.dir / shard_format.MANIFEST, head)
        self.tars = shard_format.shard_paths(self.dir, self.manifest)
        self.classes = list(self.manifest.get("classes") or [])
        self._index = _Index(self.tars)
        if not self._index.n:
            raise ValueError(f"{self.dir}: the shard set holds 0 samples: re-run `python -m preprocess`")
        need = (shard_format.VIDEO_EXT, shard_format.LABEL_EXT, shard_format.FRAMES_EXT)
        if self._index.lines is None:
            checks = [(0, self._index.exts)]
        else:
            checks = [(t, tuple(comps)) for t, comps, _ in self._index.lines]
        for t, exts in checks:
            missing = [e for e in need if e not in exts]
            if missing:
                raise ValueError(f"{self.tars[t]}: a sample lacks {missing} (has {sorted(exts)}): "
                                 "these shards were not written by `python -m preprocess`")
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()             # reads come from a small thread pool

    def __len__(self) -> int:
        return self._index.n

    def key(self, index: int) -> str:
        """The sample key from the index file ("" when the index carries no member names)."""
        return self._index.key(index)

    def find_keys(self, keys) -> dict[str, int]:
        """{key: sample index} for those of ``keys`` in this set."""
        return self._index.find(set(keys))

    def _fd(self, t: int) -> int:
        with self._lock:
            if t not in self._fds:
                self._fds[t] = os.open(self.tars[t], os.O_RDONLY)
            return self._fds[t]

    def location(self, index: int) -> tuple[str, int]:
        """(tar path, byte offset of the video member's data): where a bad sample sits, for people and tools."""
        t, comps = self._index.entry(index)
        return str(self.tars[t]), comps.get(shard_format.VIDEO_EXT, (min(o for o, _ in comps.values()), 0))[0]

    def read(self, index: int) -> Sample:
        """Read sample ``index``: one pread over the span of its components (and the tar header before each,
        checked against the index). A damaged sample raises ``SampleError`` naming it."""
        t, comps = self._index.entry(index)
        key = self._index.key(index)
        shard, offset = self.location(index)
        try:
            return self._read(index, t, comps, key)
        except SampleError:
            raise
        except (OSError, ValueError, UnicodeDecodeError, tarfile.TarError) as e:
            raise SampleError(f"{shard}: sample {index} ({key or '?'}) at byte {offset} is unreadable: {e}",
                              index, key, shard, offset) from None

    def _read(self, index: int, t: int, comps: dict, key: str) -> Sample:
        lo = min(off for off, _ in comps.values()) - integrity.BLOCK   # the first member's header too
        hi = max(off + size for off, size in comps.values())
        span = os.pread(self._fd(t), hi - lo, lo)
        if len(span) != hi - lo:
            raise OSError(f"short read ({len(span)} of {hi - lo} bytes): the shard is truncated")
        headers = {ext: integrity.parse_header(span[off - lo - integrity.BLOCK:off - lo])
                   for ext, (off, _) in comps.items()}
        for p in integrity.sample_member_problems(comps, headers, key):   # the index must point at this sample's members
            if p.kind != "member":
                continue
            if p.found is None:
                raise ValueError(f"the index puts {key}.{p.ext} at byte {p.offset}, but no tar member starts there: the "
                                 "index does not match the tar")
            name, size = p.found
            raise ValueError(f"the index says {key}.{p.ext} ({p.size} bytes) at byte {p.offset}, the tar has "
                             f"{name} ({size} bytes) there: the index does not match the tar")
        parts = {ext: span[off - lo:off - lo + size] for ext, (off, size) in comps.items()}
        for p in integrity.sample_problems(parts, classes=len(self.classes)):
            if p.kind in READ_REFUSES:
                raise ValueError(p.words)
        video = np.frombuffer(parts[shard_format.VIDEO_EXT], dtype=np.uint8)
        meta, _ = integrity.read_meta(parts)
        track = parse_mp4(video)
        if track is not None:
            codec, width, height = track.codec, track.width, track.height
        elif "width" in meta and "height" in meta:   # not an MP4 (e.g. WebM): trust the JSON record
            codec, width, height = "", int(meta["width"]), int(meta["height"])
        else:
            raise ValueError("not a parseable MP4 and its JSON record has no width/height: re-shard with "
                             "`python -m preprocess`")
        key = key or str(meta.get("key", f"sample{index}"))
        label = shard_format.unpack_int32(parts[shard_format.LABEL_EXT])
        num_frames = shard_format.unpack_int32(parts[shard_format.FRAMES_EXT])
        if track is not None and track.num_samples:      # never ask for frames the stream does not hold
            num_frames = min(num_frames, track.num_samples)
        return Sample(index=index, key=key, data=video, label=label, num_frames=num_frames,
                      height=height, width=width, codec=codec, track=track)

    def labels(self) -> np.ndarray:
        """Every sample's label (int64 [N]); reads 4 bytes per sample; -1 where those bytes are missing."""
        out = np.empty(len(self), dtype=np.int64)
        for i in range(len(self)):
            t, comps = self._index.entry(i)
            off, size = comps[shard_format.LABEL_EXT]
            try:
                out[i] = shard_format.unpack_int32(os.pread(self._fd(t), size, off))
            except ValueError:          # a damaged sample (cut short): the loaders set it aside when they meet it
                out[i] = shard_format.UNLABELLED
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def check_codec(sample: Sample, backend: str, where: str) -> None:
    """Raise a CodecError naming the fix when ``backend`` cannot decode ``sample``."""
    if backend != "cpu" or sample.codec in CPU_CODECS or sample.codec == "":
        return
    name = GPU_ONLY_CODECS.get(sample.codec, sample.codec)
    raise CodecError(f"{where}: sample {sample.index} is {name} ({sample.codec!r}), which DALI's CPU video decoder "
                     f"cannot decode (it handles {shard_format.cpu_decodable_text()} only). Re-shard with VP9: "
                     "`python -m preprocess SRC OUT --codec vp9`, or use backend='gpu'.")
