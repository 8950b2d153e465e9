"""The input layouts: each official annotation format read from a small replica of its real layout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from preprocess import shard_format as fmt
from preprocess.cli import main as preprocess_main
from preprocess.sources import LayoutError, read_dataset


def touch(root: Path, *rels: str) -> None:
    for rel in rels:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_hmdb51_split_files(tmp_path):
    touch(tmp_path, "brush_hair/a.avi", "brush_hair/b.avi", "brush_hair/c.avi", "cartwheel/d.avi")
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    # 1 = train, 2 = test, 0 = unused; lines end in a space in the official files
    (splits / "brush_hair_test_split1.txt").write_text("a.avi 1 \nb.avi 2 \nc.avi 0 \n")
    (splits / "cartwheel_test_split1.txt").write_text("d.avi 1 \ngone.avi 2 \n")
    (splits / "brush_hair_test_split2.txt").write_text("a.avi 2 \nb.avi 1 \nc.avi 1 \n")
    (splits / "cartwheel_test_split2.txt").write_text("d.avi 2 \n")
    ds = read_dataset("hmdb51", tmp_path)
    assert ds.classes == ["brush_hair", "cartwheel"]
    assert {(v.source, v.split, v.label) for v in ds.videos} == {
        ("brush_hair/a.avi", "train", 0), ("brush_hair/b.avi", "test", 0), ("cartwheel/d.avi", "train", 1)}
    assert ds.missing == [("cartwheel/gone.avi", "listed in annotations but not found")]
    ds2 = read_dataset("hmdb51", tmp_path, split=2)
    assert {(v.source, v.split) for v in ds2.videos} == {
        ("brush_hair/a.avi", "test"), ("brush_hair/b.avi", "train"), ("brush_hair/c.avi", "train"),
        ("cartwheel/d.avi", "test")}


def test_ucf101_split_files_with_annotations_elsewhere(tmp_path):
    src, ann = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    touch(src, "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Archery/v_Archery_g01_c01.avi")
    ann.mkdir()
    (ann / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (ann / "trainlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\n")
    (ann / "testlist01.txt").write_text("Archery/v_Archery_g01_c01.avi\n")
    ds = read_dataset("ucf101", src, ann)
    assert [(v.split, v.label) for v in ds.videos] == [("train", 0), ("test", 1)]
    with pytest.raises(LayoutError, match="testlist02"):
        (ann / "trainlist02.txt").write_text("")
        read_dataset("ucf101", src, ann, split=2)


def test_kinetics_csv_flat_or_class_folders_and_missing_videos(tmp_path):
    touch(tmp_path, "train/abseiling/AAAAAAAAAAA_000010_000020.mp4", "train/BBBBBBBBB-b_000000_000010.mp4",
          "val/CCCCCCCCCCC_000005_000015.mp4")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\n"
        "abseiling,AAAAAAAAAAA,10,20,train\n\"air drumming\",BBBBBBBBB-b,0,10,train\n"
        "abseiling,DDDDDDDDDDD,3,13,train\n")
    (tmp_path / "annotations" / "validate.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nair drumming,CCCCCCCCCCC,5,15,val\n")
    ds = read_dataset("kinetics", tmp_path)
    assert ds.classes == ["abseiling", "air drumming"]
    got = {(Path(v.source).name, v.split, v.label) for v in ds.videos}
    assert got == {("AAAAAAAAAAA_000010_000020.mp4", "train", 0), ("BBBBBBBBB-b_000000_000010.mp4", "train", 1),
                   ("CCCCCCCCCCC_000005_000015.mp4", "val", 1)}
    assert ds.missing == [("train/DDDDDDDDDDD_000003_000013", "in the CSV but not downloaded")]


def test_diving48_json(tmp_path):
    touch(tmp_path, "rgb/-mmq0PT-u8k_00155.mp4", "rgb/xyz_00001.mp4")
    (tmp_path / "Diving48_vocab.json").write_text(json.dumps([["Back", "15som", "05Twis", "FREE"], ["Inward", "25som", "NoTwis", "PIKE"]]))
    (tmp_path / "Diving48_V2_train.json").write_text(json.dumps(
        [{"vid_name": "-mmq0PT-u8k_00155", "label": 1, "start_frame": 0, "end_frame": 60}]))
    (tmp_path / "Diving48_V2_test.json").write_text(json.dumps(
        [{"vid_name": "xyz_00001", "label": 0, "start_frame": 0, "end_frame": 40},
         {"vid_name": "gone", "label": 0, "start_frame": 0, "end_frame": 40}]))
    ds = read_dataset("diving48", tmp_path)
    assert ds.classes == ["Back-15som-05Twis-FREE", "Inward-25som-NoTwis-PIKE"]
    assert [(v.source, v.split, v.label) for v in ds.videos] == [
        ("rgb/-mmq0PT-u8k_00155.mp4", "train", 1), ("rgb/xyz_00001.mp4", "test", 0)]
    assert ds.videos[0].extra == {"start_frame": 0, "end_frame": 60}
    assert len(ds.missing) == 1


def test_list_files_with_names_numbers_and_spaces(tmp_path):
    touch(tmp_path, "a/one.mp4", "a/two words.mp4", "b/three.mp4", "nolabel.mp4")
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("a/one.mp4 jump\na/two words.mp4,walk\n# comment\n\n")
    (lists / "test.txt").write_text("b/three.mp4 jump\nmissing.mp4 walk\n")
    ds = read_dataset("list", tmp_path, lists)
    assert ds.classes == ["jump", "walk"]
    assert {(v.source, v.split, v.label) for v in ds.videos} == {
        ("a/one.mp4", "train", 0), ("a/two words.mp4", "train", 1), ("b/three.mp4", "test", 0)}
    assert ds.missing[0][0] == "missing.mp4"
    (tmp_path / "unlabelled.txt").write_text("nolabel.mp4\na/two words.mp4\n")
    ds = read_dataset("list", tmp_path, tmp_path / "unlabelled.txt")
    assert [(v.source, v.label) for v in ds.videos] == [("nolabel.mp4", -1), ("a/two words.mp4", -1)]


def test_unlabelled_list_end_to_end(tmp_path, sample_videos):
    src = tmp_path / "src"
    src.mkdir()
    for c in ("up", "down"):
        shutil.copy(sample_videos / "train" / c / f"{c}_000.mp4", src / f"{c}.mp4")
    (tmp_path / "all.txt").write_text("up.mp4\ndown.mp4\n")
    out = tmp_path / "out"
    assert preprocess_main([str(src), str(out), "--format", "list", "--annotations", str(tmp_path / "all.txt"),
                            "--no-progress", "--codec", "h264", "--size", "160x128"]) == 0
    m = fmt.load_manifest(out / "train")
    assert m["num_samples"] == 2 and not m["labelled"] and all(s["label"] == -1 for s in m["samples"])
    assert m["encoding"]["codec"] == "h264" and m["encoding"]["size"] == [160, 128]
    import io

    import av
    tar = fmt.shard_paths(out / "train")[0]
    off, size = fmt.read_index(fmt.index_path(tar))[0]["mp4"]
    with av.open(io.BytesIO(tar.read_bytes()[off:off + size])) as c:
        s = c.streams.video[0]
        assert (s.codec_context.name, s.codec_context.width, s.codec_context.height) == ("h264", 160, 128)
