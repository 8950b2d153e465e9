"""`python -m train doctor` for real: real shards, the real DALI CPU pipeline, real training steps, torchrun.

Each fault is made the way it happens: an index whose offset no longer points at its member, a tar
missing from a copied shard folder, H.264 shards made by `python -m preprocess --codec h264`, a memory
budget smaller than the configured batch needs, a typo in a config key.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch

from train.doctor import CHECKS, GROUPS, build_parser, main, select

REPO = Path(__file__).resolve().parents[1]
# small but real: FIMA on I3D at 16x48x48, fp32 on the CPU (the trainer tests' size)
TINY = ["backend=cpu", "objective=fima", "backbone=i3d", "frames=16", "crop=48", "batch_size=4", "num_threads=1",
        "precision=fp32", "channels_last=false", "queue_size=64"]
GPU_CHECKS = ("env.driver", "env.gpus", "decode.gpu", "decode.match")
# one OpenMP thread: on a busy 2-core box two threads spin against each other (measured 4-10x slower)
ENV1 = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def doctor(*args: str) -> tuple[int, str, str, dict | None]:
    """Run the doctor in this process: (exit code, stdout, stderr, the JSON line parsed)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(list(args))
    lines = out.getvalue().strip().splitlines()
    report = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    return rc, out.getvalue(), err.getvalue(), report


def checks(report: dict) -> dict:
    return report["checks"]


@pytest.fixture(scope="module")
def data(synthetic_shards) -> Path:
    return synthetic_shards / "train"


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """Every check once, on the synthetic shards with the tiny config."""
    tmp = tmp_path_factory.mktemp("doctor")
    rc, out, err, report = doctor("--config", "demo", f"data={data}", *TINY, f"out_dir={tmp / 'run'}",
                                  "--json", str(tmp / "report.json"))
    return rc, out, err, report, tmp / "report.json"


def test_all_cpu_checks_pass_gpu_checks_skip_and_the_json_holds_measurements(full_run):
    rc, out, err, report, path = full_run
    assert rc == 0, out[-4000:] + err[-4000:]
    assert report == json.loads(path.read_text())
    assert report["ok"] and report["exit_code"] == 0 and list(checks(report)) == list(CHECKS)
    m = {k: c["measured"] for k, c in checks(report).items()}
    # Speeds and free disk are this machine's, busy or not: those checks may WARN, but exactly when the rule says
    # (measured below what training needs; less than twice the disk a run needs). Everything else must PASS.
    machine = {"data.read": m["data.read"]["videos_per_s"] < m["data.read"]["need_videos_per_s"],
               "decode.cpu": m["decode.cpu"]["videos_per_s"] < m["decode.cpu"].get("need_videos_per_s", 0.0),
               "env.disk": m["env.disk"]["free_bytes"] < 2 * m["env.disk"]["need_bytes"]}
    for name, c in checks(report).items():
        if name in GPU_CHECKS:
            assert c["status"] == "SKIP" and c["fix"].startswith("no CUDA device"), (name, c)
        elif name == "dist.allreduce":
            assert c["status"] == "SKIP" and "torchrun" in c["fix"]
        elif name in machine:
            assert c["status"] == ("WARN" if machine[name] else "PASS"), (name, c)
        else:
            assert c["status"] == "PASS", (name, c)
    assert m["env.torch"]["version"] == torch.__version__
    assert m["env.dali"]["cuda_major"] == 13 and m["env.ffmpeg"]["encoder_libvpx-vp9"]
    assert m["env.disk"]["free_bytes"] > m["env.disk"]["checkpoint_bytes_estimate"] > 10 * 2 ** 20
    assert m["data.shards"]["samples"] == 24 and m["data.shards"]["shards"] == 3
    assert len(m["data.samples"]["keys"]) == 8 and all(m["data.samples"]["keys"])
    assert m["data.read"]["mb_per_s"] > 0 and m["data.read"]["videos_per_s"] > 0
    assert m["data.read"]["need_videos_per_s"] > 0 and "train.step" in m["data.read"]["need_basis"]
    assert m["decode.cache"]["one_size"] and m["decode.codec"]["fourccs"] == ["vp09"]
    assert m["decode.cache"]["cache_friendly"] and m["decode.cache"]["sizes"] == {"336x256": 8}   # 320x240 -> 16-aligned
    assert m["decode.cpu"]["videos"] == 8 and m["decode.cpu"]["videos_per_s"] > 0
    assert {"rgb_m", "diff_m1", "box_n"} <= set(m["decode.cpu"]["outputs"])
    step = m["train.step"]
    assert step["inputs"] == "decoded samples" and step["batch"] == 2 and step["time_s"] > 0
    assert step["peak_bytes"] > 0 and {"loss_inst", "loss_dense", "loss_local"} <= set(step["terms"])
    b = m["train.bf16"]      # recomputed from the two runs' loss terms, at the documented 5 % of max(1, |fp32|)
    assert "loss_inst" in b["compared"] and b["bf16_loss"] > 0 and b["fp32_loss"] > 0
    assert b["fp32_terms"]["loss"] == b["fp32_loss"] and b["bf16_terms"]["loss"] == b["bf16_loss"]
    for k in b["compared"]:
        f32, b16 = b["fp32_terms"][k], b["bf16_terms"][k]
        assert b["abs_diff"][k] == pytest.approx(abs(b16 - f32)) and abs(b16 - f32) <= 0.05 * max(1.0, abs(f32)), k
    batch = m["train.batch"]
    assert batch["per_sample_bytes"] > 0 and batch["largest_batch_estimate"] >= 4
    assert batch["limit_source"] == "available RAM"
    # the table: one row per check, with its status, before the JSON line
    lines = out.strip().splitlines()
    for name, c in checks(report).items():
        assert any(line.startswith(name) and c["status"] in line for line in lines), name
    warned = sum(machine.values())
    assert lines[-1].startswith("{") and f"{15 - warned} pass, {warned} warn, 0 fail, 5 skipped" in out


def test_broken_index_offset(data, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(data, bad)
    idx = sorted(bad.glob("*.idx"))[1]
    lines = idx.read_text().split("\n")
    fields = lines[4].split(" ")          # sample 3: "mp4 OFFSET SIZE NAME lbl ..."
    assert fields[0] == "mp4"
    fields[1] = str(int(fields[1]) + 1024)
    lines[4] = " ".join(fields)
    idx.write_text("\n".join(lines))
    rc, out, err, report = doctor("--config", "demo", f"data={bad}", *TINY, "--only", "data,decode.cpu")
    assert rc == 1, out
    assert checks(report)["decode.cpu"]["status"] == "SKIP" and "data.shards" in checks(report)["decode.cpu"]["fix"]
    c = checks(report)["data.shards"]
    assert c["status"] == "FAIL"
    tar = idx.with_suffix(".tar").name
    assert f"{tar} sample 3: the index's mp4 at offset {fields[1]} does not point at its tar member" in c["figure"]
    assert "re-run `python -m preprocess`" in c["fix"]
    assert report["failed"][0] == "data.shards" and "data.shards" in out and "FAIL" in out


def test_missing_shard(data, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(data, bad)
    gone = sorted(bad.glob("*.tar"))[2]
    gone.unlink()
    rc, out, err, report = doctor("--config", "demo", f"data={bad}", *TINY, "--only", "data,decode")
    assert rc == 1
    c = checks(report)["data.shards"]
    assert c["status"] == "FAIL" and c["figure"].startswith("1 of 3 shards listed in manifest.json missing")
    assert f"{gone} is listed in" in c["fix"] and "copy the whole shard folder" in c["fix"]
    for name in ("data.samples", "data.read", "decode.codec", "decode.cpu"):    # not run on a broken set
        assert checks(report)[name]["status"] == "SKIP" and "data.shards" in checks(report)[name]["fix"], name


def test_missing_shard_fails_a_decode_only_run_too(data, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(data, bad)
    sorted(bad.glob("*.tar"))[0].unlink()
    rc, out, err, report = doctor("--config", "demo", f"data={bad}", *TINY, "--only", "decode.cpu")
    assert rc == 1 and checks(report)["decode.cpu"]["status"] == "FAIL"
    assert "missing" in checks(report)["decode.cpu"]["fix"]


def test_h264_shards_on_the_cpu_backend(sample_videos, tmp_path):
    src = tmp_path / "src"
    for cls in ("left", "right"):
        (src / cls).mkdir(parents=True)
        shutil.copy(sorted((sample_videos / "train" / cls).glob("*.mp4"))[0], src / cls)
    p = subprocess.run([sys.executable, "-m", "preprocess", str(src), str(tmp_path / "out"), "--codec", "h264",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, env=ENV1, timeout=300)
    assert p.returncode == 0, p.stderr
    rc, out, err, report = doctor("--config", "demo", f"data={tmp_path / 'out' / 'train'}", *TINY, "--only", "data,decode")
    assert rc == 1
    c = checks(report)
    assert c["data.shards"]["status"] == c["data.samples"]["status"] == "PASS"     # the shards themselves are fine
    assert c["decode.codec"]["status"] == "FAIL" and "re-shard with --codec vp9" in c["decode.codec"]["fix"]
    assert "H.264" in c["decode.codec"]["figure"] and c["decode.codec"]["measured"]["fourccs"] == ["avc1"]
    assert c["decode.cpu"]["status"] == "FAIL" and "--codec vp9" in c["decode.cpu"]["fix"]
    # on a GPU node (backend=gpu) the same shards are fine for the run; here the GPU checks say why they cannot run
    rc, out, err, report = doctor("--config", "demo", f"data={tmp_path / 'out' / 'train'}", *TINY, "backend=gpu",
                                  "--only", "decode.codec,decode.gpu")
    assert checks(report)["decode.codec"]["status"] == "PASS"
    assert checks(report)["decode.gpu"]["status"] == "FAIL" and "backend=gpu needs a CUDA device" in \
        checks(report)["decode.gpu"]["fix"]


def test_new_shards_are_16_aligned_and_old_unaligned_ones_are_reported_with_the_fix(sample_videos, tmp_path):
    """Default --align 16: 320x240 sources at short side 128 become 176x128 (not 170x128), which the doctor calls
    cache-friendly; shards made the old way (--align 2: sides only even) are reported with the re-shard command."""
    src = tmp_path / "src"
    for cls in ("left", "right"):
        (src / cls).mkdir(parents=True)
        shutil.copy(sorted((sample_videos / "train" / cls).glob("*.mp4"))[0], src / cls)
    sizes = {}
    for name, extra in (("new", []), ("old", ["--align", "2"])):
        p = subprocess.run([sys.executable, "-m", "preprocess", str(src), str(tmp_path / name), "--short-side", "128",
                            "--no-progress", *extra], cwd=REPO, capture_output=True, text=True, env=ENV1, timeout=300)
        assert p.returncode == 0, p.stderr
        m = json.loads((tmp_path / name / "train" / "manifest.json").read_text())
        sizes[name] = m["frame_sizes"]
        rc, out, err, report = doctor("--config", "demo", f"data={tmp_path / name / 'train'}", *TINY, "backend=cpu",
                                      "--only", "decode.cache", "--samples", "2")
        c = checks(report)["decode.cache"]
        assert c["status"] == "PASS", c            # on the CPU backend the cache does not matter: PASS with the note
        if name == "new":
            assert c["measured"]["cache_friendly"] and "16-aligned" in c["figure"] and not c["fix"]
            assert m["encoding"]["align"] == 16
        else:
            assert not c["measured"]["cache_friendly"] and c["measured"]["unaligned"] == ["170x128"]
            assert "not a multiple of 16" in c["fix"] and "--short-side 128" in c["fix"]
            assert "align" not in m["encoding"]    # the old manifests' encoding record, unchanged
    assert sizes == {"new": {"176x128": 2}, "old": {"170x128": 2}}
    p = subprocess.run([sys.executable, "-m", "preprocess", str(src), str(tmp_path / "bad"), "--short-side", "100",
                        "--no-progress"], cwd=REPO, capture_output=True, text=True, env=ENV1, timeout=300)
    assert p.returncode != 0 and "--short-side 100 is not a multiple of --align 16" in p.stderr and "96 or 112" in p.stderr


def test_a_config_that_does_not_fit_the_memory_limit(full_run, data):
    fit = full_run[3]["checks"]["train.batch"]["measured"]
    limit = (fit["fixed_bytes"] + 2.5 * fit["per_sample_bytes"]) / 2 ** 30     # room for 2 videos, not 4
    # (decode.cpu too: the same decoded clips as the full run, so the same measured figures)
    rc, out, err, report = doctor("--config", "demo", f"data={data}", *TINY, "--only", "decode.cpu,train.batch",
                                  "--memory-limit-gib", f"{limit:.6f}")
    assert rc == 1, out
    c = checks(report)["train.batch"]
    assert c["status"] == "FAIL" and c["measured"]["largest_batch_estimate"] == 2
    assert "batch_size=4 does not fit: lower batch_size to 2" in c["fix"]
    assert "simulated" in c["figure"] and c["measured"]["limit_bytes"] == pytest.approx(limit * 2 ** 30)
    # far too small: not even one video
    rc, out, err, report = doctor("--config", "demo", f"data={data}", *TINY, "--only", "train.batch",
                                  "--memory-limit-gib", "0.05")
    assert rc == 1 and "does not fit even at batch 1" in checks(report)["train.batch"]["fix"]


def test_unknown_config_key_is_the_trainers_config_error(data):
    rc, out, err, report = doctor("--config", "demo", f"data={data}", "batch_sise=4")
    assert rc == 2 and report is None
    assert "unknown config key 'batch_sise'" in err and "did you mean batch_size" in err
    rc, out, err, _ = doctor("--config", "no_such_preset")
    assert rc == 2 and "not found" in err


def test_only_skip_and_help():
    assert select([], []) == list(CHECKS)
    assert select(["env"], ["env.ffmpeg,env.disk"]) == ["env.python", "env.torch", "env.dali", "env.driver",
                                                         "env.gpus", "env.shm"]
    assert select(["train.step", "dist"], []) == ["train.step", "dist.allreduce"]
    with pytest.raises(ValueError, match="unknown check 'gpu'"):
        select(["gpu"], [])
    rc, out, err, _ = doctor("--config", "demo", "--only", "gpu")
    assert rc == 2 and "unknown check" in err
    text = build_parser().format_help()
    assert all(name in text for name in CHECKS) and all(g in text for g in GROUPS)
    rc, out, err, report = doctor("--config", "demo", "--only", "env", "--skip", "env.disk")
    assert rc == 0 and list(checks(report)) == select(["env"], ["env.disk"])
    p = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=REPO, capture_output=True, text=True, env=ENV1)
    assert "python -m train doctor" in p.stdout


def test_under_torchrun_two_ranks_all_reduce_over_gloo(data, tmp_path):
    path = tmp_path / "dist.json"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                        "train", "doctor", "--config", "demo", f"data={data}", "--only", "dist,env.python",
                        "--json", str(path)], cwd=REPO, capture_output=True, text=True, env=ENV1, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    json_lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert len(json_lines) == 1                    # local rank 0 reports for the node; rank 1 only all-reduces
    report = json.loads(json_lines[0])
    assert report == json.loads(path.read_text()) and report["world_size"] == 2
    c = checks(report)["dist.allreduce"]
    assert c["status"] == "PASS", c
    m = c["measured"]
    assert m["backend"] == "gloo" and m["world_size"] == 2 and m["correct"]
    assert m["busbw_gb_s"] > 0 and m["seconds"] > 0 and m["bytes"] == 16 * 2 ** 20
    assert m["rendezvous"]["MASTER_ADDR"] and m["rendezvous"]["MASTER_PORT"] and m["rendezvous"]["WORLD_SIZE"] == "2"
    row = next(line for line in p.stdout.splitlines() if line.startswith("dist.allreduce"))
    assert "PASS" in row and "gloo, 2 ranks: sum correct=True" in row
