"""`python -m evaluate compare RESULTS...`: evaluation results side by side, against a baseline.

Each argument is a results.json of `python -m evaluate` or a folder holding one. One row per result: the model
(random init or checkpoint, objective, step), the command and its headline figure (top-1 for linear, knn and
finetune; R@1 for retrieval; temporal-order accuracy for temporal), and its difference from the baseline row of
the same command: the random-init result when one is given, else the first.
"""
from __future__ import annotations

import json
from pathlib import Path

HEADLINE = {"linear": ("top1", "top-1"), "knn": ("top1", "top-1"), "finetune": ("top1", "top-1"),
            "retrieval": ("recall.1", "R@1"), "temporal": ("temporal_order_accuracy", "order acc.")}


def headline(blob: dict) -> tuple[str, float | None]:
    key, label = HEADLINE.get(blob.get("command"), ("top1", "top-1"))
    value = blob.get("result", {})
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return label, value


def describe(blob: dict) -> str:
    m = blob.get("model", {})
    if m.get("source") == "random-init":
        return f"random init ({m.get('backbone')}, seed {m.get('seed')})"
    return f"{m.get('objective') or 'checkpoint'} step {m.get('step')} ({Path(m.get('path') or '?').name})"


def compare(paths: list[Path]) -> list[dict]:
    rows = []
    for p in paths:
        f = p / "results.json" if p.is_dir() else p
        if not f.is_file():
            raise FileNotFoundError(f"{p}: no results.json (give the --out folder of an evaluate command)")
        blob = json.loads(f.read_text())
        label, value = headline(blob)
        rows.append({"file": str(f), "command": blob.get("command"), "model": describe(blob), "metric": label,
                     "value": value, "random_init": blob.get("model", {}).get("source") == "random-init"})
    for r in rows:
        same = [x for x in rows if x["command"] == r["command"]]
        base = next((x for x in same if x["random_init"]), same[0])
        r["minus_baseline"] = (None if r["value"] is None or base["value"] is None or base is r
                               else r["value"] - base["value"])
    return rows


def run(args) -> int:
    rows = compare(args.results)
    width = max(len(r["model"]) for r in rows)
    print(f"\n{'model':<{width}}  {'command':<9}  {'metric':<10}  {'value %':>8}  {'vs baseline':>11}")
    for r in rows:
        v = "n/a" if r["value"] is None else f"{100 * r['value']:.2f}"
        d = "baseline" if r["minus_baseline"] is None else f"{100 * r['minus_baseline']:+.2f}"
        print(f"{r['model']:<{width}}  {r['command']:<9}  {r['metric']:<10}  {v:>8}  {d:>11}")
    return 0
