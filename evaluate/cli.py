"""`python -m evaluate {finetune,linear,retrieval,cam}`: the downstream protocols (see --help of each)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .protocols import KEYS, PRESETS

COMMANDS = {
    "finetune": "fine-tune backbone + dropout + linear on the train split; top-1/top-5 on the test split (last epoch)",
    "linear": "linear probe on frozen, cached clip features; top-1/top-5 with the same test protocol",
    "retrieval": "nearest-neighbour retrieval, test videos query the train gallery; Recall@1/5/10/20/50",
    "knn": "weighted k-nearest-neighbour classification on frozen, L2-normalised video features (the same cache as "
           "linear and retrieval); top-1/top-5",
    "cam": "class-agnostic activation maps overlaid on frames: PNG grids and MP4/GIF for a list of videos",
    "compare": "print results.json files side by side, each against the random-init result of the same command",
    "export": "write the backbone as safetensors plus a model card (objective, config, data manifest hash, steps, "
              "evaluation results) that --checkpoint accepts back",
    "temporal": "temporal-order accuracy (forward vs time-reversed clips, bias-free linear head on frozen pooled "
                "features) and that head's maps overlaid on frames",
}

EXAMPLES = """examples:
  python -m evaluate linear    --checkpoint runs/fima/checkpoints/ckpt-00001000.pt --data shards/ucf101
  python -m evaluate retrieval --checkpoint runs/fima/checkpoints/ckpt-00001000.pt --data shards/ucf101
  python -m evaluate knn       --checkpoint runs/fima --data shards/ucf101 --knn-k 20
  python -m evaluate finetune  --checkpoint CKPT --data shards/hmdb51 --protocol coclr
  torchrun --nproc-per-node=8 -m evaluate finetune --checkpoint CKPT --data shards/ucf101
  python -m evaluate cam       --checkpoint CKPT --data shards/ucf101 --videos 0 17 v_Archery_g01_c01
  python -m evaluate temporal  --checkpoint runs/multilevel --data shards/ucf101 --protocol coclr
  python -m evaluate linear    --random-init --backbone i3d --data shards/ucf101     # the random-init baseline
  python -m evaluate finetune  --checkpoint CKPT --data OUT --epochs 2 --batch-size 4 --crop 48 --test-clips 2
                                                    # a CPU smoke run: every value of the preset can be overridden

--data OUT reads OUT/train and OUT/test (from `python -m preprocess SRC OUT`; UCF101/HMDB51 split 1-3 and
Diving48 are chosen when sharding: --format ucf101|hmdb51|diving48 --split N). Results: OUT_DIR/results.json,
TensorBoard scalars in OUT_DIR/tb, and a table on stdout."""


EXPORT_EXAMPLE = """example:
  python -m evaluate export --checkpoint runs/ucf101_i3d_fima --out fima-ucf101-i3d
  python -m evaluate linear --checkpoint fima-ucf101-i3d --data shards/hmdb51      # a colleague, with that folder"""


def _preset_default(key: str, command: str) -> str:
    vals = []
    for name, p in PRESETS.items():
        v = p.get(command, {}).get(key, p.get(key))
        if v is None:
            v = {"frames": "checkpoint's", "stride": "checkpoint's", "crop": "checkpoint's",
                 "dropout": "by dataset"}.get(key, "-")
        vals.append(f"{name}: {v}")
    return "; ".join(vals)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evaluate", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Evaluate a pretrained video backbone with the protocols the field "
                                            "reports.\n\n" + "\n".join(f"  {k:<10} {v}" for k, v in COMMANDS.items()),
                                epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for cmd, text in COMMANDS.items():
        if cmd == "compare":
            sp = sub.add_parser(cmd, help=text, description=f"{text}.")
            sp.add_argument("results", nargs="+", type=Path, metavar="RESULTS",
                            help="results.json files or the --out folders holding them")
            continue
        if cmd == "export":
            sp = sub.add_parser(cmd, help=text, description=f"{text}.", epilog=EXPORT_EXAMPLE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
            sp.add_argument("--checkpoint", metavar="CKPT", required=True, help="checkpoint of `python -m train` or "
                            "`python -m evaluate finetune`, or a run folder (its newest checkpoint)")
            sp.add_argument("--out", metavar="DIR", type=Path, help="output folder (default: <run or file name>-export)")
            sp.add_argument("--results", metavar="JSON", nargs="+", type=Path, help="results.json files to put in the "
                            "model card besides those found under the run folder's eval/")
            continue
        sp = sub.add_parser(cmd, help=text, description=f"{text}.\n\nProtocol presets (--protocol):\n"
                            + "\n".join(f"  {n}: {pr['note']}" for n, pr in PRESETS.items()),
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES)
        g = sp.add_argument_group("model")
        g.add_argument("--checkpoint", metavar="CKPT", help="checkpoint of `python -m train` (the query encoder is "
                       "evaluated) or of `python -m evaluate finetune`; a run folder means its newest checkpoint")
        g.add_argument("--random-init", action="store_true", help="the random-init baseline: no checkpoint, a seeded "
                       "randomly initialised --backbone")
        g.add_argument("--backbone", metavar="NAME", help="i3d, r3d18 or r2plus1d18: with --random-init (default i3d); "
                       "with a checkpoint, only checked against the one it was trained with")
        g.add_argument("--backbone-width", metavar="W", type=float, help="channel-width multiplier of the "
                       "--random-init baseline (default 1.0; match the pretraining run's backbone_width); a "
                       "checkpoint brings its own")
        g = sp.add_argument_group("data and output")
        g.add_argument("--data", metavar="OUT", help="shard folder holding train/ and test/ (`python -m preprocess SRC OUT`)")
        g.add_argument("--train", metavar="DIR", help="train shard set (instead of --data)")
        g.add_argument("--test", metavar="DIR", help="test shard set (instead of --data)")
        g.add_argument("--out", metavar="DIR", type=Path, help="results folder (default: RUN/eval/<dataset>-<command> "
                       "next to the checkpoint's run folder, or runs/eval-random-<backbone>/<dataset>-<command>)")
        if cmd in ("linear", "retrieval", "knn", "temporal"):
            g.add_argument("--cache-dir", metavar="DIR", type=Path, help="feature cache (default $EVAL_CACHE or "
                           "~/.cache/motionpretrain/eval-features); keyed by weights, data and sampling settings, "
                           "shared by linear, retrieval and knn")
            g.add_argument("--no-cache", action="store_true", help="extract features without reading or writing the cache")
        g = sp.add_argument_group("protocol (every value overrides the preset)")
        g.add_argument("--protocol", default="fima", choices=sorted(PRESETS),
                       help="preset: fima (FAME/FIMA recipe, default) or coclr (the CoCLR recipe)")
        for key, (typ, help_text, cmds) in KEYS.items():
            if cmd in cmds:
                g.add_argument(f"--{key.replace('_', '-')}", type=typ, default=None, dest=key,
                               help=f"{help_text} [{_preset_default(key, cmd)}]")
        if cmd == "finetune":
            g.add_argument("--resume", default="auto", help="auto: continue from the newest checkpoint in OUT_DIR/"
                           "checkpoints (if its settings match); none: start fresh; or a checkpoint path")
        if cmd in ("cam", "temporal"):
            g = sp.add_argument_group("activation maps")
            g.add_argument("--split", default="test", choices=("train", "test"), help="which shard set the videos "
                           "come from (default test; for cam it may be unlabelled)")
            g.add_argument("--videos", nargs="+", metavar="KEY|INDEX", help="videos by sample index or key (or a "
                           "unique key prefix); default: the first video of each class, up to 8")
            if cmd == "cam":
                g.add_argument("--map", default="mean", choices=("mean", "norm"),
                               help="channel mean (default) or channel L2 norm of the last feature map")
            else:
                g.add_argument("--map-clips", type=int, default=1, help="uniformly spaced clips drawn per video "
                               "(default 1: the middle window); the accuracy uses --test-clips")
            g.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the heat map (default 0.5)")
            g.add_argument("--grid-frames", type=int, default=8, help="frames per row in the PNG grid (default 8)")
            g.add_argument("--tile", type=int, default=None,
                           help="tile side in pixels (default: the crop size, at least 112)")
            g.add_argument("--movie", default="mp4", choices=("mp4", "gif", "none"), help="movie format (default mp4)")
            g.add_argument("--fps", type=int, default=8, help="movie frame rate (default 8)")
        g = sp.add_argument_group("system")
        g.add_argument("--backend", default="auto", choices=("auto", "gpu", "cpu"),
                       help="auto: GPU (DALI NVDEC, bf16) when CUDA is available, else CPU")
        g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                       help="auto: bf16 autocast on a GPU, fp32 on a CPU")
        g.add_argument("--num-threads", type=int, default=0, help="DALI CPU threads per rank (0: the cores per rank)")
        g.add_argument("--seed", type=int, default=0, help="seed of the random init, head init, sampling and shuffles")
        g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def default_out(info: dict, command: str, dataset: str) -> Path:
    name = f"{dataset or 'data'}-{command}"
    if info["path"]:
        ckpt = Path(info["path"])
        run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent / f"{ckpt.stem}-eval"
        return run / "eval" / name
    return Path("runs") / f"eval-random-{info['backbone']}" / name


def run(args: argparse.Namespace) -> int:
    from .backbone import EvalError, load_backbone
    from .context import Context, make_runtime
    from .data import open_splits, resolve_dirs
    from .features import DEFAULT_CACHE
    from .protocols import resolve

    cmd = args.command
    if cmd in ("export", "compare"):
        from importlib import import_module
        return import_module(f"evaluate.{cmd}").run(args)
    if args.random_init and args.checkpoint:
        raise EvalError("--random-init and --checkpoint exclude each other")
    need = (args.split,) if cmd == "cam" else ("train", "test")
    dirs = resolve_dirs(args.data, args.train if cmd != "cam" or args.split == "train" else None,
                        args.test if cmd != "cam" or args.split == "test" else None, need)
    splits = open_splits(dirs, labelled=cmd not in ("cam", "temporal"))   # cheap checks first: shards, labels, classes
    backbone, info = load_backbone(args.checkpoint, args.backbone, args.random_init, args.seed, args.backbone_width)
    dataset = next(iter(splits.values())).dataset
    flags = {k: getattr(args, k) for k in KEYS if hasattr(args, k)}
    s = resolve(cmd, args.protocol, flags, info["pretrain"], info["backbone"], dataset)
    s |= {"protocol": args.protocol, "seed": args.seed}
    rt = make_runtime(args.backend, args.precision, args.num_threads, not args.no_progress)
    cache = None
    if cmd in ("linear", "retrieval", "knn", "temporal") and not args.no_cache:
        cache = args.cache_dir or DEFAULT_CACHE
    extra = {k: getattr(args, k) for k in ("resume", "split", "videos", "map", "map_clips", "alpha", "grid_frames", "tile",
                                           "movie", "fps") if hasattr(args, k)}
    ctx = Context(cmd, s, backbone, info, splits, rt, args.out or default_out(info, cmd, dataset), cache, extra)
    if rt.d.is_main:
        shown = {k: v for k, v in s.items() if k in KEYS or k in ("protocol", "seed")}
        print(f"{cmd}: {info['backbone']} from {info['path'] or 'random init (seed %d)' % args.seed}; "
              f"{', '.join(f'{n} {sp.num_videos} videos' for n, sp in splits.items())}; settings {shown}")
    from importlib import import_module
    try:
        return import_module(f"evaluate.{cmd}").run(ctx)
    finally:
        from train import distributed as D
        D.cleanup()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from pipeline import CodecError
    from .backbone import EvalError
    try:
        return run(args)
    except (EvalError, CodecError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:   # settings (protocols.resolve) and loader arguments
        print(f"error: {e}", file=sys.stderr)
        return 2
