"""Every command ends here: results JSON (atomic), TensorBoard scalars, and a printed table."""
from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from preprocess.shard_format import atomic_write


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def write_results(out: Path, command: str, payload: dict, scalars: dict[str, float], rows: list[tuple[str, str]],
                  title: str, step: int = 0) -> Path:
    """out/results.json (payload + environment), TensorBoard scalars ``<command>/<name>`` at ``step`` in out/tb,
    and the table ``rows`` printed under ``title``. Returns the JSON path."""
    out.mkdir(parents=True, exist_ok=True)
    result = payload.get("result")
    if isinstance(result, dict):   # videos that could not be decoded: counted, named, and in the table
        bad = undecodable(result)
        result["undecodable"] = {split: {"count": len(v), "keys": [r["key"] for r in v]} for split, v in bad.items()}
        rows = list(rows) + [(f"undecodable {split} videos (left out)", str(len(v))) for split, v in bad.items() if v]
    payload = {"command": command, "argv": sys.argv, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
               "versions": {"python": platform.python_version(), "torch": torch.__version__}, **payload,
               "scalars": scalars}
    path = out / "results.json"
    atomic_write(path, json.dumps(_plain(payload), indent=1, sort_keys=False) + "\n")
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(out / "tb")) as w:
        for k, v in scalars.items():
            if v is not None:
                w.add_scalar(f"{command}/{k}", v, step)
    width = max([len(r[0]) for r in rows] + [10])
    print(f"\n{title}")
    print("-" * (width + 14))
    for name, value in rows:
        print(f"{name:<{width}}  {value:>10}")
    print("-" * (width + 14))
    print(f"results: {path}   TensorBoard: {out / 'tb'}")
    return path


def undecodable(result: dict) -> dict[str, list[dict]]:
    """{split: [bad video records]} from a result's "features" (extract_train_test's ``how``) or its own
    "undecodable_records" (commands with their own loops)."""
    found = {split: h.get("undecodable", []) for split, h in (result.get("features") or {}).items()
             if isinstance(h, dict)}
    found.update(result.pop("undecodable_records", {}))
    return found


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}"
