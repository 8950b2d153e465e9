"""Presets that extend presets (`extends:`), and every shipped preset loading."""
from __future__ import annotations

import pytest

from train.config import DEFAULTS, ConfigError, load_config, presets

pytestmark = pytest.mark.unit


def test_extends_applies_the_chain_root_first_then_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("objective: moco\nframes: 8\nstride: 4\nbatch_size: 16\n")
    (tmp_path / "child.yaml").write_text(f"extends: {tmp_path / 'base.yaml'}\nframes: 4\n")
    (tmp_path / "grandchild.yaml").write_text(f"extends: {tmp_path / 'child.yaml'}\nbatch_size: 8\n")
    cfg = load_config(tmp_path / "grandchild.yaml", ["stride=2"])
    assert (cfg["objective"], cfg["frames"], cfg["batch_size"], cfg["stride"]) == ("moco", 4, 8, 2)
    assert cfg["crop"] == DEFAULTS["crop"][0]
    assert "extends" not in cfg


def test_extends_in_a_circle_and_to_nowhere_are_clear_errors(tmp_path):
    (tmp_path / "a.yaml").write_text(f"extends: {tmp_path / 'b.yaml'}\n")
    (tmp_path / "b.yaml").write_text(f"extends: {tmp_path / 'a.yaml'}\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: no_such_preset\n")
    with pytest.raises(ConfigError, match="no_such_preset"):
        load_config(tmp_path / "c.yaml")


def test_the_cpu_recipes_differ_from_cpu_small_only_where_they_say():
    base = load_config("cpu_small")
    for name in (p for p in presets() if p.startswith("cpu_small_")):
        cfg = load_config(name)
        changed = {k for k in cfg if cfg[k] != base[k]}
        assert "objective" in changed and changed <= {"objective", "frames", "stride", "epochs", "out_dir", "backbone",
                                                      "temperature", "cluster", "split", "proto_queue",
                                                      "proto_queue_start", "fame_beta", "fame_skip_shared_background", "crop",
                                                      "batch_size", "min_area"}, (name, changed)


@pytest.mark.unit
@pytest.mark.parametrize("frames, stride, crop, ok", [(2, 1, 16, True), (16, 2, 224, True), (1, 2, 64, False),
                                                     (16, 0, 64, False), (16, 2, 15, False)])
def test_one_clip_rule_for_training_evaluation_and_the_pipeline(frames, stride, crop, ok):
    """The training config, the evaluation protocols and AugConfig accept and refuse the same clips (they had three
    different bounds: crop >= 16, >= 16 and >= 8), each naming the settings in its own words."""
    from evaluate.protocols import resolve
    from pipeline.config import AugConfig
    calls = {"train": lambda: load_config("demo", [f"frames={frames}", f"stride={stride}", f"crop={crop}"]),
             "evaluate": lambda: resolve("knn", "fima", {"frames": frames, "stride": stride, "crop": crop}, None, "i3d"),
             "pipeline": lambda: AugConfig(num_frames=frames, stride=stride, crop_size=crop)}
    bad = "frames" if frames < 2 else "stride" if stride < 1 else "crop"
    words = {"train": f"{bad}=", "evaluate": f"--{bad}",
             "pipeline": {"frames": "num_frames=", "stride": "stride=", "crop": "crop_size="}[bad]}
    for where, call in calls.items():
        if ok:
            call()
        else:
            with pytest.raises((ConfigError, ValueError), match=words[where]):
                call()
