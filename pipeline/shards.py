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
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.container import Track, parse_mp4
from preprocess import shard_format

# fourcc -> label, from the one codec table (preprocess/shard_format.py): what DALI's CPU decoder handles, and not
CPU_CODECS = {f: c.label for c in shard_format.CODECS if c.cpu for f in c.fourccs}
GPU_ONLY_CODECS = {f: c.label for c in shard_format.CODECS if not c.cpu for f in c.fourccs}


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


class ShardSet:
    """The samples of one shard folder (``OUT/<split>``), read by offset through the ``.idx`` files."""

    def __init__(self, shard_dir: str | Path):
        self.dir = Path(shard_dir)
        self.manifest = shard_format.load_manifest(self.dir)   # clear errors for a missing/empty folder
        self.tars = shard_format.shard_paths(self.dir, self.manifest)
        self.classes = list(self.manifest.get("classes") or [])
        entries = []            # (tar number, components, key)
        for t, tar in enumerate(self.tars):
            entries += [(t, comps, key) for comps, key in shard_format.parse_index(shard_format.index_path(tar))]
        if not entries:
            raise ValueError(f"{self.dir}: the shard set holds 0 samples: re-run `python -m preprocess`")
        need = (shard_format.VIDEO_EXT, shard_format.LABEL_EXT, shard_format.FRAMES_EXT)
        for t, comps, _ in entries:
            missing = [e for e in need if e not in comps]
            if missing:
                raise ValueError(f"{self.tars[t]}: a sample lacks {missing} (has {sorted(comps)}): "
                                 "these shards were not written by `python -m preprocess`")
        self._entries = entries
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()             # reads come from a small thread pool

    def __len__(self) -> int:
        return len(self._entries)

    def key(self, index: int) -> str:
        """The sample key from the index file ("" when the index carries no member names)."""
        return self._entries[index][2]

    def _fd(self, t: int) -> int:
        with self._lock:
            if t not in self._fds:
                self._fds[t] = os.open(self.tars[t], os.O_RDONLY)
            return self._fds[t]

    def location(self, index: int) -> tuple[str, int]:
        """(tar path, byte offset of the video member's data): where a bad sample sits, for people and tools."""
        t, comps, _ = self._entries[index]
        return str(self.tars[t]), comps.get(shard_format.VIDEO_EXT, (min(o for o, _ in comps.values()), 0))[0]

    def read(self, index: int) -> Sample:
        """Read sample ``index``: one pread over the span of its components (and the tar header before each,
        checked against the index). A damaged sample raises ``SampleError`` naming it."""
        t, comps, key = self._entries[index]
        shard, offset = self.location(index)
        try:
            return self._read(index, t, comps, key)
        except SampleError:
            raise
        except (OSError, ValueError, UnicodeDecodeError, tarfile.TarError) as e:
            raise SampleError(f"{shard}: sample {index} ({key or '?'}) at byte {offset} is unreadable: {e}",
                              index, key, shard, offset) from None

    def _read(self, index: int, t: int, comps: dict, key: str) -> Sample:
        lo = min(off for off, _ in comps.values()) - tarfile.BLOCKSIZE   # the first member's header too
        hi = max(off + size for off, size in comps.values())
        span = os.pread(self._fd(t), hi - lo, lo)
        if len(span) != hi - lo:
            raise OSError(f"short read ({len(span)} of {hi - lo} bytes): the shard is truncated")
        for ext, (off, size) in comps.items():    # the index must point at this sample's own members
            try:
                head = tarfile.TarInfo.frombuf(span[off - lo - tarfile.BLOCKSIZE:off - lo], "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                raise ValueError(f"the index puts {key}.{ext} at byte {off}, but no tar member starts there: the index "
                                 "does not match the tar") from None
            if head.size != size or not head.name.endswith("." + ext) or (key and shard_format.sample_key(head.name) != key):
                raise ValueError(f"the index says {key}.{ext} ({size} bytes) at byte {off}, the tar has "
                                 f"{head.name} ({head.size} bytes) there: the index does not match the tar")

        def part(ext):
            off, size = comps[ext]
            return span[off - lo:off - lo + size]

        video = np.frombuffer(part(shard_format.VIDEO_EXT), dtype=np.uint8)
        meta = json.loads(part(shard_format.META_EXT)) if shard_format.META_EXT in comps else {}
        crc = meta.get(shard_format.VIDEO_CRC_FIELD)
        if crc is not None and zlib.crc32(video) != crc:
            raise ValueError(f"the video's CRC-32 is {zlib.crc32(video):08x}, {crc:08x} when it was sharded: its bytes "
                             "changed since")
        track = parse_mp4(video)
        if track is not None:
            codec, width, height = track.codec, track.width, track.height
        elif "width" in meta and "height" in meta:   # not an MP4 (e.g. WebM): trust the JSON record
            codec, width, height = "", int(meta["width"]), int(meta["height"])
        else:
            raise ValueError("not a parseable MP4 and its JSON record has no width/height: re-shard with "
                             "`python -m preprocess`")
        key = key or str(meta.get("key", f"sample{index}"))
        label = shard_format.unpack_int32(part(shard_format.LABEL_EXT))
        num_frames = shard_format.unpack_int32(part(shard_format.FRAMES_EXT))
        if label < shard_format.UNLABELLED or (self.classes and label >= len(self.classes)):
            raise ValueError(f"label {label} outside the manifest's {len(self.classes)} classes")
        if num_frames <= 0:
            raise ValueError(f"frame count {num_frames}")
        if track is not None and track.num_samples:      # never ask for frames the stream does not hold
            num_frames = min(num_frames, track.num_samples)
        return Sample(index=index, key=key, data=video, label=label, num_frames=num_frames,
                      height=height, width=width, codec=codec, track=track)

    def labels(self) -> np.ndarray:
        """Every sample's label (int64 [N]); reads 4 bytes per sample; -1 where those bytes are missing."""
        out = np.empty(len(self), dtype=np.int64)
        for i, (t, comps, _) in enumerate(self._entries):
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
                     "cannot decode (it handles VP9, VP8 and MJPEG only). Re-shard with VP9: "
                     "`python -m preprocess SRC OUT --codec vp9`, or use backend='gpu'.")
