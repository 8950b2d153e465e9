"""The commands that only the command line reaches: `python -m evaluate export` and `compare`, and `python -m
preprocess --retry-errors`, each run as a user runs it (a subprocess, its exit code, its stdout and files).

Each test asserts what the command promises and what a plausible fault would change: compare's baseline is the
random init of the same command (not the first row), its figures are the results files' own; export's weights
are the checkpoint's query backbone, tensor for tensor, and its card lists the evaluations it was given; a
skipped input stays skipped on a rerun and comes back only with --retry-errors.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import coded_frames
from evaluate.backbone import load_backbone
from evaluate.cli import main as evaluate_main
from model import build_objective
from preprocess.sample_videos import encode
from preprocess.video import ffmpeg_exe
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.recipe import objective_kwargs

REPO = Path(__file__).resolve().parents[1]
FAST = ["--frames", "8", "--crop", "32", "--test-clips", "2", "--batch-size", "4", "--num-threads", "2", "--no-progress"]


def cli(*args, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """`python -m ...` from this checkout's code, whatever the working directory."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=900)


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def evaluated(synthetic_shards, tmp_path_factory) -> dict:
    """A run folder with a checkpoint as `python -m train` writes it (FIMA on I3D x0.25, step 7, as test_evaluate's
    `ckpt`), a kNN evaluation of it under RUN/eval/ (where export looks), the random-init kNN baseline, and a
    linear probe of the checkpoint on the same feature cache."""
    root = tmp_path_factory.mktemp("evaluated")
    cfg = load_config("demo", ["crop=48", "queue_size=64"])
    torch.manual_seed(0)
    model = build_objective(cfg["objective"], **objective_kwargs(cfg))
    with torch.no_grad():   # a built model's key encoder is a copy of its query encoder: move the query off it, so
        for p in model.encoder_q.parameters():   # that exporting or evaluating the wrong encoder shows
            p.add_(0.01 * torch.randn_like(p))
    ckpt = CheckpointManager(root / "run" / "checkpoints").save({"model": model.state_dict(), "step": 7,
                                                                 "config": cfg}, 7)
    data, cache = ["--data", str(synthetic_shards)], ["--cache-dir", str(root / "cache")]
    runs = {"knn": root / "run" / "eval" / "synthetic-knn", "random": root / "random-knn",
            "linear": root / "linear"}
    assert evaluate_main(["knn", "--checkpoint", str(ckpt), *data, *cache, *FAST, "--out", str(runs["knn"])]) == 0
    assert evaluate_main(["knn", "--random-init", "--backbone", "i3d", "--backbone-width", "0.25", *data, *cache,
                          *FAST, "--out", str(runs["random"])]) == 0
    assert evaluate_main(["linear", "--checkpoint", str(ckpt), *data, *cache, "--epochs", "5", *FAST,
                          "--out", str(runs["linear"])]) == 0
    return {"ckpt": ckpt, "run": root / "run", **runs}


def table_rows(stdout: str) -> list[list[str]]:
    """compare's table: the rows under the header, split on runs of two or more spaces."""
    lines = [x for x in stdout.splitlines() if x.strip()]
    head = next(i for i, x in enumerate(lines) if x.startswith("model"))
    return [re.split(r"\s{2,}", x.strip()) for x in lines[head + 1:]]


def test_compare_cli_puts_each_result_against_the_random_init_of_its_own_command(evaluated):
    """Given checkpoint first and random init second, the checkpoint's kNN row is its difference from the random
    init's (not 'baseline', as the first row of its command would be), in points, from the results files; the
    linear row has no random init of its own command, so it is its own baseline; a folder and its results.json
    are the same argument."""
    knn, rand, lin = (results(evaluated[k])["result"]["top1"] for k in ("knn", "random", "linear"))
    r = cli("evaluate", "compare", evaluated["knn"], evaluated["random"] / "results.json", evaluated["linear"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = table_rows(r.stdout)
    assert len(rows) == 3, r.stdout
    (m1, c1, k1, v1, d1), (m2, c2, k2, v2, d2), (m3, c3, k3, v3, d3) = rows
    assert (c1, c2, c3) == ("knn", "knn", "linear") and k1 == k2 == k3 == "top-1"
    assert m1.startswith("fima step 7") and m2 == "random init (i3d, seed 0)" and m3.startswith("fima step 7")
    assert (v1, v2, v3) == (f"{100 * knn:.2f}", f"{100 * rand:.2f}", f"{100 * lin:.2f}")
    assert d1 == f"{100 * (knn - rand):+.2f}" and d2 == "baseline" and d3 == "baseline"


def test_compare_cli_missing_results_is_a_clear_error(evaluated, tmp_path):
    r = cli("evaluate", "compare", evaluated["knn"], tmp_path)
    assert r.returncode == 1 and f"{tmp_path}: no results.json" in r.stderr, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr


def test_export_cli_writes_the_query_backbone_and_a_card_of_its_evaluations(evaluated, tmp_path):
    """`export --checkpoint RUN` from another working directory: the default output folder is RUN's name plus
    -export there; the safetensors hold exactly the checkpoint's query backbone (every tensor equal); the card
    names objective, backbone, width and step, the run's own evaluation (found under RUN/eval/) and the one given
    with --results, with their figures; and `--checkpoint` takes the export back with the same weights hash."""
    from safetensors.torch import load_file
    r = cli("evaluate", "export", "--checkpoint", evaluated["run"], "--results", evaluated["random"] / "results.json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "run-export"
    assert f"exported {Path('run-export') / 'backbone.safetensors'}" in r.stdout
    tensors = load_file(str(out / "backbone.safetensors"))
    # the reference is the checkpoint file itself, read here: its encoder_q.* tensors, not the loader's view of them
    sd = torch.load(evaluated["ckpt"], weights_only=True)["model"]
    want = {k[len("encoder_q."):]: v for k, v in sd.items() if k.startswith("encoder_q.")}
    assert set(tensors) == set(want) and len(want) > 50
    for k, v in want.items():
        assert torch.equal(tensors[k], v), k
    assert not all(torch.equal(v, sd[f"encoder_k.{k}"]) for k, v in want.items())   # the query, not the key
    _, info = load_backbone(evaluated["ckpt"])
    card = json.loads((out / "model_card.json").read_text())
    assert (card["objective"], card["backbone"], card["backbone_width"], card["steps"]) == ("fima", "i3d", 0.25, 7)
    assert card["weights_sha256"] == info["sha256"] and card["source_checkpoint"] == str(evaluated["ckpt"])
    got = {Path(e["file"]).parent.name: e for e in card["evaluations"]}
    assert set(got) == {"synthetic-knn", "random-knn"}
    for name, key in (("synthetic-knn", "knn"), ("random-knn", "random")):
        assert got[name]["command"] == "knn"
        assert got[name]["result"]["top1"] == results(evaluated[key])["result"]["top1"]
    for line in ("objective       fima", "backbone        i3d x0.25", "steps           7", "evaluations     2",
                 f"weights sha256  {info['sha256'][:16]}"):
        assert line in r.stdout, line
    _, back = load_backbone(out)
    assert back["sha256"] == info["sha256"] and back["step"] == 7


def test_export_cli_of_a_missing_checkpoint_fails_and_writes_nothing(tmp_path):
    r = cli("evaluate", "export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.startswith("error: checkpoint") and "not found" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_preprocess_retry_errors_retries_only_when_asked(tmp_path):
    """An input that failed for a passing reason (here an ffmpeg that fails on that one file) is remembered as
    skipped: a rerun with a working ffmpeg and the same, unchanged file still skips it (errors.jsonl keeps the
    reason, the shards lack it); only --retry-errors transcodes it again, and then the set is complete."""
    src = tmp_path / "src"
    for c in ("a", "b"):
        for i in range(2):
            (src / "train" / c).mkdir(parents=True, exist_ok=True)
            name = "flaky" if (c, i) == ("b", 1) else f"{c}{i}"
            encode(coded_frames(24, 48, 64), src / "train" / c / f"{name}.mp4")
    fake = tmp_path / "ffmpeg"
    fake.write_text(f"#!/bin/sh\ncase \"$*\" in *flaky.mp4*) echo 'simulated failure' >&2; exit 1;; esac\n"
                    f"exec {ffmpeg_exe()} \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "preprocess", str(src), str(out), "--name", "r", "--keep-work", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def run(*extra, ffmpeg=None):
        e = {k: v for k, v in env.items() if k != "FFMPEG_BINARY"} | ({"FFMPEG_BINARY": str(ffmpeg)} if ffmpeg else {})
        r = subprocess.run([*cmd, *extra], cwd=REPO, capture_output=True, text=True, env=e, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        errors = [json.loads(x) for x in (out / "errors.jsonl").read_text().splitlines()]
        manifest = json.loads((out / "train" / "manifest.json").read_text())
        return errors, manifest

    errors, manifest = run(ffmpeg=fake)
    assert [e["source"] for e in errors] == ["train/b/flaky.mp4"] and "simulated failure" in errors[0]["reason"]
    assert manifest["num_samples"] == 3 and manifest["num_skipped"] == 1
    errors, manifest = run()                               # ffmpeg works now, but the skip is remembered
    assert [e["source"] for e in errors] == ["train/b/flaky.mp4"] and "simulated failure" in errors[0]["reason"]
    assert manifest["num_samples"] == 3
    errors, manifest = run("--retry-errors")
    assert errors == [] and manifest["num_samples"] == 4 and manifest["num_skipped"] == 0
