"""The benchmarks that the README's claims rest on, run for real at smoke size: they finish, their JSON parses, and
their rows say what they measured (never a timing or quality threshold: those belong in the benchmarks' output)."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evaluate.backbone import weights_hash
from model import build_objective
from train.recipe import objective_kwargs

REPO = Path(__file__).resolve().parents[1]


def run_script(*args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**__import__("os").environ, "CUDA_VISIBLE_DEVICES": ""})


def test_quality_benchmark_compares_each_objective_with_its_own_random_init(synthetic_shards, tmp_path):
    """Two objectives with different clips (MoCo's 8x4, FIMA's 16x2): each has its own random-init baseline, every
    figure is the one its evaluation wrote, the gains are recomputed here, the random init is the run's own seed,
    and the report (markdown table, picture, README block) is written; a second run reuses everything."""
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- quality:begin -->\nold table\n<!-- quality:end -->\nafter\n")
    args = [REPO / "benchmarks" / "quality.py", "--data", synthetic_shards, "--objectives", "moco", "fima",
            "--steps", "2", "--seeds", "0", "--test-clips", "1", "--finetune-epochs", "1", "--finetune-seeds", "1",
            "--work", tmp_path, "--report", tmp_path / "report", "--readme", readme, "--record", tmp_path / "record",
            "crop=32", "batch_size=4",
            "num_threads=1", "monitor="]   # no quality monitor: its extractions would be most of this test's time
    r = run_script(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["benchmark"] == "quality" and out["steps"] == 2 and out["seeds"] == [0]
    assert out["recipes"] == {"moco": "cpu_small_moco", "fima": "cpu_small"}
    base = out["baseline_of"]
    assert base == {"moco": "random-i3d-8x4-32", "fima": "random-i3d-16x2-32"}
    for probe in ("linear", "knn", "finetune"):
        got = {}
        for model in ("moco", "fima", *base.values()):
            v = out["top1"][probe][model]["top1"]
            res = json.loads((tmp_path / "eval" / f"{model}-s0-{probe}" / "results.json").read_text())
            got[model] = res["result"]["top1"]
            assert v["per_seed"] == [got[model]] and v["mean"] == got[model] and v["spread"] == 0, (probe, model)
            if probe == "knn":   # the motion-reliance figures come from the same evaluation
                static = out["top1"]["knn"][model]["top1_static"]["per_seed"]
                assert static == [res["result"]["top1_static"]]
                assert out["top1"]["knn"][model]["motion_drop"]["mean"] == pytest.approx(got[model] - static[0])
            if model in base.values():   # the baseline was probed at its objective's clip
                frames, stride = (8, 4) if model == base["moco"] else (16, 2)
                assert (res["settings"]["frames"], res["settings"]["stride"]) == (frames, stride), model
        for model in ("moco", "fima"):
            g = out["gain"][probe][model]
            assert g["minus_random"] == pytest.approx(got[model] - got[base[model]], abs=1e-12)
            assert g["over_random"] == pytest.approx(got[model] / max(got[base[model]], 1e-9))
    # each pretraining really ran (a checkpoint at step 2), and the random init is the run's own seed: the baseline's
    # weights are the query backbone that seed-0 pretraining started from, rebuilt here from the run's config
    for obj in ("moco", "fima"):
        ckpt = sorted((tmp_path / "runs" / f"{obj}-s0" / "checkpoints").glob("ckpt-*.pt"))
        assert ckpt and ckpt[-1].name == "ckpt-00000002.pt"
        cfg = torch.load(ckpt[-1], weights_only=True)["config"]
        assert cfg["seed"] == 0 and cfg["objective"] == obj
        torch.manual_seed(0)
        start = build_objective(obj, **objective_kwargs(cfg)).encoder_q.eval()
        for probe in ("linear", "knn", "finetune"):
            m = json.loads((tmp_path / "eval" / f"{base[obj]}-s0-{probe}" / "results.json").read_text())["model"]
            assert m["source"] == "random-init" and m["seed"] == 0
            assert (m["backbone"], m["backbone_width"]) == (cfg["backbone"], cfg["backbone_width"])
            assert m["sha256"] == weights_hash(start), (obj, probe)
    table = (tmp_path / "report" / "quality.md").read_text()
    assert "| moco (cpu_small_moco" in table and "| random init (i3d) | i3d x0.25, 8x4, 32²" in table
    assert (tmp_path / "report" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old table" not in text and table in text and text.endswith("<!-- quality:end -->\nafter\n")
    # a rerun of the same command trains and evaluates nothing again: the same figures, from --work
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").rglob("results.json")}
    again = run_script(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout.strip().splitlines()[-1])["top1"] == out["top1"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "eval").rglob("results.json")} == stamp
    # on this tiny set the two random inits may score alike, which would hide a gain taken against the wrong one:
    # give MoCo's baseline another score in the record and rebuild the table from the record alone (--from-record)
    kept = {}
    for probe in ("linear", "knn", "finetune"):
        f = tmp_path / "record" / f"{base['moco']}-s0-{probe}.json"
        kept[f] = f.read_text()
        entry = json.loads(kept[f])
        entry["value"]["top1"] = 0.5
        f.write_text(json.dumps(entry))
    third = run_script(*args, "--from-record")
    assert third.returncode == 0, third.stderr[-3000:]
    rebuilt = json.loads(third.stdout.strip().splitlines()[-1])
    top = {pr: {m: out["top1"][pr][m]["top1"]["mean"] for m in out["top1"][pr]} for pr in out["top1"]}
    for probe in ("linear", "knn", "finetune"):
        assert rebuilt["top1"][probe][base["moco"]]["top1"]["mean"] == 0.5
        assert rebuilt["gain"][probe]["moco"]["minus_random"] == pytest.approx(top[probe]["moco"] - 0.5, abs=1e-12)
        assert rebuilt["gain"][probe]["fima"]["minus_random"] == pytest.approx(
            top[probe]["fima"] - top[probe][base["fima"]], abs=1e-12)
    for f, text in kept.items():
        f.write_text(text)
    # the record alone (another machine: an empty --work) gives the same table without training or probing anything,
    # pretraining seconds and monitor curves included
    recorded = sorted(p.name for p in (tmp_path / "record").glob("*.json"))
    assert recorded == sorted([f"{o}-s0-pretrain.json" for o in ("moco", "fima")] + [
        f"{m}-s0-{pr}.json" for m in ("moco", "fima", *base.values()) for pr in ("knn", "linear", "finetune")])
    elsewhere = tmp_path / "elsewhere"
    moved_args = [args[0], "--from-record", *[elsewhere if x == tmp_path else x for x in args[1:]]]
    moved = run_script(*moved_args)     # --from-record: it could not have run anything
    assert moved.returncode == 0, moved.stderr[-3000:]
    got = json.loads(moved.stdout.strip().splitlines()[-1])
    assert got["top1"] == out["top1"] and got["pretrain_seconds"] == out["pretrain_seconds"]
    assert not (elsewhere / "runs").exists() and not (elsewhere / "eval").exists()
    # what the record lacks (a second seed) is named, and nothing is run for it
    i = moved_args.index("--seeds") + 2
    more = run_script(*moved_args[:i], "1", *moved_args[i:])     # --seeds 0 1: seed 1's 2 pretrainings, 8 probes
    assert more.returncode != 0 and "lacks 10 entries" in more.stderr and "fima-s1-pretrain" in more.stderr, more.stderr
    assert not (elsewhere / "runs").exists()
    # an entry counts only for the settings that made it: another seed, probe flag or recipe value reads nothing
    quality = importlib.import_module("benchmarks.quality")
    entry = json.loads((tmp_path / "record" / "fima-s0-knn.json").read_text())
    rec = quality.Record(tmp_path / "record")
    assert rec.get("fima-s0-knn", entry["settings"])["top1"] == out["top1"]["knn"]["fima"]["top1"]["mean"]
    for changed in ({**entry["settings"], "seed": 1}, {**entry["settings"], "flags": entry["settings"]["flags"][:-2]},
                    {**entry["settings"], "source": {**entry["settings"]["source"], "temperature": 0.5}}):
        assert rec.get("fima-s0-knn", changed) is None


def test_acceptance_run_executes_here_with_its_gpu_rows_skipped(tmp_path):
    r = run_script(REPO / "benchmarks" / "acceptance.py", "--quick", "--videos", "6", "--work", tmp_path, "--json",
                   tmp_path / "acceptance.json")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report == json.loads((tmp_path / "acceptance.json").read_text())
    rows = {x["row"]: x for x in report["rows"]}
    assert report["device"] == "cpu" and rows["env"]["measured"]["dali"] == "2.4.0"
    for name in ("doctor.env.driver", "doctor.env.gpus", "doctor.decode.gpu", "doctor.decode.match",
                 "decode.h264.align16.whole", "decode.h264.align2.whole", "dist.allreduce"):
        assert rows[name]["status"] == "SKIP" and rows[name]["figure"], name
    for name in ("decode.vp9.align16.trimmed", "decode.vp9.align16.whole", "decode.vp9.align2.trimmed",
                 "decode.vp9.align2.whole"):
        assert rows[name]["status"] == "PASS" and rows[name]["measured"]["videos_per_s"] > 0, name
        assert rows[name]["measured"]["decoded_frames_per_s"] > 0
    assert rows["doctor.decode.cache.align16"]["measured"]["cache_friendly"]
    assert not rows["doctor.decode.cache.align2"]["measured"]["cache_friendly"]
    assert rows["doctor.train.step"]["status"] == "PASS" and rows["train.data_stall"]["status"] == "PASS"
    assert rows["train.data_stall"]["measured"]["data_stall_ratio"] > 0
