"""`python -m preprocess verify`: a copied shard set checked in full: real shards, real damage, real decoding."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import damage
from preprocess import shard_format as fmt

REPO = Path(__file__).resolve().parents[1]


def verify(out: Path, *args: str) -> tuple[int, str, dict, list[str]]:
    p = subprocess.run([sys.executable, "-m", "preprocess", "verify", str(out), "--no-progress", "--workers", "2",
                        *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    report = json.loads((out / "verify.json").read_text()) if (out / "verify.json").is_file() else {}
    bad = (out / "bad_keys.txt").read_text().split() if (out / "bad_keys.txt").is_file() else []
    return p.returncode, p.stdout + p.stderr, report, bad


def test_verify_passes_a_clean_set_and_names_exactly_the_damaged_samples(synthetic_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synthetic_shards, out)
    rc, text, report, bad = verify(out)
    assert rc == 0, text
    assert bad == [] and "OK" in text
    for r in report["splits"]:
        assert r["problems"] == [] and r["decoded"] == r["samples"] == r["indexed"]
        assert r["checksummed_shards"] == r["shards"] > 0            # sha256 recorded at sharding time

    damaged = damage(out / "train")      # the three kinds of damage the loaders survive (tests/conftest.py)

    rc, text, report, bad = verify(out)
    assert rc == 1, text
    assert set(bad) == damaged, (bad, damaged)
    train = next(r for r in report["splits"] if r["split"] == "train")
    shard_level = [p for p in train["problems"] if p["key"] is None]
    assert any("sha256" in p["problem"] for p in shard_level)               # both damaged tars changed bytes
    assert any("bytes, the manifest says" in p["problem"] for p in shard_level)
    assert all(p["offset"] is not None for p in train["problems"] if p["key"])
    test = next(r for r in report["splits"] if r["split"] == "test")
    assert test["problems"] == []
    # --fraction decodes a seeded subset; structure is still checked in full
    rc, text, report, bad = verify(out / "train", "--fraction", "0.5")
    r = report["splits"][0]
    assert rc == 1 and r["decoded"] == round(0.5 * r["indexed"]) and bad and set(bad) <= damaged


def test_a_bit_flipped_in_tar_padding_is_caught_by_the_checksum_only(synthetic_shards, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(synthetic_shards / "test", out)
    tar = fmt.shard_paths(out)[0]
    data = bytearray(tar.read_bytes())
    assert data[-1] == 0                     # the end-of-archive blocks are zeros
    data[-1] ^= 0x01
    tar.write_bytes(bytes(data))
    rc, text, report, bad = verify(out)
    assert rc == 1 and bad == []            # every sample still reads and decodes: only the checksum notices
    (p,) = report["splits"][0]["problems"]
    assert "sha256" in p["problem"] and p["shard"] == tar.name
    # a manifest written before checksums were recorded still verifies everything else
    m = json.loads((out / "manifest.json").read_text())
    for s in m["shards"]:
        s.pop("sha256")
    (out / "manifest.json").write_text(json.dumps(m))
    rc, text, report, bad = verify(out)
    assert rc == 0 and report["splits"][0]["checksummed_shards"] == 0, text


def test_verify_help_and_bad_arguments(tmp_path):
    p = subprocess.run([sys.executable, "-m", "preprocess", "verify", "--help"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0 and all(f in p.stdout for f in ("--fraction", "--workers", "--bad-keys", "sha256"))
    p = subprocess.run([sys.executable, "-m", "preprocess", "verify", str(tmp_path)], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "no shard set" in p.stderr
