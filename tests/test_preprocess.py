"""The sharding command on real videos: real ffmpeg, real tars, read back by PyAV, DALI and webdataset."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import av
import numpy as np
import pytest

from preprocess import shard_format as fmt
from preprocess.cli import main as preprocess_main
from preprocess.sample_videos import encode, render

REPO = Path(__file__).resolve().parents[1]


def decoded_frames(data_or_path) -> list[np.ndarray]:
    src = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else str(data_or_path)
    with av.open(src) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def source_frame_slots(path) -> int:
    """Frames on the source's timeline: the span of its decoded timestamps in frame periods, plus one.
    (Old XviD AVIs skip coding some frames, e.g. 101 decoded frames over 104 slots; a constant-rate
    transcode fills those slots, so the slot count is the fair comparison.)"""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        pts = [f.pts for f in c.decode(s)]
        return round((max(pts) - min(pts)) * s.time_base * s.average_rate) + 1


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, ext = m.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def all_samples(split_dir: Path) -> dict[str, dict[str, bytes]]:
    out = {}
    for t in fmt.shard_paths(split_dir):
        out.update(read_tar(t))
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- UCF101 mini, official split files -------------------------------------------------------------------------

def test_ucf101_split_counts_labels_sizes_and_frames(ucf_shards, ucf_mini):
    top = json.loads((ucf_shards / "manifest.json").read_text())
    assert top["splits"]["train"]["samples"] == 72 and top["splits"]["test"]["samples"] == 36
    classes = [line.split()[1] for line in (ucf_mini / "classInd.txt").read_text().split("\n") if line.strip()]
    assert top["classes"] == classes
    for split in ("train", "test"):
        m = fmt.load_manifest(ucf_shards / split)
        samples = all_samples(ucf_shards / split)
        assert len(samples) == m["num_samples"] == sum(s["samples"] for s in m["shards"])
        by_key = {s["key"]: s for s in m["samples"]}
        for key, s in samples.items():
            assert "." not in key
            meta = json.loads(s["json"])
            label = fmt.unpack_int32(s["lbl"])
            nf = fmt.unpack_int32(s["nf"])
            assert label == classes.index(meta["source"].split("/")[0]) == by_key[key]["label"]
            assert meta["label_name"] == classes[label]
            frames = decoded_frames(s["mp4"])
            assert len(frames) == nf == meta["frames"]
            h, w = frames[0].shape[:2]
            assert min(h, w) == 256 and h % 16 == 0 and w % 16 == 0 and (h, w) == (meta["height"], meta["width"])
            src_frames = source_frame_slots(ucf_mini / meta["source"])
            assert abs(nf - src_frames) <= 1, (meta["source"], nf, src_frames)
        # every shard mixes classes (the deterministic shuffle spreads them)
        for t in fmt.shard_paths(ucf_shards / split):
            labels = {fmt.unpack_int32(s["lbl"]) for s in read_tar(t).values()}
            assert len(labels) >= 3


def test_ucf101_shards_decode_in_a_dali_cpu_pipeline(ucf_shards):
    from nvidia.dali import fn, pipeline_def, types

    for split in ("test", "train"):
        tars = [str(p) for p in fmt.shard_paths(ucf_shards / split)]
        n = fmt.load_manifest(ucf_shards / split)["num_samples"]
        full = split == "test"   # decode every frame of the test set; the last frame of each train video

        @pipeline_def(batch_size=6, num_threads=2, device_id=None)
        def pipe():
            video, label, nf = fn.readers.webdataset(
                paths=tars, index_paths=[str(fmt.index_path(t)) for t in tars], ext=["mp4", "lbl", "nf"],
                dtypes=[types.UINT8, types.INT32, types.INT32], name="reader")
            if full:
                frames = fn.decoders.video(video, device="cpu")
            else:
                frames = fn.decoders.video(video, device="cpu", start_frame=fn.reshape(nf - 1, shape=[]),
                                           sequence_length=1, pad_mode="none")
            return frames, label, nf

        p = pipe()
        p.build()
        seen = 0
        while seen < n:
            frames, labels, nfs = p.run()
            for i in range(len(frames)):
                if seen + i >= n:
                    break
                x, nf = np.asarray(frames.at(i)), int(np.asarray(nfs.at(i))[0])
                assert x.dtype == np.uint8 and min(x.shape[1:3]) == 256
                assert x.shape[0] == (nf if full else 1)
                assert x.mean() > 5   # a real picture, not padding
                assert 0 <= int(np.asarray(labels.at(i))[0]) < 9
            seen += len(frames)


def test_shards_read_by_the_plain_webdataset_library(ucf_shards):
    import webdataset as wds

    for split, n in (("train", 72), ("test", 36)):
        urls = [str(p) for p in fmt.shard_paths(ucf_shards / split)]
        ds = wds.WebDataset(urls, shardshuffle=False).decode()
        seen = []
        for s in ds:
            assert set(s) >= {"__key__", "mp4", "lbl", "nf", "json"}
            meta = s["json"]            # decoded by webdataset's own json handler
            assert fmt.unpack_int32(s["lbl"]) == meta["label"]
            assert fmt.unpack_int32(s["nf"]) == meta["frames"]
            seen.append(s["__key__"])
        assert len(seen) == len(set(seen)) == n


def test_dali_index_points_at_the_tar_members(synthetic_shards):
    for tar_path in fmt.shard_paths(synthetic_shards / "train"):
        index = fmt.read_index(fmt.index_path(tar_path))
        raw = tar_path.read_bytes()
        members = read_tar(tar_path)
        assert len(index) == len(members)
        for entry in index:
            off, size = entry["mp4"]
            key = next(k for k, s in members.items() if s["mp4"] == raw[off:off + size])
            for ext, (o, n) in entry.items():
                assert raw[o:o + n] == members[key][ext]


# --- Bad and odd inputs ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def messy_source(tmp_path_factory, sample_videos) -> Path:
    src = tmp_path_factory.mktemp("messy")
    good = sample_videos / "train" / "right" / "right_000.mp4"
    a, b = src / "walk", src / "run"
    a.mkdir(), b.mkdir()
    shutil.copy(good, a / "ok.mp4")
    shutil.copy(good, b / "ok.mp4")                                     # same file name in two class folders
    shutil.copy(sample_videos / "train" / "left" / "left_000.mp4", a / "clip.v2.final.mp4")   # dots in the name
    weird = "a b 'single' \"double\" ünïcødé 走.mp4"
    shutil.copy(good, b / weird)
    (a / "empty.mp4").write_bytes(b"")
    (a / "notes.mp4").write_text("this is a text file, not a video\n")
    data = good.read_bytes()
    (b / "truncated.mp4").write_bytes(data[: len(data) // 2])
    encode(render("up", 1, 2, 3, 64, 96), b / "three_frames.mp4")
    return src


def test_bad_inputs_are_listed_and_good_ones_sharded(messy_source, tmp_path):
    out = tmp_path / "out"
    rc = preprocess_main([str(messy_source), str(out), "--no-progress", "--keep-work"])
    assert rc == 0
    m = fmt.load_manifest(out / "train")
    sources = sorted(s["source"] for s in m["samples"])
    assert sources == sorted(["run/ok.mp4", "walk/ok.mp4", "walk/clip.v2.final.mp4",
                              "run/a b 'single' \"double\" ünïcødé 走.mp4"])
    keys = [s["key"] for s in m["samples"]]
    assert len(set(keys)) == 4 and not any("." in k for k in keys)
    assert m["classes"] == ["run", "walk"]
    errors = {e["source"]: e["reason"] for e in map(json.loads, (out / "errors.jsonl").read_text().splitlines())}
    assert set(errors) == {"walk/empty.mp4", "walk/notes.mp4", "run/truncated.mp4", "run/three_frames.mp4"}
    assert "empty" in errors["walk/empty.mp4"]
    assert "not a readable video" in errors["walk/notes.mp4"]
    assert "truncated" in errors["run/truncated.mp4"] or "not a readable video" in errors["run/truncated.mp4"]
    assert "too short" in errors["run/three_frames.mp4"]
    # nothing half-written anywhere: no temp files, every tar complete and readable
    assert not [p for p in out.rglob("*") if "tmp" in p.name]
    assert len(all_samples(out / "train")) == 4
    # --strict turns skipped inputs into a failure, with the same outputs
    assert preprocess_main([str(messy_source), str(out), "--no-progress", "--strict"]) == 1


def test_nothing_usable_exits_non_zero(tmp_path):
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    (src / "x.mp4").write_bytes(b"")
    assert preprocess_main([str(tmp_path / "src"), str(tmp_path / "out"), "--no-progress"]) == 1
    assert "empty" in (tmp_path / "out" / "errors.jsonl").read_text()


def test_rotated_and_portrait_videos_come_out_upright_with_short_side_256(tmp_path):
    from preprocess.video import ffmpeg_exe
    src = tmp_path / "src" / "cls"
    src.mkdir(parents=True)
    frames = render("right", 3, 4, 24, 240, 320)
    frames[:, :40, :, :] = [255, 0, 0]          # a red band at the top marks "up"
    encode(frames, tmp_path / "landscape.mp4")
    # the same pixels stored with a 90-degree display rotation: players show it portrait (240 wide, 320 high)
    subprocess.run([ffmpeg_exe(), "-v", "error", "-display_rotation", "90", "-i", str(tmp_path / "landscape.mp4"),
                    "-c", "copy", str(src / "rotated.mp4")], check=True)
    encode(np.ascontiguousarray(frames[:, :, :200]), src / "portrait_odd.mp4")   # 200x240, then cropped odd below
    encode(np.ascontiguousarray(frames[:, :237, :201]), src / "odd.mp4", pix_fmt="yuv444p")   # odd size, 4:4:4
    out = tmp_path / "out"
    assert preprocess_main([str(tmp_path / "src"), str(out), "--no-progress"]) == 0
    samples = {json.loads(s["json"])["source"]: s for s in all_samples(out / "train").values()}
    rot = decoded_frames(samples["cls/rotated.mp4"]["mp4"])[0]
    assert rot.shape[:2] == (336, 256)          # displayed portrait: width 240 -> 256, height 320 -> 341.3 -> 336 (x16)
    # rotation 90 is counter-clockwise (ffmpeg's -display_rotation): the top band is on the left edge, as
    # np.rot90 (counter-clockwise) puts it; rotating the other way would put it on the right
    red = (rot[..., 0] > 180) & (rot[..., 1] < 80)
    want = np.rot90(frames[0], k=1)
    assert (want[:, :40] == [255, 0, 0]).all() and not (want[:, -40:] == [255, 0, 0]).all(axis=-1).any()
    assert red[:, :20].mean() > 0.8 and red[:, -40:].mean() < 0.05
    assert red[:20, 60:200].mean() < 0.2
    for name in ("cls/portrait_odd.mp4", "cls/odd.mp4"):
        h, w = decoded_frames(samples[name]["mp4"])[0].shape[:2]
        assert min(h, w) == 256 and h % 16 == 0 and w % 16 == 0


# --- Determinism, resume, array jobs ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, sample_videos) -> Path:
    out = tmp_path_factory.mktemp("reference") / "out"
    assert preprocess_main([str(sample_videos), str(out), "--name", "s", "--max-per-shard", "5", "--no-progress"]) == 0
    return out


def test_killed_run_resumes_to_byte_identical_output(sample_videos, reference_run, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "preprocess", str(sample_videos), str(out), "--name", "s", "--max-per-shard", "5",
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / ".work").glob("*.json"))) < 6:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / ".work").glob("*.json"))) - 1         # minus settings.json
    assert 0 < done < 36, "the kill should land mid-run"
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.tar"))
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert tree_bytes(out) == tree_bytes(reference_run)
    # a third run finds everything done and changes nothing
    assert subprocess.run(cmd, cwd=REPO, capture_output=True).returncode == 0
    assert tree_bytes(out) == tree_bytes(reference_run)


def test_array_jobs_then_merge_equal_a_single_run(sample_videos, reference_run, tmp_path):
    out = tmp_path / "out"
    base = [str(sample_videos), str(out), "--name", "s", "--max-per-shard", "5", "--no-progress"]
    assert preprocess_main(base + ["--num-jobs", "3", "--job-index", "0"]) == 0
    assert not (out / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "preprocess", *base, "--merge"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "not transcoded yet" in r.stderr
    assert preprocess_main(base + ["--num-jobs", "3", "--job-index", "1"]) == 0
    assert preprocess_main(base + ["--num-jobs", "3", "--job-index", "2"]) == 0
    assert preprocess_main(base + ["--merge"]) == 0
    assert tree_bytes(out) == tree_bytes(reference_run)


def test_reference_run_layout(reference_run):
    top = json.loads((reference_run / "manifest.json").read_text())
    assert set(top["splits"]) == {"train", "test"}
    assert top["splits"]["train"]["samples"] == 24 and top["splits"]["test"]["samples"] == 12
    m = fmt.load_manifest(reference_run / "train")
    assert [s["samples"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    assert m["encoding"]["codec"] == "vp9" and m["encoding"]["gop"] == 16
    assert not (reference_run / ".work").exists()        # removed after packing unless --keep-work


# --- Errors a user can make ------------------------------------------------------------------------------------

def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "preprocess", *map(str, args)], cwd=REPO, capture_output=True, text=True)


def test_cli_errors_are_clear(tmp_path, sample_videos):
    r = run_cli(tmp_path / "nope", tmp_path / "out")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = run_cli(sample_videos, tmp_path / "out", "--format", "ucf101")
    assert r.returncode == 2 and "classInd.txt" in r.stderr and "--annotations" in r.stderr
    r = run_cli(sample_videos, tmp_path / "out", "--format", "nonsense")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = run_cli(sample_videos, tmp_path / "out", "--size", "321x240")
    assert r.returncode == 2 and "even" in r.stderr
    # an OUT folder started with other settings is not silently mixed
    (tmp_path / "out2" / ".work").mkdir(parents=True)
    (tmp_path / "out2" / ".work" / "settings.json").write_text('{"encoding": {"codec": "h264"}}')
    r = run_cli(sample_videos, tmp_path / "out2")
    assert r.returncode == 2 and "other settings" in r.stderr


def test_help_explains_every_flag():
    r = run_cli("--help")
    assert r.returncode == 0
    for flag in ("--format", "--split", "--annotations", "--name", "--codec", "--short-side", "--size", "--gop",
                 "--crf", "--min-frames", "--timeout", "--shard-size-mb", "--max-per-shard", "--seed", "--workers",
                 "--threads-per-video", "--num-jobs", "--job-index", "--merge", "--retry-errors", "--keep-work",
                 "--strict", "--no-progress"):
        assert flag in r.stdout
    assert r.stdout.count("(default:") >= 15


def test_shard_loading_errors_name_the_folder(tmp_path, reference_run):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fmt.load_manifest(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no shards"):
        fmt.load_manifest(tmp_path / "empty")
    broken = tmp_path / "broken"
    shutil.copytree(reference_run / "train", broken)
    next(broken.glob("*.idx")).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        fmt.shard_paths(broken)


def test_sample_motions_speed_up_so_the_set_has_an_arrow_of_time():
    """Played backwards, every sample video would slow down: forward and reversed clips differ as a set."""
    from preprocess.sample_videos import CLASSES, trajectory
    for motion in CLASSES:
        path = trajectory(motion, np.random.default_rng(3), 64, 240, 320, 30)
        assert path.min() >= 0 and path[:, 0].max() <= 240 - 30 and path[:, 1].max() <= 320 - 30
        if motion in ("clockwise", "counterclockwise"):
            centre = path.mean(0)
            angle = np.unwrap(np.arctan2(*(path - centre).T))
            step = np.abs(np.diff(angle))
        else:
            step = np.linalg.norm(np.diff(path, axis=0), axis=1)
        first, last = step[:20].mean(), step[-20:].mean()
        assert last > 1.5 * first, (motion, first, last)


def test_sample_classes_of_one_video_share_scene_and_path_and_differ_in_direction(tmp_path):
    """Video i of every class: the same scene, and the same segment (or circle) traversed the other way, so where
    things move says nothing about the class; --scenes N reuses scene i mod N."""
    from preprocess.sample_videos import trajectory
    for a, b in (("right", "left"), ("up", "down")):
        pa, pb = (trajectory(m, np.random.default_rng(7), 64, 240, 320, 30) for m in (a, b))
        assert np.allclose(pa.min(0), pb.min(0)) and np.allclose(pa.max(0), pb.max(0))   # the same segment...
        assert np.allclose(pa[0], pb[-1]) and np.allclose(pa[-1], pb[0])                  # ...the other way
    cw, ccw = (trajectory(m, np.random.default_rng(7), 64, 240, 320, 30) for m in ("clockwise", "counterclockwise"))
    chord = [np.linalg.norm(p - p[0], axis=1) for p in (cw, ccw)]   # equal chords from one start: one circle,
    assert np.allclose(cw[0], ccw[0]) and np.allclose(*chord) and not np.allclose(cw, ccw)   # mirrored turns

    import av
    from preprocess.sample_videos import make_sample_videos
    make_sample_videos(tmp_path, ("right", "left"), train_per_class=3, test_per_class=0, frames=16, scenes=2,
                       progress=False)

    def first_frame(name):
        with av.open(str(tmp_path / "train" / name.split("_")[0] / f"{name}.mp4")) as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24").astype(int)

    def differ(x, y):   # median over pixels: the objects (a few % of the frame) do not count
        return np.median(np.abs(first_frame(x) - first_frame(y)))
    same_scene, other_scene = differ("right_000", "right_002"), differ("right_000", "right_001")  # scenes 0/0, 0/1
    same_video = differ("right_001", "left_001")                   # one scene, objects at the two ends of one path
    assert same_scene <= 3 and same_video <= 3 and other_scene > 20, (same_scene, same_video, other_scene)
    # object sizes scale with the frame, so small sets (tests, the Docker check) have every class; too small is refused
    assert len(make_sample_videos(tmp_path / "small", train_per_class=2, test_per_class=0, frames=8, height=40,
                                  width=64, progress=False)) == 12
    with pytest.raises(ValueError, match="at least 40 px"):
        make_sample_videos(tmp_path / "tiny", frames=8, height=39, width=64, progress=False)


def _block_shift(a: np.ndarray, b: np.ndarray, rows: slice, cols: slice, reach: int = 10) -> tuple[int, int]:
    """(dy, dx) by which the block a[rows, cols] of grey frame a moved to in frame b: exhaustive block matching."""
    block = a[rows, cols]
    err = {(dy, dx): np.abs(b[rows.start + dy: rows.stop + dy, cols.start + dx: cols.stop + dx] - block).mean()
           for dy in range(-reach, reach + 1) for dx in range(-reach, reach + 1)}
    return min(err, key=err.get)


@pytest.mark.parametrize("kind", ["camera", "drift"])
def test_camera_sample_moves_the_whole_picture_in_the_class_direction_and_speeds_up(tmp_path, kind):
    """The camera kind (and the drift kind: the same motion over a scene that changes), decoded with PyAV and measured
    by block matching (independent of the renderer): pans shift the whole frame the class's way, rolls move the right
    half down (clockwise) or up, and later frames move further per frame than early ones (the arrow of time)."""
    from preprocess.sample_videos import CLASSES, make_sample_videos
    make_sample_videos(tmp_path, CLASSES, train_per_class=1, test_per_class=0, frames=32, height=96, width=128,
                       progress=False, kind=kind)
    expect = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}
    for c in CLASSES:
        with av.open(str(tmp_path / "train" / c / f"{c}_000.mp4")) as f:
            grey = [fr.to_ndarray(format="gray").astype(float) for fr in f.decode(video=0)]
        assert len(grey) == 32
        if kind == "drift":   # the camera kind's motion under a cross-fading scene: the pans' sign along their axis
            if c in expect:   # (block matching on a fading texture is too noisy for the finer checks below)
                axis = 0 if expect[c][0] else 1
                total = sum(_block_shift(grey[t], grey[t + 2], slice(28, 68), slice(34, 94))[axis] for t in (20, 24, 28))
                assert expect[c][axis] * total > 3, (c, total)
            continue
        if c in expect:
            centre = (slice(28, 68), slice(34, 94))
            early, late = _block_shift(grey[4], grey[8], *centre), _block_shift(grey[26], grey[30], *centre)
            axis = 0 if expect[c][0] else 1
            sign = expect[c][axis]
            assert sign * late[axis] > 2 and abs(late[1 - axis]) <= 1, (c, early, late)
            assert sign * late[axis] > sign * early[axis], (c, early, late)   # it speeds up
        else:
            rows = slice(28, 68)       # strips at the right and left edges, level with the centre
            right = _block_shift(grey[28], grey[30], rows, slice(104, 116))
            left = _block_shift(grey[28], grey[30], rows, slice(12, 24))
            sign = 1 if c == "clockwise" else -1      # clockwise on screen: the right side moves down
            assert sign * right[0] > 2 and sign * left[0] < -2 and abs(right[1]) <= 2, (c, right, left)
    with pytest.raises(ValueError, match="sample kind 'pan'"):
        make_sample_videos(tmp_path / "bad", kind="pan", progress=False)
