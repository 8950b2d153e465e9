"""`python -m evaluate export`: a pretrained backbone as a file a colleague can use, with its model card.

OUT/backbone.safetensors holds the backbone's tensors only (the query encoder: what every protocol evaluates;
no projector, key encoder, decoder, queues or optimiser), with the backbone name and width in its header.
OUT/model_card.json says what it is: objective, backbone and width, the full pretraining config, the sha256 of
the pretraining data's manifest (which shard set, not which folder), steps, the weights' sha256, and every
evaluation result found next to the run (RUN/eval/*/results.json) or named with --results. `--checkpoint OUT` (or
OUT/backbone.safetensors) loads it back in every evaluate command, with the same weights hash, so features cached
for the checkpoint are reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from preprocess.shard_format import atomic_write

from .backbone import CARD, FORMAT, WEIGHTS, load_backbone   # the exported format lives with its loader


def manifest_sha(data: str | None) -> str | None:
    """sha256 of the pretraining shard set's manifest.json, or None when it is not readable from here."""
    if not data:
        return None
    path = Path(data) / "manifest.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def collect_results(run_dir: Path | None, extra: list[Path]) -> list[dict]:
    """The headline numbers of every results.json under RUN/eval/ plus the given ones (command, data, result)."""
    paths = sorted(run_dir.glob("eval/*/results.json")) if run_dir else []
    out = []
    for p in [*paths, *map(Path, extra)]:
        blob = json.loads(Path(p).read_text())
        result = {k: v for k, v in blob.get("result", {}).items() if not isinstance(v, dict) or k in ("recall",)}
        out.append({"command": blob.get("command"), "file": str(p), "protocol": blob.get("protocol"),
                    "data": {n: d.get("manifest_sha256") for n, d in (blob.get("data") or {}).items()},
                    "result": result})
    return out


def export(checkpoint: str | Path, out: Path, extra_results: list[Path] = ()) -> Path:
    from safetensors.torch import save_file

    backbone, info = load_backbone(checkpoint)
    cfg = info["pretrain"] or {}
    path = Path(info["path"])
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    meta = {"format": FORMAT, "backbone": info["backbone"], "backbone_width": str(info["backbone_width"])}
    tmp = out / f".{WEIGHTS}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, out / WEIGHTS)
    card = {"format": FORMAT, "weights": WEIGHTS, "weights_sha256": info["sha256"], "backbone": info["backbone"],
            "backbone_width": info["backbone_width"], "objective": info["objective"], "steps": info["step"],
            "source_checkpoint": info["path"], "pretrain_data": cfg.get("data"),
            "pretrain_data_manifest_sha256": manifest_sha(cfg.get("data")), "pretrain_config": cfg,
            "evaluations": collect_results(run_dir, list(extra_results)),
            "usage": f"python -m evaluate linear --checkpoint {out} --data SHARDS"}
    atomic_write(out / CARD, json.dumps(card, indent=1, sort_keys=True) + "\n")
    return out


def run(args) -> int:
    """The `export` command: --checkpoint CKPT|RUN, --out DIR (default <run name>-export), --results FILE..."""
    out = args.out or Path(f"{Path(args.checkpoint).resolve().name}-export")
    export(args.checkpoint, out, args.results or [])
    card = json.loads((out / CARD).read_text())
    print(f"exported {out / WEIGHTS} and {out / CARD}")
    for name, value in (("objective", card["objective"]), ("backbone", f"{card['backbone']} x{card['backbone_width']}"),
                        ("steps", card["steps"]), ("evaluations", len(card["evaluations"])),
                        ("weights sha256", card["weights_sha256"][:16])):
        print(f"  {name:<15} {value}")
    print(f"load it with: python -m evaluate linear --checkpoint {out} --data SHARDS")
    return 0
