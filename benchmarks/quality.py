"""Benchmark representation quality: every objective, each with its CPU recipe, against the random-init network.

For each seed and objective: pretrain with the objective's recipe (RECIPES: a named preset each, whose comments
give the measurements behind it), then probe the pretrained backbone and the random-init backbone of the same
seed, architecture and clip (frames, stride, crop) with weighted kNN (plus its motion-reliance probe: the test
clips frozen to one frame), the linear probe and, on the first --finetune-seeds seeds, fine-tuning with the same
budget for both (the papers' main protocol). Prints a table and one JSON line: per model and probe the mean and
spread (max - min) over seeds, and each objective's gain over its random init as a difference and a ratio
(quality, like speed, as a ratio against a baseline measured in the same run). --report DIR also writes
DIR/quality.md (the results table, markdown) and DIR/quality.png (BLOCK.md / BLOCK.png with --block) (per probe, each objective's mean and seed
range against its random-init line; the quality monitor's kNN over training); --readme README.md puts that
table between the README's `<!-- quality:begin -->` and `<!-- quality:end -->` markers (--block names another).

Everything lands in --work (runs/, eval/, cache/) and is reused when the same command runs again: a finished
pretraining resumes at its last step and stops, a probe whose results.json exists is read, not rerun (--fresh
reruns the probes). So a long benchmark survives interruption, and seeds or objectives can be added later.
--record DIR keeps what the table is made of (each probe's result, each pretraining's seconds and monitor curve:
a few KB per run, meant to be committed) under the settings that produced it: a later invocation, on another
machine with an empty --work, reads every entry whose settings (recipe, overrides, data, probe flags) are its own
and runs only what is missing, so a table larger than one sitting's compute is built over several; --from-record
makes the table from the record alone and runs nothing (what it lacks is listed, and the command fails).

    python benchmarks/quality.py --data shards/ucf9 --work runs/quality --report docs    # 4 objectives x 3 seeds
    python benchmarks/quality.py --data shards/ucf9 --objectives fima moco --seeds 0 1 --finetune-seeds 0
    python benchmarks/quality.py --steps 20 --seeds 0 --finetune-epochs 0               # a smoke run

Without --data the benchmark shards the embedded synthetic sample (the demo's: camera motion over 4 shared
scenes) into --work and trains on it with the same recipes and flip_p=0 (its classes are directions).
On the 2-core CPU here a full run on ucf9 (4 objectives x 3 seeds, fine-tuning on 2) takes ~6 hours.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks._common import sample_shards  # noqa: E402

# Each objective's recommended CPU recipe: a preset in configs/ (its comments say what was measured).
RECIPES = {"moco": "cpu_small_moco", "fame": "cpu_small_fame", "fima": "cpu_small", "multilevel": "cpu_small_multilevel"}
# The embedded sample (see README, "The embedded sample") and what its videos need on top of the recipes.
SAMPLE = dict(kind="camera", scenes=4, train_per_class=16, test_per_class=8, height=96, width=128, frames=64)
SAMPLE_SHORT_SIDE = 96
SAMPLE_OVERRIDES = ["flip_p=0"]
PROBES = ("knn", "linear", "finetune")
MARKERS = "<!-- {name}:begin -->", "<!-- {name}:end -->"   # the README block --readme writes (--block NAME)


def pretrain(preset: str, data: Path, objective: str, seed: int, out: Path, overrides: list[str]) -> None:
    """Runs (or, when out/ holds the finished run, resumes at its end) one pretraining."""
    cmd = [sys.executable, "-m", "train", "--no-progress", "--config", preset, f"data={data / 'train'}",
           f"monitor={data}", f"objective={objective}", f"seed={seed}", f"out_dir={out}", *overrides]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pretraining failed ({' '.join(cmd)}):\n{r.stderr[-3000:]}")


def probe(command: str, model: list[str], data: Path, out: Path, cache: Path, flags: list[str], fresh: bool) -> dict:
    """One `python -m evaluate` probe (read from out/results.json when it is there and not --fresh)."""
    if fresh or not (out / "results.json").is_file():
        from evaluate.cli import main as evaluate_main
        cached = ["--cache-dir", str(cache)] if command != "finetune" else []   # fine-tuning trains the backbone
        rc = evaluate_main([command, *model, "--data", str(data), "--out", str(out), *cached, "--no-progress", *flags])
        if rc != 0:
            raise SystemExit(f"evaluate {command} failed for {model}")
    return json.loads((out / "results.json").read_text())["result"]


def run_log(run: Path) -> dict:
    """From the run's metrics.jsonl: its training seconds (first to last logged row: the same figure whether this
    call trained or found the run finished) and (step, kNN top-1) of its quality monitor."""
    path = run / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    times = [r["time"] for r in rows if "time" in r]
    return {"seconds": round(times[-1] - times[0], 1) if times else None,
            "monitor": [(r["step"], r["monitor/knn_top1"]) for r in rows if "monitor/knn_top1" in r]}


class Record:
    """--record DIR: one JSON file per probe result and per pretraining (NAME.json), each with the settings that
    produced it; an entry is used only when its settings are the ones asked for now (a changed recipe, override,
    data set or probe flag reruns it and replaces the entry)."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    @staticmethod
    def _key(settings: dict) -> str:
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def get(self, name: str, settings: dict) -> dict | None:
        path = self.folder / f"{name}.json" if self.folder else None
        if path is None or not path.is_file():
            return None
        entry = json.loads(path.read_text())
        return entry["value"] if entry.get("settings_key") == self._key(settings) else None

    def put(self, name: str, settings: dict, value: dict) -> None:
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".{name}.json.tmp"
            tmp.write_text(json.dumps({"name": name, "settings_key": self._key(settings), "settings": settings,
                                       "value": value}, indent=1, sort_keys=True, default=str) + "\n")
            tmp.replace(self.folder / f"{name}.json")


def data_identity(data: Path) -> dict:
    """What a record entry's data is, independent of where the shards lie: per split its data set, split, sample
    count, classes and encoding (short side, codec, GOP: what the clips are made of)."""
    from preprocess import shard_format as fmt
    heads = {split: fmt.manifest_head(data / split / fmt.MANIFEST) for split in ("train", "test")}
    return {split: {k: h.get(k) for k in ("dataset", "split", "num_samples", "classes", "encoding", "shuffle_seed")}
            for split, h in heads.items()}


def stats(values: list[float]) -> dict:
    return {"mean": sum(values) / len(values), "spread": max(values) - min(values), "per_seed": values}


def markdown(summary: dict, models: dict, baseline_of: dict, seeds: list[int], command: str) -> str:
    """The results table: one row per model, mean (spread) per probe in %, gains against the matching random init."""
    def cell(probe_name, m, key="top1"):
        s = summary.get(probe_name, {}).get(m, {}).get(key)
        return f"{100 * s['mean']:.1f} ({100 * s['spread']:.1f})" if s else "–"

    def gain(probe_name, m):
        s, b = summary.get(probe_name, {}).get(m, {}).get("top1"), summary.get(probe_name, {}).get(
            baseline_of.get(m, m), {}).get("top1")
        return f"{100 * (s['mean'] - b['mean']):+.1f}" if s and b and m in baseline_of else ""

    lines = [f"Generated by `{command}` (seeds {', '.join(map(str, seeds))}; top-1 %, mean over seeds (spread = "
             "max - min); gain = points over the random init of the same backbone and clip; motion drop = kNN top-1 "
             "lost when every test clip is frozen to its middle frame).", "",
             "| model | clip | kNN | gain | linear | gain | fine-tune | gain | kNN without motion | motion drop |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m, spec in models.items():
        lines.append(f"| {spec['label']} | {spec['clip']} | {cell('knn', m)} | {gain('knn', m)} | {cell('linear', m)} "
                     f"| {gain('linear', m)} | {cell('finetune', m)} | {gain('finetune', m)} "
                     f"| {cell('knn', m, 'top1_static')} | {cell('knn', m, 'motion_drop')} |")
    return "\n".join(lines) + "\n"


def picture(path: Path, summary: dict, models: dict, baseline_of: dict, curves: dict) -> None:
    """Per probe: each objective's seeds (dots), mean (bar) and its random init's mean (line); the monitor's kNN."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    objectives = [m for m in models if m in baseline_of]
    probes = [p for p in PROBES if p in summary]
    fig, axes = plt.subplots(1, len(probes) + 1, figsize=(4.2 * (len(probes) + 1), 3.8))
    for ax, probe_name in zip(axes, probes):
        for i, m in enumerate(objectives):
            s, b = summary[probe_name].get(m, {}).get("top1"), summary[probe_name].get(baseline_of[m], {}).get("top1")
            if not s:
                continue
            ax.bar(i, 100 * s["mean"], color=f"C{i}", alpha=0.6)
            ax.plot([i] * len(s["per_seed"]), [100 * v for v in s["per_seed"]], "k.", ms=5)
            if b:
                ax.hlines(100 * b["mean"], i - 0.4, i + 0.4, colors="k", linestyles="--", lw=1.2)
        ax.set_xticks(range(len(objectives)), objectives, rotation=20)
        ax.set_title(f"{probe_name} top-1 (%)\n(dashed: random init, same backbone and clip)", fontsize=9)
    ax = axes[-1]
    for i, m in enumerate(objectives):
        for j, (seed, curve) in enumerate(sorted(curves.get(m, {}).items())):
            if curve:
                ax.plot(*zip(*[(s, 100 * v) for s, v in curve]), color=f"C{i}", alpha=0.8,
                        label=m if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_title("quality monitor: kNN top-1 (%) over training", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def readme_block_missing(readme: Path, name: str) -> str | None:
    """What is wrong when ``readme`` lacks the block NAME's markers (None: it has them)."""
    text = readme.read_text() if readme.is_file() else ""
    begin, end = (m.format(name=name) for m in MARKERS)
    return None if begin in text and end in text else f"{readme} has no {begin} ... {end} block to write the table into"


def splice_readme(readme: Path, table: str, name: str = "quality") -> None:
    problem = readme_block_missing(readme, name)
    if problem:
        raise SystemExit(problem)
    text = readme.read_text()
    begin, end = (m.format(name=name) for m in MARKERS)
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{table}{end}", text, count=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="labelled shard folder with train/ and test/ (default: the embedded "
                   "synthetic sample, made in --work)")
    p.add_argument("--objectives", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   help="objectives to pretrain, each with its recipe (default: all four)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2): pretraining, "
                   "random init and probes")
    p.add_argument("--steps", type=int, help="pretraining steps per run (default: each recipe's own epochs)")
    p.add_argument("--test-clips", type=int, default=3, help="clips per video of the probes' features (default 3)")
    p.add_argument("--finetune-epochs", type=int, default=10, help="epochs of the fine-tuning probe, the same for "
                   "every model (default 10; 0 = no fine-tuning probe)")
    p.add_argument("--finetune-seeds", type=int, default=2, help="fine-tune on the first N seeds only (default 2)")
    p.add_argument("--finetune-objectives", nargs="+", choices=list(RECIPES), help="fine-tune only these objectives "
                   "and their random inits (default: every objective run; fine-tuning is the probe that costs most)")
    p.add_argument("--work", type=Path, help="folder for data, runs and results, reused by a rerun (default: a temp "
                   "folder)")
    p.add_argument("--fresh", action="store_true", help="rerun the probes even where results exist in --work "
                   "(and --record)")
    p.add_argument("--record", type=Path, help="read and extend this folder of results (one small JSON per probe and "
                   "pretraining, with its settings; commit it): what it holds for the same settings is not rerun")
    p.add_argument("--from-record", action="store_true", help="run nothing: make the table from --record alone "
                   "(a table built over several sittings); what it lacks is listed and the command fails")
    p.add_argument("--report", type=Path, help="write quality.md (the table) and quality.png (the picture) here")
    p.add_argument("--readme", type=Path, help="write the table into this file between its <!-- BLOCK:begin --> and "
                   "<!-- BLOCK:end --> markers")
    p.add_argument("--block", default="quality", help="the README block's name (default quality)")
    p.add_argument("overrides", nargs="*", help="key=value pretraining config overrides, for every run")
    a = p.parse_args()
    if a.from_record and not a.record:
        p.error("--from-record needs --record DIR")
    if a.readme and readme_block_missing(a.readme, a.block):      # checked before hours of runs, not after
        p.error(readme_block_missing(a.readme, a.block) + ": add the two lines where the table should go, or name "
                "another block with --block")
    work = a.work or Path(tempfile.mkdtemp(prefix="quality-"))
    work.mkdir(parents=True, exist_ok=True)
    data = a.data or sample_shards(work / "sample", short_side=SAMPLE_SHORT_SIDE, **SAMPLE)
    base = ([] if a.data else SAMPLE_OVERRIDES) + ([f"max_steps={a.steps}"] if a.steps else []) + a.overrides

    from train.config import load_config
    record, identity = Record(a.record), data_identity(data) if a.record else None
    models, baseline_of, runs = {}, {}, {}       # model name -> spec; objective -> its random init's model name
    for obj in a.objectives:
        cfg = load_config(RECIPES[obj], [f"objective={obj}", *base])
        clip = (cfg["backbone"], cfg["backbone_width"], cfg["frames"], cfg["stride"], cfg["crop"])
        rand = f"random-{cfg['backbone']}-{cfg['frames']}x{cfg['stride']}-{cfg['crop']}"
        clip_text = f"{cfg['backbone']} x{cfg['backbone_width']}, {cfg['frames']}x{cfg['stride']}, {cfg['crop']}²"
        flags = ["--frames", str(cfg["frames"]), "--stride", str(cfg["stride"]), "--crop", str(cfg["crop"]),
                 "--test-clips", str(a.test_clips)]
        ft = ["--optimizer", "adam", "--lr", "0.001", "--lr-batch", "0", "--batch-size", str(cfg["batch_size"]),
              "--epochs", str(a.finetune_epochs), "--milestones", str(max(1, a.finetune_epochs * 4 // 5)),
              "--flip-p", str(cfg["flip_p"]), "--num-threads", str(cfg["num_threads"]), "--resume", "none"]
        models.setdefault(rand, {"label": f"random init ({cfg['backbone']})", "clip": clip_text, "flags": flags,
                                 "ft": ft, "spec": ["--random-init", "--backbone", clip[0], "--backbone-width",
                                                    str(clip[1])]})
        models[obj] = {"label": f"{obj} ({RECIPES[obj]}, {cfg['epochs'] if not a.steps else a.steps} "
                                f"{'epochs' if not a.steps else 'steps'})", "clip": clip_text, "flags": flags,
                       "ft": ft, "spec": None}
        baseline_of[obj], runs[obj] = rand, cfg

    tuned = set(a.finetune_objectives or a.objectives)
    tuned |= {baseline_of[o] for o in tuned if o in baseline_of}    # each fine-tuned objective's random init too
    results = {pr: {m: {} for m in models} for pr in PROBES}
    seconds: dict[str, list[float]] = {m: [] for m in a.objectives}
    curves: dict[str, dict[int, list]] = {m: {} for m in a.objectives}
    missing: list[str] = []                      # --from-record: entries the record lacks
    def settings(m: str, seed: int, pr: str | None = None) -> dict:
        """What a record entry depends on: the pretraining's resolved config (paths left out) or the random init's
        backbone, the seed, the data, and for a probe its flags."""
        source = ({k: v for k, v in runs[m].items() if k not in ("out_dir", "data", "monitor")}
                  if m in runs else models[m]["spec"])
        probe_flags = models[m]["flags"] + (models[m]["ft"] if pr == "finetune" else []) if pr else None
        return {"model": m, "source": source, "seed": seed, "data": identity, "probe": pr, "flags": probe_flags}

    for i, seed in enumerate(a.seeds):
        wanted = {m: [pr for pr in PROBES
                      if pr != "finetune" or (a.finetune_epochs and i < a.finetune_seeds and m in tuned)]
                  for m in models}
        for obj in a.objectives:
            run = work / "runs" / f"{obj}-s{seed}"
            done = None if a.fresh else record.get(f"{obj}-s{seed}-pretrain", settings(obj, seed))
            if a.from_record:                    # never pretrains: a missing entry is listed, its probes skipped
                if done is None:
                    missing.append(f"{obj}-s{seed}-pretrain")
                    continue
            elif done is None or any(record.get(f"{obj}-s{seed}-{pr}", settings(obj, seed, pr)) is None
                                     for pr in wanted[obj]):
                pretrain(RECIPES[obj], data, obj, seed, run, base)
                done = run_log(run)
                record.put(f"{obj}-s{seed}-pretrain", settings(obj, seed), done)
            seconds[obj].append(done["seconds"])
            curves[obj][seed] = [tuple(point) for point in done["monitor"]]
        for m, spec in models.items():
            model = spec["spec"] or ["--checkpoint", str(work / "runs" / f"{m}-s{seed}")]
            for pr in wanted[m]:
                r = None if a.fresh else record.get(f"{m}-s{seed}-{pr}", settings(m, seed, pr))
                if r is None and a.from_record:
                    missing.append(f"{m}-s{seed}-{pr}")
                    continue
                if r is None:
                    flags = spec["flags"] + (spec["ft"] if pr == "finetune" else [])
                    r = probe(pr, [*model, "--seed", str(seed)], data, work / "eval" / f"{m}-s{seed}-{pr}",
                              work / "cache", flags, a.fresh)
                    record.put(f"{m}-s{seed}-{pr}", settings(m, seed, pr), r)
                for key in ("top1", "top1_static", "motion_drop"):
                    if key in r:
                        results[pr][m].setdefault(key, []).append(r[key])

    if missing:
        sys.exit(f"error: --from-record: {a.record} lacks {len(missing)} entries for these settings: "
                 f"{', '.join(missing)}; run the same command without --from-record to make them")
    summary = {pr: {m: {k: stats(v) for k, v in d.items()} for m, d in per.items() if d}
               for pr, per in results.items() if any(per.values())}
    gains = {pr: {obj: {"minus_random": s[obj]["top1"]["mean"] - s[baseline_of[obj]]["top1"]["mean"],
                        "over_random": s[obj]["top1"]["mean"] / max(s[baseline_of[obj]]["top1"]["mean"], 1e-9),
                        "above_both_spreads": (s[obj]["top1"]["mean"] - s[baseline_of[obj]]["top1"]["mean"]
                                               > max(s[obj]["top1"]["spread"], s[baseline_of[obj]]["top1"]["spread"]))
                        if len(s[obj]["top1"]["per_seed"]) > 1 else None}   # one seed has no spread to beat
                  for obj in a.objectives if obj in s} for pr, s in summary.items()}
    command = "python benchmarks/quality.py " + " ".join(
        (["--data", str(a.data)] if a.data else []) + (["--objectives", *a.objectives] if a.objectives != list(RECIPES)
                                                       else []) + ["--seeds", *map(str, a.seeds)]
        + (["--steps", str(a.steps)] if a.steps else []) + ["--finetune-epochs", str(a.finetune_epochs),
                                                            "--finetune-seeds", str(a.finetune_seeds)]
        + (["--finetune-objectives", *a.finetune_objectives] if a.finetune_objectives else [])
        + (["--record", str(a.record)] if a.record else []) + a.overrides)
    table = markdown(summary, models, baseline_of, a.seeds, command)
    print(f"\nquality on {data}, seeds {a.seeds} (top-1 %, mean over seeds (spread))\n")
    print(table)
    if a.report:
        a.report.mkdir(parents=True, exist_ok=True)
        (a.report / f"{a.block}.md").write_text(table)
        picture(a.report / f"{a.block}.png", summary, models, baseline_of, curves)
    if a.readme:
        splice_readme(a.readme, table, a.block)
    print(json.dumps({"benchmark": "quality", "data": str(data), "recipes": {o: RECIPES[o] for o in a.objectives},
                      "overrides": base, "steps": a.steps, "seeds": a.seeds, "test_clips": a.test_clips,
                      "finetune_epochs": a.finetune_epochs, "finetune_seeds": a.seeds[:a.finetune_seeds],
                      "finetune_models": sorted(tuned),
                      "baseline_of": baseline_of,
                      "pretrain_seconds": seconds,
                      "monitor_knn": {m: {str(s): c for s, c in v.items()} for m, v in curves.items()},
                      "top1": summary, "gain": gains}))


if __name__ == "__main__":
    main()
