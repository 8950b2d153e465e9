"""evaluate/ end to end on CPU: real shards, real DALI loaders, real I3D / R3D-18, the CLI in-process.

Small on purpose (I3D at 8x32^2 or 16x48^2, 1-2 clips per video): the protocols' code paths, not accuracy.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from evaluate.backbone import load_backbone
from evaluate.cli import main
from evaluate.data import open_split
from evaluate.features import cache_key, frozen
from model import build_backbone, build_objective
from preprocess.cli import main as preprocess_main
from preprocess.sample_videos import encode
from train.checkpoint import CheckpointManager
from train.config import load_config
from train.recipe import objective_kwargs

REPO = Path(__file__).resolve().parents[1]
FAST = ["--frames", "8", "--crop", "32", "--test-clips", "2", "--batch-size", "4", "--num-threads", "2", "--no-progress"]


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A checkpoint exactly as `python -m train` writes it (FIMA objective on I3D, the demo preset at crop 48)."""
    cfg = load_config("demo", ["crop=48", "queue_size=64"])
    torch.manual_seed(0)
    model = build_objective(cfg["objective"], **objective_kwargs(cfg))
    folder = tmp_path_factory.mktemp("ckpt") / "run" / "checkpoints"
    return CheckpointManager(folder).save({"model": model.state_dict(), "step": 7, "config": cfg}, 7)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("feature_cache")


def test_help_explains_every_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "evaluate", "--help"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0 and all(c in out.stdout for c in ("finetune", "linear", "retrieval", "cam"))
    sub = subprocess.run([sys.executable, "-m", "evaluate", "finetune", "--help"], cwd=REPO, capture_output=True,
                         text=True)
    for flag in ("--checkpoint", "--random-init", "--data", "--protocol", "--epochs", "--test-clips", "--resume",
                 "--dropout", "coclr"):
        assert flag in sub.stdout, flag


def test_linear_probe_end_to_end_and_cache_reuse(synthetic_shards, ckpt, cache, tmp_path, capsys):
    """The frozen backbone's features are extracted once; a second run reads the cache and reports the same."""
    args = ["linear", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--cache-dir", str(cache),
            "--epochs", "20", *FAST]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    first = results(tmp_path / "a")
    assert not first["result"]["features"]["train"]["cached"] and not first["result"]["features"]["test"]["cached"]
    assert first["result"]["test_videos"] == 12 and first["result"]["clips_per_video"] == 2
    assert first["model"]["backbone"] == "i3d" and first["model"]["source"] == "checkpoint"
    assert first["settings"]["frames"] == 8 and first["settings"]["crop"] == 32       # flags over the checkpoint's 48
    assert 0 <= first["result"]["top1"] <= first["result"]["top5"] <= 1
    assert list((tmp_path / "a" / "tb").iterdir())
    assert "top-1 (%)" in capsys.readouterr().out

    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    second = results(tmp_path / "b")
    assert second["result"]["features"]["train"]["cached"] and second["result"]["features"]["test"]["cached"]
    for k in ("top1", "top5", "clip_top1", "train_top1"):
        assert second["result"][k] == first["result"][k], k

    # the cache key follows the weights, the data and every sampling setting
    backbone, info = load_backbone(ckpt)
    split = open_split("test", synthetic_shards / "test")
    s = {**first["settings"]}
    base = cache_key(info, split, s, "fp32")[0]
    assert base == Path(first["result"]["features"]["test"]["path"]).stem
    assert cache_key(info, split, {**s, "test_clips": 3}, "fp32")[0] != base
    assert cache_key(info, split, {**s, "crop": 48}, "fp32")[0] != base
    assert cache_key(info, split, s, "bf16")[0] != base
    assert cache_key({**info, "sha256": "0" * 64}, split, s, "fp32")[0] != base


def test_retrieval_end_to_end_matches_an_independent_computation(synthetic_shards, ckpt, cache, tmp_path):
    """Runs on the linear probe's cached features; R@k recomputed here by brute force from the cache."""
    out = tmp_path / "r"
    assert main(["retrieval", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--cache-dir", str(cache),
                 "--out", str(out), *FAST]) == 0
    r = results(out)["result"]
    assert r["features"]["train"]["cached"] and r["features"]["test"]["cached"]      # shared with the linear probe
    assert (r["queries"], r["gallery"]) == (12, 24)
    rows = {n: torch.load(r["features"][n]["path"], weights_only=True)["rows"] for n in ("train", "test")}

    def per_video(rw):   # mean of L2-normalised clip features, video by video, in numpy
        f = rw["out"].double().numpy()
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        ids = sorted(set(rw["index"].tolist()))
        return (np.stack([f[rw["index"].numpy() == i].mean(0) for i in ids]),
                np.array([int(rw["label"][rw["index"] == i][0]) for i in ids]))

    (g, gl), (q, ql) = per_video(rows["train"]), per_video(rows["test"])
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    for k in (1, 5, 10, 20, 50):
        hits = [any(gl[j] == ql[i] for j in np.argsort(-sim[i], kind="stable")[:k]) for i in range(len(q))]
        assert r["recall"][str(k)] == pytest.approx(np.mean(hits)), k
    assert r["recall"]["50"] == 1.0                    # 24 gallery videos hold every class


def test_knn_end_to_end_matches_an_independent_computation(synthetic_shards, ckpt, cache, tmp_path, capsys):
    """Reads the cache linear and retrieval wrote; the weighted vote recomputed here in numpy from that cache."""
    out = tmp_path / "knn"
    assert main(["knn", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--cache-dir", str(cache),
                 "--out", str(out), "--knn-k", "5", "--knn-temperature", "0.1", *FAST]) == 0
    res = results(out)
    r = res["result"]
    assert r["features"]["train"]["cached"] and r["features"]["test"]["cached"]
    assert (r["k"], r["temperature"], r["test_videos"], r["train_videos"]) == (5, 0.1, 12, 24)
    rows = {n: torch.load(r["features"][n]["path"], weights_only=True)["rows"] for n in ("train", "test")}

    def per_video(rw):
        f = rw["out"].double().numpy()
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        ids = sorted(set(rw["index"].tolist()))
        v = np.stack([f[rw["index"].numpy() == i].mean(0) for i in ids])
        return v / np.linalg.norm(v, axis=1, keepdims=True), np.array([int(rw["label"][rw["index"] == i][0]) for i in ids])

    (g, gl), (q, ql) = per_video(rows["train"]), per_video(rows["test"])
    for k, expected in ((5, r["top1"]), (1, r["top1_by_k"]["1"]), (20, r["top1_by_k"]["20"])):
        hits = []
        for i in range(len(q)):
            sim = g @ q[i]
            votes = np.zeros(6)
            for j in np.argsort(-sim, kind="stable")[:k]:
                votes[gl[j]] += np.exp(sim[j] / 0.1)
            hits.append(votes.argmax() == ql[i])
        assert expected == pytest.approx(np.mean(hits)), k
    # the motion-reliance probe: the same vote for the test clips with every frame the clip's middle one
    static = torch.load(r["features"]["test_static"]["path"], weights_only=True)["rows"]
    assert not torch.allclose(static["out"], rows["test"]["out"])   # the frozen clips really lost their motion
    qs, qsl = per_video(static)
    hits = []
    for i in range(len(qs)):
        sim = g @ qs[i]
        votes = np.zeros(6)
        for j in np.argsort(-sim, kind="stable")[:5]:
            votes[gl[j]] += np.exp(sim[j] / 0.1)
        hits.append(votes.argmax() == qsl[i])
    assert r["top1_static"] == pytest.approx(np.mean(hits))
    assert r["motion_drop"] == pytest.approx(r["top1"] - r["top1_static"])
    assert "top-1 (%)" in capsys.readouterr().out and (out / "tb").is_dir()
    with pytest.raises(SystemExit):
        main(["knn", "--random-init", "--data", str(synthetic_shards), "--epochs", "3"])   # not a knn flag


def test_export_writes_safetensors_and_a_model_card_that_checkpoint_accepts_back(synthetic_shards, ckpt, cache,
                                                                                   tmp_path):
    from safetensors import safe_open
    run_dir = ckpt.parent.parent
    (run_dir / "eval" / "x-knn").mkdir(parents=True, exist_ok=True)
    knn_args = ["knn", "--data", str(synthetic_shards), "--cache-dir", str(cache), *FAST]
    assert main([*knn_args, "--checkpoint", str(ckpt), "--out", str(run_dir / "eval" / "x-knn")]) == 0
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run_dir), "--out", str(out)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    backbone, info = load_backbone(ckpt)
    assert (card["objective"], card["backbone"], card["backbone_width"], card["steps"]) == ("fima", "i3d", 0.25, 7)
    assert card["weights_sha256"] == info["sha256"] and card["pretrain_config"]["queue_size"] == 64
    assert [e["command"] for e in card["evaluations"]] == ["knn"]
    assert card["evaluations"][0]["result"]["top1"] == results(run_dir / "eval" / "x-knn")["result"]["top1"]
    with safe_open(str(out / "backbone.safetensors"), "pt") as f:   # the backbone only: no key encoder, no queue
        assert set(f.keys()) == set(backbone.state_dict()) and f.metadata()["backbone"] == "i3d"
    # --checkpoint takes the folder (or the file) back: same weights, same hash, so the feature cache is shared
    for given in (out, out / "backbone.safetensors"):
        again, info2 = load_backbone(given)
        assert info2["sha256"] == info["sha256"] and info2["backbone_width"] == 0.25 and info2["step"] == 7
    assert main([*knn_args, "--checkpoint", str(out), "--out", str(tmp_path / "k2")]) == 0
    r2 = results(tmp_path / "k2")["result"]
    assert r2["features"]["test"]["cached"] and r2["top1"] == card["evaluations"][0]["result"]["top1"]
    (out / "model_card.json").write_text(json.dumps({**card, "format": "something-else"}))
    with pytest.raises(ValueError, match="format"):
        load_backbone(out)


def test_finetune_skips_a_non_finite_step_as_pretraining_does(synthetic_shards, tmp_path):
    """Fine-tuning steps through the trainer's loop (train/loop.py): a NaN loss at one step skips that update on
    every rank with the trainer's message, the run goes on and ends with finite weights; five in a row would stop
    it with a checkpoint, as in pretraining."""
    out = tmp_path / "ft"
    args = ["finetune", "--random-init", "--backbone-width", "0.25", "--data", str(synthetic_shards), "--out",
            str(out), "--epochs", "1", *FAST]
    inject = (
        "import sys, torch\n"
        "import evaluate.finetune as ft\n"
        "real, calls = ft.FineTuning.forward, []\n"
        "def forward(self, batch):\n"
        "    out = real(self, batch)\n"
        "    calls.append(1)\n"
        "    if len(calls) == 2:\n"
        "        out['loss'] = out['loss'] * float('nan')\n"
        "    return out\n"
        "ft.FineTuning.forward = forward\n"
        "from evaluate.cli import main\n"
        f"sys.exit(main({args!r}))\n")
    r = subprocess.run([sys.executable, "-c", inject], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 1: non-finite loss or gradient (loss nan), update skipped (1 in a row)" in r.stdout, r.stdout[-2000:]
    state = torch.load(results(out)["result"]["checkpoint"], weights_only=True)
    assert state["step"] == 6 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert np.isnan(results(out)["result"]["history"][0]["train_loss"])   # the window's mean shows the bad step


def test_finetune_end_to_end_then_resume(synthetic_shards, ckpt, tmp_path, capsys):
    out = tmp_path / "ft"
    args = ["finetune", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--out", str(out), *FAST]
    assert main([*args, "--epochs", "1"]) == 0
    one = results(out)
    assert one["result"]["epoch"] == 1 and len(one["result"]["history"]) == 1
    assert one["settings"]["dropout"] == 0.5 and one["settings"]["lr"] == 0.01      # the FIMA recipe, "synthetic" data
    assert one["result"]["effective_lr"] == pytest.approx(0.01 * 4 / 16)          # linear scaling from batch 16
    assert 0 <= one["result"]["top1"] <= one["result"]["top5"] <= 1
    assert (out / "metrics.jsonl").is_file() and list((out / "checkpoints").glob("ckpt-*.pt"))
    capsys.readouterr()

    assert main([*args, "--epochs", "2"]) == 0                                     # continues from epoch 1
    assert "resumed from" in capsys.readouterr().out
    two = results(out)
    assert two["result"]["epoch"] == 2 and [h["epoch"] for h in two["result"]["history"]] == [1, 2]
    # the fine-tuned checkpoint is itself evaluable (its backbone loads by name)
    state = torch.load(two["result"]["checkpoint"], weights_only=True)
    assert load_backbone(two["result"]["checkpoint"])[1]["backbone"] == "i3d" and state["epoch"] == 2
    assert load_backbone(out)[1]["path"] == str(Path(two["result"]["checkpoint"]).resolve())   # a run folder: newest
    # a changed setting does not silently continue another run
    assert main([*args, "--epochs", "2", "--lr", "0.5"]) == 1
    assert "other settings" in capsys.readouterr().err


def _moving_square_shards(root: Path, T: int = 32, b_slower: bool = False) -> Path:
    """A moving white square and a static one of the same size on a flat grey background, 2 classes (b_slower:
    class b's square covers half the way, so the two videos differ; with T > 32 a video's clips differ too)."""
    H, W, s = 240, 320, 56
    for c in ("a", "b"):
        frames = np.full((T, H, W, 3), 128, np.uint8)
        way = 70 if c == "b" and b_slower else 140
        for t in range(T):
            frames[t, 150:150 + s, 180:180 + s] = 255                   # static, lower band
            x = int(60 + way * t / (T - 1))
            frames[t, 40:40 + s, x:x + s] = 255                         # moving left to right, upper band
        for split in ("train", "test"):
            (root / "src" / split / c).mkdir(parents=True)
            encode(frames, root / "src" / split / c / "v.mp4")
    assert preprocess_main([str(root / "src"), str(root / "shards"), "--no-progress"]) == 0
    return root / "shards"


def test_activation_maps_are_real_images(tmp_path):
    shards = _moving_square_shards(tmp_path)
    out, S, cols = tmp_path / "cam", 96, 8
    assert main(["cam", "--random-init", "--backbone", "r3d18", "--data", str(shards), "--videos", "0", "--crop", str(S),
                 "--tile", str(S), "--frames", "16", "--grid-frames", str(cols), "--movie", "mp4", "--num-threads", "2",
                 "--no-progress", "--out", str(out)]) == 0
    video = results(out)["result"]["videos"][0]
    img = np.asarray(Image.open(video["png"]).convert("RGB")).astype(float)
    assert img.shape == (2 * S, cols * S, 3)                            # one clip: a row of frames, a row of overlays
    assert Path(video["movie"]).stat().st_size > 1000
    frames = np.stack([img[:S, j * S:(j + 1) * S] for j in range(cols)])
    overlay = np.stack([img[S:, j * S:(j + 1) * S] for j in range(cols)])
    background = np.median(frames, axis=0)
    moving = np.abs(frames - background).mean(-1) > 40                 # where the square is in each frame
    static = (frames.mean(-1) > 200) & (np.abs(frames - background).mean(-1) < 5)   # the square that never moves
    assert moving.sum() > 1000 and static.sum() > 1000
    heat = overlay - 0.5 * frames                                       # alpha 0.5: what the map adds
    assert np.abs(heat[moving].mean(0) - heat[static].mean(0)).sum() > 30   # same look, different response
    assert not np.allclose(overlay, frames, atol=2)
    assert video["motion_focus"] is not None


def test_ucf_linear_and_retrieval(ucf_shards, tmp_path):
    """ucf101-mini (9 classes, 72 train / 36 test videos), the random-init baseline, one shared extraction."""
    common = ["--random-init", "--backbone", "i3d", "--data", str(ucf_shards), "--cache-dir", str(tmp_path / "c"),
              *FAST, "--test-clips", "1"]
    assert main(["linear", *common, "--epochs", "10", "--out", str(tmp_path / "lin")]) == 0
    assert main(["retrieval", *common, "--out", str(tmp_path / "ret")]) == 0
    lin, ret = results(tmp_path / "lin"), results(tmp_path / "ret")
    assert lin["data"]["train"]["classes"] == 9 and lin["result"]["test_videos"] == 36
    assert lin["model"]["source"] == "random-init"
    assert ret["result"]["features"]["test"]["cached"] and (ret["result"]["queries"], ret["result"]["gallery"]) == (36, 72)
    rec = [ret["result"]["recall"][k] for k in ("1", "5", "10", "20", "50")]
    assert rec == sorted(rec) and rec[-1] == 1.0


# ----------------------------------------------------------------------------------------------- bad input

def _subset_shards(root: Path, sample_videos: Path, split_classes: dict[str, list[str]]) -> Path:
    for split, classes in split_classes.items():
        for c in classes:
            (root / "src" / split / c).mkdir(parents=True)
            src = sorted((sample_videos / split / c).glob("*.mp4"))[0]
            (root / "src" / split / c / src.name).symlink_to(src)
    assert preprocess_main([str(root / "src"), str(root / "shards"), "--no-progress"]) == 0
    return root / "shards"


def test_bad_inputs_give_clear_errors(synthetic_shards, sample_videos, ckpt, tmp_path, capsys):
    data = ["--data", str(synthetic_shards), "--out", str(tmp_path / "x"), *FAST]

    def error(args) -> str:
        assert main(args) != 0
        return capsys.readouterr().err

    # a checkpoint of another architecture: asked for the wrong backbone, or weights that do not fit its config
    assert "trained with backbone 'i3d'" in error(["linear", "--checkpoint", str(ckpt), "--backbone", "r3d18", *data])
    cfg = load_config("demo", ["crop=48"])                                   # says i3d ...
    r3d = {f"encoder_q.{k}": v for k, v in build_backbone("r3d18").state_dict().items()}   # ... holds an R3D-18
    wrong = CheckpointManager(tmp_path / "wrong").save({"model": r3d, "config": cfg, "step": 1}, 1)
    msg = error(["retrieval", "--checkpoint", str(wrong), *data])
    assert "does not match a i3d backbone" in msg and "trained with backbone 'i3d'" in msg and "fit 'r3d18'" in msg

    # a shard set without labels
    lst = tmp_path / "unlabelled.txt"
    lst.write_text("".join(f"{p.relative_to(sample_videos)}\n" for p in sorted(sample_videos.glob("train/*/*_000.mp4"))))
    assert preprocess_main([str(sample_videos), str(tmp_path / "unl"), "--format", "list", "--annotations", str(lst),
                            "--no-progress"]) == 0
    msg = error(["linear", "--random-init", "--train", str(tmp_path / "unl" / "train"), "--test",
                 str(synthetic_shards / "test"), *FAST])
    assert "have no label (label -1)" in msg

    # train and test with different class lists
    small = _subset_shards(tmp_path / "small", sample_videos, {"train": ["left", "right"], "test": ["left", "right"]})
    msg = error(["finetune", "--random-init", "--train", str(synthetic_shards / "train"), "--test", str(small / "test"),
                 *FAST])
    assert "class mismatch" in msg and "train has 6 classes, test has 2" in msg

    # no model, or a missing shard folder
    assert "--random-init" in error(["linear", *data])
    assert "does not exist" in error(["linear", "--random-init", "--data", str(tmp_path / "nowhere"), *FAST])


def test_backbone_width_comes_from_the_checkpoint_and_random_init_takes_a_flag(tmp_path):
    from evaluate.backbone import EvalError
    cfg = load_config("demo", ["backbone_width=0.25"])
    torch.manual_seed(0)
    model = build_objective(cfg["objective"], **objective_kwargs(cfg))
    path = CheckpointManager(tmp_path / "checkpoints").save({"model": model.state_dict(), "step": 1, "config": cfg}, 1)
    backbone, info = load_backbone(path)
    assert info["backbone_width"] == 0.25 and backbone.feature_dim == 256
    q = model.encoder_q.state_dict()                                         # the query encoder's weights
    assert all(torch.equal(v, q[k]) for k, v in backbone.state_dict().items())
    with pytest.raises(EvalError, match="backbone_width 0.25"):
        load_backbone(path, width=1.0)
    random, rinfo = load_backbone(None, "i3d", random_init=True, width=0.25)
    assert random.feature_dim == 256 and rinfo["backbone_width"] == 0.25
    assert load_backbone(None, "i3d", random_init=True)[0].feature_dim == 1024
    r3d, _ = load_backbone(None, "r3d18", random_init=True, width=0.5)   # every backbone scales its widths
    assert r3d.feature_dim == 256
    with pytest.raises(EvalError, match="must be positive"):
        load_backbone(None, "r3d18", random_init=True, width=0.0)


def test_frozen_guard_catches_a_backbone_that_changes():
    """moco's main_lincls sanity check: BatchNorm statistics updated by a forward in train mode are caught."""
    backbone = build_backbone("i3d")
    x = torch.randn(2, 3, 8, 32, 32)
    with frozen(backbone):
        backbone(x)                                # eval mode: nothing changes
    with pytest.raises(AssertionError, match="changed"):
        with frozen(backbone):
            backbone.train()
            backbone(x)                            # running_mean / running_var move



def test_finetune_with_the_coclr_protocol_end_to_end(synthetic_shards, ckpt, tmp_path):
    """`--protocol coclr` through the command line: the CoCLR recipe's optimizer, dropout and backbone learning-rate
    multiplier reach the run (flags still override the clip), the optimizer's groups carry backbone lr = 0.1 x head
    lr, and the backbone trains."""
    out = tmp_path / "coclr"
    assert main(["finetune", "--checkpoint", str(ckpt), "--data", str(synthetic_shards), "--out", str(out),
                 "--protocol", "coclr", "--epochs", "1", "--stride", "2", *FAST]) == 0
    res = results(out)
    s = res["settings"]
    assert (s["optimizer"], s["dropout"], s["backbone_lr_mult"], s["frames"], s["crop"]) == ("adam", 0.9, 0.1, 8, 32)
    assert 0 <= res["result"]["top1"] <= 1 and res["result"]["epoch"] == 1
    state = torch.load(res["result"]["checkpoint"], weights_only=True)
    lrs = sorted(g["lr"] for g in state["optimizer"]["param_groups"])
    assert len(lrs) == 2 and lrs[0] == pytest.approx(0.1 * lrs[1])
    before = torch.load(ckpt, weights_only=True)["model"]
    after = state["model"]
    moved = [k for k in after if k.startswith("backbone.") and after[k].is_floating_point()
             and ("encoder_q." + k[len("backbone."):]) in before
             and not torch.equal(after[k], before["encoder_q." + k[len("backbone."):]])]
    assert moved, sorted(after)[:5]
