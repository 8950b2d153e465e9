"""`python -m train`: the pretraining command (see --help)."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError, describe, load_config, presets


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Self-supervised video pretraining (FIMA, MoCo, FAME) on shards from `python -m preprocess`.\n"
                    "Preflight:   python -m train doctor --config PRESET [key=value ...]  (checks a machine first)\n"
                    "One process: python -m train --config demo\n"
                    "8 GPUs:      torchrun --nproc-per-node=8 -m train --config k400_i3d_fima data=shards/k400/train\n"
                    "Nodes:       torchrun --nnodes=N --nproc-per-node=8 --rdzv-backend=c10d "
                    "--rdzv-endpoint=HOST:29500 -m train ...",
        epilog=f"presets (configs/*.yaml): {', '.join(presets())}\n\nconfig keys (key=value overrides; default, meaning):\n"
               + describe())
    p.add_argument("--config", default=None, help="a preset name (see below) or a YAML file; overrides come after")
    p.add_argument("--resume", default="auto",
                   help="auto: continue from the newest valid checkpoint in out_dir/checkpoints (a corrupt one is "
                        "skipped with a warning); none: start fresh; or a checkpoint path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. batch_size=16 lr=0.02")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:   # the preflight check: python -m train doctor --help
        from .doctor import main as doctor_main
        return doctor_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg, sort_keys=False), end="")
        return 0
    if not cfg["data"]:
        print("error: no data: set data=OUT/train (a shard set from `python -m preprocess`)", file=sys.stderr)
        return 2
    from .loop import TrainingError   # heavy imports only when training
    from .trainer import train
    try:
        return train(cfg, args.resume, progress=not args.no_progress)
    except (TrainingError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
