"""preprocess/integrity.py on real shards: a clean set has no problems, and each planted defect (a byte of a video
changed, a tar cut short, an index line edited, a record that disagrees) is named exactly, by the function that
owns that question, and nothing else is."""
from __future__ import annotations

import os
import shutil
import tarfile
import zlib
from pathlib import Path

import pytest

from preprocess import integrity, shard_format as fmt
from preprocess.cli import main as preprocess_main
from preprocess.sample_videos import make_sample_videos


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """A small real shard set: 2 classes x 4 train videos of 32 frames, 3 samples a shard (3 tars)."""
    videos = tmp_path_factory.mktemp("integrity_videos")
    make_sample_videos(videos, classes=("right", "left"), train_per_class=4, test_per_class=1, frames=32,
                       progress=False)
    out = tmp_path_factory.mktemp("integrity_shards")
    assert preprocess_main([str(videos), str(out), "--short-side", "64", "--workers", "1", "--max-per-shard", "3",
                            "--no-progress"]) == 0
    return out / "train"


@pytest.fixture
def copy(shards, tmp_path) -> Path:
    out = tmp_path / "train"
    shutil.copytree(shards, out)
    return out


def shard_of(split: Path, t: int = 0) -> tuple[Path, list[dict], list[str], dict]:
    """(tar, parsed index, the index's keys, the manifest's entry) of shard t."""
    manifest = fmt.load_manifest(split)
    tar = fmt.shard_paths(split, manifest)[t]
    lines = fmt.parse_index(fmt.index_path(tar))
    return tar, [c for c, _ in lines], [k for _, k in lines], manifest["shards"][t]


def sample_check(split: Path, tar: Path, comps: dict, key: str) -> tuple[list, list]:
    """(member problems, record problems) of one sample, as the callers ask them."""
    manifest = fmt.load_manifest(split)
    record = next(r for r in manifest["samples"] if r["key"] == key)
    fd = os.open(tar, os.O_RDONLY)
    try:
        members = integrity.sample_member_problems(comps, integrity.read_headers(fd, comps), key)
        parts = integrity.read_parts(fd, comps)
    finally:
        os.close(fd)
    return members, integrity.sample_problems(parts, record, len(manifest["classes"]))


def kinds(problems) -> list[tuple]:
    return [(p.kind, p.sample, p.ext) for p in problems]


def test_a_clean_set_has_no_problems(shards):
    manifest = fmt.load_manifest(shards)
    assert len(manifest["shards"]) == 3
    for t in range(3):
        tar, index, keys, entry = shard_of(shards, t)
        assert integrity.shard_problems(tar, index, entry, checksum=True) == []
        assert integrity.shard_problems(tar, index, entry, every_header=False) == []
        for comps, key in zip(index, keys):
            assert sample_check(shards, tar, comps, key) == ([], [])


def test_the_header_parser_reads_what_tarfile_reads(shards):
    tar = fmt.shard_paths(shards)[0]
    fd = os.open(tar, os.O_RDONLY)
    try:
        with tarfile.open(tar) as t:
            members = t.getmembers()
            assert [integrity.read_header(fd, m.offset_data) for m in members] == [(m.name, m.size) for m in members]
        assert integrity.read_header(fd, members[0].offset_data + 512) is None     # inside the data: no header
        assert integrity.read_header(fd, 100) is None
    finally:
        os.close(fd)


def test_one_byte_of_a_video_changed(copy):
    tar, index, keys, entry = shard_of(copy)
    off, size = index[1][fmt.VIDEO_EXT]
    data = bytearray(tar.read_bytes())
    data[off + size // 2] ^= 0xFF
    tar.write_bytes(bytes(data))
    # the shard: only its checksum notices (size, count and every header still agree)
    assert kinds(integrity.shard_problems(tar, index, entry, checksum=True)) == [("sha256", None, "")]
    assert integrity.shard_problems(tar, index, entry) == []
    # the sample: exactly its CRC-32, with both values; its neighbours are whole
    members, record = sample_check(copy, tar, index[1], keys[1])
    assert members == [] and kinds(record) == [("crc", None, fmt.VIDEO_EXT)]
    assert record[0].found == zlib.crc32(data[off:off + size]) and record[0].found != record[0].expected
    for j in (0, 2):
        assert sample_check(copy, tar, index[j], keys[j]) == ([], [])


def test_a_tar_cut_short(copy):
    tar, index, keys, entry = shard_of(copy)
    last = len(index) - 1
    off, size = index[last][fmt.VIDEO_EXT]
    with open(tar, "r+b") as f:
        f.truncate(off + size // 2)
    found = integrity.shard_problems(tar, index, entry, checksum=True)
    assert kinds(found[:2]) == [("bytes", None, ""), ("sha256", None, "")]
    assert found[0].found == off + size // 2 and found[0].expected == entry["bytes"]
    # the last sample and only it: every member reaches past the end; those after the video lost their headers too
    after = [e for e in fmt.SAMPLE_EXTS if index[last][e][0] > off]
    assert sorted(after) == sorted(set(fmt.SAMPLE_EXTS) - {fmt.VIDEO_EXT})
    assert sorted(kinds(found[2:])) == sorted([("outside", last, e) for e in fmt.SAMPLE_EXTS] +
                                              [("member", last, e) for e in after])


def test_an_index_line_pointing_512_bytes_late(copy):
    tar, index, keys, entry = shard_of(copy)
    idx = fmt.index_path(tar)
    lines = idx.read_text().splitlines()
    f = lines[1 + 1].split(" ")
    at = f.index(fmt.VIDEO_EXT) + 1
    f[at] = str(int(f[at]) + 512)
    lines[1 + 1] = " ".join(f)
    idx.write_text("\n".join(lines) + "\n")
    index = fmt.read_index(idx)
    moved = index[1][fmt.VIDEO_EXT][0]
    for every in (True, False):          # verify reads every header, the doctor only where the layout breaks
        found = integrity.shard_problems(tar, index, entry, every_header=every)
        assert kinds(found) == [("member", 1, fmt.VIDEO_EXT)] and found[0].offset == moved and found[0].found is None
    members, _ = sample_check(copy, tar, index[1], keys[1])
    assert kinds(members) == [("member", None, fmt.VIDEO_EXT)]


def test_an_index_line_with_a_wrong_size(copy):
    tar, index, keys, entry = shard_of(copy)
    off, size = index[1][fmt.META_EXT]
    index[1][fmt.META_EXT] = (off, size - 1)          # the same place, one byte short
    found = integrity.shard_problems(tar, index, entry)
    assert kinds(found) == [("member", 1, fmt.META_EXT)] and found[0].found == (f"{keys[1]}.{fmt.META_EXT}", size)
    members, _ = sample_check(copy, tar, index[1], keys[1])
    assert kinds(members) == [("member", None, fmt.META_EXT)]


def test_an_index_line_pointing_at_another_samples_member(copy):
    tar, index, keys, entry = shard_of(copy)
    index[1][fmt.LABEL_EXT] = index[2][fmt.LABEL_EXT]        # same size (4 bytes), same extension, sample 2's
    assert integrity.shard_problems(tar, index, entry) == []        # each offset is some member's: the shard holds
    fd = os.open(tar, os.O_RDONLY)
    try:
        headers = integrity.read_headers(fd, index[1])
    finally:
        os.close(fd)
    (p,) = integrity.sample_member_problems(index[1], headers, keys[1])            # with the index's key
    assert (p.kind, p.ext, p.found[0]) == ("member", fmt.LABEL_EXT, f"{keys[2]}.{fmt.LABEL_EXT}")
    (p,) = integrity.sample_member_problems(index[1], headers)                     # without: the members disagree
    assert p.kind == "keys" and p.found == sorted({keys[1], keys[2]})


def test_the_manifest_disagreeing_with_a_shard(copy):
    tar, index, keys, entry = shard_of(copy)
    assert kinds(integrity.manifest_problems(tar, {**entry, "samples": entry["samples"] + 1}, index)) == \
        [("count", None, "")]
    assert kinds(integrity.manifest_problems(tar, {**entry, "bytes": entry["bytes"] - 512}, index)) == \
        [("bytes", None, "")]
    assert integrity.manifest_problems(tar, {**entry, "sha256": "0" * 64}, index) == []       # not asked to read it
    assert kinds(integrity.manifest_problems(tar, {**entry, "sha256": "0" * 64}, index, checksum=True)) == \
        [("sha256", None, "")]
    lacking = [dict(c) for c in index]
    del lacking[2][fmt.META_EXT]
    found = integrity.index_problems(lacking, tar.stat().st_size)
    assert kinds(found) == [("lacking", 2, "")] and found[0].expected == [fmt.META_EXT]
    assert integrity.index_problems(lacking, tar.stat().st_size, need=(fmt.VIDEO_EXT, fmt.LABEL_EXT)) == []


def test_a_sample_against_its_record(shards):
    tar, index, keys, entry = shard_of(shards)
    fd = os.open(tar, os.O_RDONLY)
    try:
        parts = integrity.read_parts(fd, index[0])
    finally:
        os.close(fd)
    manifest = fmt.load_manifest(shards)
    record = next(r for r in manifest["samples"] if r["key"] == keys[0])
    classes = len(manifest["classes"])
    assert integrity.sample_problems(parts, record, classes) == []
    # the manifest's record says other frames: exactly that, with both numbers
    (p,) = integrity.sample_problems(parts, {**record, "frames": record["frames"] + 1}, classes)
    assert (p.kind, p.ext, p.found, p.expected) == ("record", fmt.FRAMES_EXT, record["frames"], record["frames"] + 1)
    # nf rewritten: the manifest, the json and the stream's length all disagree with it
    wrong = {**parts, fmt.FRAMES_EXT: fmt.pack_int32(0)}
    assert kinds(integrity.sample_problems(wrong, record, classes)) == [
        ("record", None, fmt.FRAMES_EXT), ("json", None, fmt.FRAMES_EXT), ("frames", None, fmt.FRAMES_EXT)]
    # a label outside the classes, the json and manifest rewritten along (a sharded label the classes lost)
    label = fmt.pack_int32(classes)
    meta = parts[fmt.META_EXT].replace(f'"label": {record["label"]}'.encode(), f'"label": {classes}'.encode())
    assert meta != parts[fmt.META_EXT]
    (p,) = integrity.sample_problems({**parts, fmt.LABEL_EXT: label, fmt.META_EXT: meta},
                                     {**record, "label": classes}, classes)
    assert (p.kind, p.found, p.expected) == ("label", classes, classes)
    # lbl cut to 3 bytes: unreadable, and nothing compared against it
    (p,) = integrity.sample_problems({**parts, fmt.LABEL_EXT: parts[fmt.LABEL_EXT][:3]}, record, classes)
    assert (p.kind, p.ext) == ("unreadable", fmt.LABEL_EXT) and "4 bytes" in p.expected
    # a json that does not parse: named, and the rest still compared (no CRC without the record that holds it)
    (p,) = integrity.sample_problems({**parts, fmt.META_EXT: b"{not json"}, record, classes)
    assert (p.kind, p.ext) == ("unreadable", fmt.META_EXT)
    # none of it raises on bytes of any kind
    assert integrity.sample_problems({fmt.META_EXT: b"[1]"}) != []


def test_the_codec_text_comes_from_the_codec_table():
    assert fmt.cpu_decodable_text() == "VP9, VP8 and MJPEG"
    labels = [c.label for c in fmt.CODECS if c.cpu]
    assert all(label in fmt.cpu_decodable_text() for label in labels)
    assert not any(c.label in fmt.cpu_decodable_text() for c in fmt.CODECS if not c.cpu)
