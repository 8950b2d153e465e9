"""The one integrity check: does a shard match its index, does a sample match its record.

`python -m preprocess verify`, the doctor (`data.shards`, `data.samples`) and the loader's reads
(`pipeline/shards.py`) all ask these questions; they ask them here, so a rule changes in one place. Each
function returns the problems it found (an empty list when all is well) and never raises on bad data: what a
problem means for a caller (a line in a report, a failed check, a sample set aside) and its wording are the
caller's. ``pipeline/`` imports this module, so it imports nothing from ``preprocess/`` but ``shard_format``.

The rules, from the format (``shard_format``): a tar stores each member as a 512-byte header and its data padded
to 512 bytes; an index line gives, per member, the offset of its data and its size; a member's name is
``<key>.<ext>``; the ``json`` record carries ``frames`` and ``label`` as the ``nf`` and ``lbl`` fields do, and the
video's CRC-32 (``VIDEO_CRC_FIELD``, absent in older shards); the manifest records each tar's size, sha256 and
sample count and each sample's label and frame count.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import shard_format as fmt

BLOCK = tarfile.BLOCKSIZE    # a tar header, and the unit member data is padded to


@dataclass(frozen=True)
class Problem:
    """One thing that does not match. ``kind`` says which rule failed:

    shard against the manifest: "bytes" (tar size), "sha256", "count" (index lines vs the manifest's samples);
    shard against its index: "lacking" (a member the line does not list), "outside" (a member beyond the tar's
    ends), "member" (no tar header of that member's name and size right before its data), "keys" (a sample's
    members name different samples);
    sample against its record: "unreadable" (lbl / nf not one int32, json not an object), "record" (lbl or nf
    differs from the manifest's record), "json" (lbl or nf differs from the json record), "crc" (the video's
    CRC-32 differs from the one recorded at sharding), "label" (outside the classes), "frames" (not positive).
    """
    kind: str
    sample: int | None = None    # the sample's line in its index; None for the shard as a whole
    ext: str = ""                # the member concerned ("" for the shard or the whole sample)
    offset: int | None = None    # byte offset of the member's data in the tar
    size: int | None = None      # the member's size as the index gives it
    found: object = None         # what the bytes hold (a (name, size) header, a value, ...); None when nothing
    expected: object = None      # what the index, record or manifest says

    @property
    def words(self) -> str:
        """What is wrong, in the one wording `preprocess verify`, the doctor and the loader's refusals all use; the
        caller says where (which shard, which sample)."""
        f, e, ext = self.found, self.expected, self.ext
        match self.kind:
            case "bytes":
                return f"the tar is {f} bytes, the manifest says {e} (a truncated or replaced copy)"
            case "sha256":
                return "its sha256 differs from the one recorded at sharding (bytes changed in the copy)"
            case "count":
                return f"the index lists {f} samples, the manifest {e}"
            case "lacking":
                return f"the index lists no {e}"
            case "outside":
                return f"the index's {ext} at {self.offset}+{self.size} lies outside the {e}-byte tar"
            case "member":
                found = "no tar header" if f is None else f"{f[0]!r} of {f[1]} bytes"
                return f"the index's {ext} at offset {self.offset} does not point at its tar member (found {found})"
            case "keys":
                return f"its members belong to different samples {f}"
            case "unreadable":
                return f"{ext} unreadable ({e})"
            case "record":
                return f"{ext} {f}, the manifest says {e}"
            case "json":
                return f"{ext} {f}, its json record says {e}"
            case "crc":
                return f"the video's CRC-32 is {f:08x}, {e:08x} when it was sharded: its bytes changed since"
            case "label":
                return f"label {f} is not a class index" + (f" (the manifest has {e} classes)" if e else "")
            case "frames":
                return f"frame count {f}"
        raise ValueError(f"unknown integrity problem kind {self.kind!r}")


# --------------------------------------------------------------------------------------------- tar headers


def parse_header(block: bytes) -> tuple[str, int] | None:
    """(member name, size) of the tar header in ``block`` (512 bytes), or None when it is not a valid header."""
    try:
        info = tarfile.TarInfo.frombuf(bytes(block), "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None
    return info.name, info.size


def read_header(fd: int, data_offset: int) -> tuple[str, int] | None:
    """(member name, size) of the tar header right before ``data_offset`` in the open tar, or None when none is."""
    if data_offset < BLOCK:
        return None
    return parse_header(os.pread(fd, BLOCK, data_offset - BLOCK))


def member_key(name: str) -> str:
    """The sample key of a member name, as an index line's key is read (the base name up to its first dot)."""
    return fmt.sample_key(name).rsplit("/", 1)[-1]


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- a shard against its index


def manifest_problems(tar: Path, entry: dict, index: list[dict] | None = None, checksum: bool = False) -> list[Problem]:
    """The tar against the manifest's entry for it: byte size, sha256 (``checksum``: reads the whole tar; only where
    the manifest recorded one) and, given its parsed ``index``, the sample count."""
    problems = []
    size = Path(tar).stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        problems.append(Problem("bytes", found=size, expected=entry["bytes"]))
    if checksum and entry.get("sha256") and sha256_file(tar) != entry["sha256"]:
        problems.append(Problem("sha256", expected=entry["sha256"]))
    if index is not None and entry.get("samples") is not None and len(index) != entry["samples"]:
        problems.append(Problem("count", found=len(index), expected=entry["samples"]))
    return problems


def index_problems(index: list[dict], tar_size: int, need=fmt.SAMPLE_EXTS) -> list[Problem]:
    """What an index says that cannot hold in a tar of ``tar_size`` bytes, read from the index alone: a sample
    without the members ``need``, a member whose data does not lie inside the tar after room for its header."""
    problems = []
    for j, comps in enumerate(index):
        lacking = [e for e in need if e not in comps]
        if lacking:
            problems.append(Problem("lacking", j, expected=lacking))
        for ext, (off, size) in comps.items():
            if off < BLOCK or off + size > tar_size:
                problems.append(Problem("outside", j, ext, off, size, expected=tar_size))
    return problems


def headers_to_read(index: list[dict], every: bool = True) -> list[tuple[int, str, int, int]]:
    """(sample, ext, offset, size) of the members whose tar header a check reads, in tar order. ``every=False``
    reads only where the index leaves the tar's own layout (each member: a 512-byte header, then its data padded
    to 512): the first member and both sides of every gap. Where consecutive members sit exactly so, a header
    between them that disagreed would have to be a second member squeezed into no room: one header per shard
    then checks an index written in one pass, the doctor's cheap check on 650,000 samples."""
    members = sorted((off, size, ext, j) for j, comps in enumerate(index) for ext, (off, size) in comps.items())
    if every:
        chosen = range(len(members))
    else:
        chosen = {0} if members else set()
        for k in range(1, len(members)):
            prev_off, prev_size = members[k - 1][:2]
            if members[k][0] != prev_off + -(-prev_size // BLOCK) * BLOCK + BLOCK:
                chosen |= {k - 1, k}
    return [(members[k][3], members[k][2], members[k][0], members[k][1]) for k in sorted(chosen)]


def header_problem(sample: int | None, ext: str, off: int, size: int, header: tuple[str, int] | None,
                   key: str = "") -> Problem | None:
    """A "member" problem unless ``header`` (the tar header before ``off``) is that of ``ext``'s member: a name
    ending in ``.ext``, of sample ``key`` when one is given, and ``size`` bytes."""
    if header is not None and header[1] == size and header[0].endswith("." + ext) and (
            not key or member_key(header[0]) == key):
        return None
    return Problem("member", sample, ext, off, size, found=header, expected=key or None)


def shard_problems(tar: str | Path, index: list[dict], entry: dict | None = None, need=fmt.SAMPLE_EXTS,
                   every_header: bool = True, checksum: bool = False) -> list[Problem]:
    """A tar against its parsed index (``shard_format.read_index``) and, given ``entry``, the manifest's record of
    it: first the manifest's problems, then the index's (in line order), then each member whose tar header does not
    match (in tar order; ``every_header=False``: only where the layout leaves room, see ``headers_to_read``)."""
    tar = Path(tar)
    problems = manifest_problems(tar, entry, index, checksum) if entry is not None else []
    problems += index_problems(index, tar.stat().st_size, need)
    fd = os.open(tar, os.O_RDONLY)
    try:
        for j, ext, off, size in headers_to_read(index, every_header):
            p = header_problem(j, ext, off, size, read_header(fd, off))
            if p:
                problems.append(p)
    finally:
        os.close(fd)
    return problems


def read_headers(fd: int, comps: dict) -> dict[str, tuple[str, int] | None]:
    """{ext: the tar header before that member's data, or None} of one index line, read from the open tar."""
    return {ext: read_header(fd, off) for ext, (off, _) in comps.items()}


def sample_member_problems(comps: dict, headers: dict, key: str = "", sample: int | None = None) -> list[Problem]:
    """One sample's index line (``comps``: ext -> (offset, size)) against the tar headers before its members
    (``headers``: ext -> (name, size) or None, e.g. ``read_headers``). Each must be its member's; with ``key`` (the
    index's) each must also name that sample, without it the members must all name one sample ("keys", found: the
    keys, sorted)."""
    problems, keys = [], set()
    for ext, (off, size) in comps.items():
        p = header_problem(sample, ext, off, size, headers.get(ext), key)
        if p:
            problems.append(p)
        else:
            keys.add(member_key(headers[ext][0]))
    if not key and len(keys) > 1:
        problems.append(Problem("keys", sample, found=sorted(keys)))
    return problems


# --------------------------------------------------------------------------------------------- a sample against its record


def _int32(parts: dict, ext: str, problems: list, sample: int | None) -> int | None:
    try:
        return fmt.unpack_int32(parts[ext])
    except KeyError:
        problems.append(Problem("unreadable", sample, ext, found=None, expected=f"'{ext}'"))
    except ValueError as e:
        problems.append(Problem("unreadable", sample, ext, found=len(parts[ext]), expected=str(e)))
    return None


def read_meta(parts: dict, sample: int | None = None) -> tuple[dict, Problem | None]:
    """The sample's json record ({} when it has none or it is unreadable) and the problem reading it, if any."""
    if fmt.META_EXT not in parts:
        return {}, None
    try:
        meta = json.loads(bytes(parts[fmt.META_EXT]))
    except ValueError as e:        # UnicodeDecodeError and JSONDecodeError both
        return {}, Problem("unreadable", sample, fmt.META_EXT, expected=str(e))
    if not isinstance(meta, dict):
        return {}, Problem("unreadable", sample, fmt.META_EXT, expected=f"the record is a JSON {type(meta).__name__}, "
                           "not an object")
    return meta, None


def sample_problems(parts: dict, record: dict | None = None, classes: int = 0,
                    sample: int | None = None) -> list[Problem]:
    """A sample's members (``parts``: ext -> bytes, as read at the index's offsets) against themselves, its
    manifest ``record`` ({"label", "frames", ...}; None: not compared) and the number of ``classes`` (0: unknown).
    In this order: lbl, nf and json unreadable (when lbl or nf is, nothing else is compared; the problem's
    ``expected`` holds the reader's error), the manifest record's label and frames, the json's label and frames,
    the video's CRC-32, the label's range, the frame count's sign."""
    problems = []
    label = _int32(parts, fmt.LABEL_EXT, problems, sample)
    frames = _int32(parts, fmt.FRAMES_EXT, problems, sample) if label is not None else None
    meta, unreadable = read_meta(parts, sample)
    if unreadable:
        problems.append(unreadable)
    if label is None or frames is None:
        return problems
    for ext, value, name in ((fmt.LABEL_EXT, label, "label"), (fmt.FRAMES_EXT, frames, "frames")):
        if record and record.get(name, value) != value:
            problems.append(Problem("record", sample, ext, found=value, expected=record[name]))
    for ext, value, name in ((fmt.LABEL_EXT, label, "label"), (fmt.FRAMES_EXT, frames, "frames")):
        if name in meta and meta[name] != value:
            problems.append(Problem("json", sample, ext, found=value, expected=meta[name]))
    crc = meta.get(fmt.VIDEO_CRC_FIELD)     # read at call time: older shards (and tests) go without
    if crc is not None and fmt.VIDEO_EXT in parts and zlib.crc32(parts[fmt.VIDEO_EXT]) != crc:
        problems.append(Problem("crc", sample, fmt.VIDEO_EXT, found=zlib.crc32(parts[fmt.VIDEO_EXT]), expected=crc))
    if label < fmt.UNLABELLED or (classes and label >= classes):
        problems.append(Problem("label", sample, fmt.LABEL_EXT, found=label, expected=classes))
    if frames <= 0:
        problems.append(Problem("frames", sample, fmt.FRAMES_EXT, found=frames))
    return problems


def read_parts(fd: int, comps: dict) -> dict[str, bytes]:
    """The members of one sample, read at the index's offsets (a member cut short by the tar's end comes back
    short: its size no longer matches)."""
    return {ext: os.pread(fd, size, off) for ext, (off, size) in comps.items()}
