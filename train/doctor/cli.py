"""The doctor's command line: arguments, the --only/--skip selection, then the run over one Facts."""
from __future__ import annotations

import argparse
import sys

from ..config import ConfigError, load_config, presets
from .core import CHECKS, GROUPS
from .facts import Facts
from .run import run


def build_parser() -> argparse.ArgumentParser:
    checks = "\n".join(f"  {k:<15} {v}" for k, v in CHECKS.items())
    p = argparse.ArgumentParser(
        prog="python -m train doctor", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Preflight: run the recipe's real path (shards, DALI decode, a training step, an all-reduce) "
                    "on a few samples and say what is wrong and what to do.\n"
                    "Exit status: 0 = no FAIL, 1 = a check the run needs failed, 2 = bad arguments or config.\n"
                    "Under torchrun (or docker/entrypoint.sh doctor) it also checks the all-reduce across ranks.",
        epilog=f"checks (--only/--skip take these names or the groups {', '.join(GROUPS)}):\n{checks}\n\n"
               f"presets: {', '.join(presets())}; config keys: see `python -m train --help`.")
    p.add_argument("--config", default=None, help="a preset name or a YAML file, as for `python -m train`")
    p.add_argument("--samples", type=int, default=8, metavar="N", help="samples to read and decode (default 8)")
    p.add_argument("--only", action="append", default=[], metavar="A,B", help="run only these checks or groups")
    p.add_argument("--skip", action="append", default=[], metavar="A,B", help="leave out these checks or groups")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the JSON report here")
    p.add_argument("--memory-limit-gib", type=float, default=None, metavar="X",
                   help="memory budget for train.batch (GiB): simulates a device of this size (default: the "
                        "GPU's memory, or the available RAM on a CPU)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data=OUT/train")
    return p


def select(only: list[str], skip: list[str]) -> list[str]:
    """Check names from --only/--skip (comma lists of check or group names); ValueError for unknown names."""
    def expand(items):
        names = []
        for item in items:
            for part in filter(None, (s.strip() for s in item.split(","))):
                if part in CHECKS:
                    names.append(part)
                elif part in GROUPS:
                    names += [k for k in CHECKS if k.startswith(part + ".")]
                else:
                    raise ValueError(f"unknown check {part!r}; checks: {', '.join(CHECKS)}; groups: {', '.join(GROUPS)}")
        return names
    chosen = set(expand(only)) if only else set(CHECKS)
    chosen -= set(expand(skip))
    return [k for k in CHECKS if k in chosen]


def main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    try:         # a ConfigError is a ValueError: every bad argument exits 2 with its message
        cfg = load_config(args.config, args.overrides)
        selected = select(args.only, args.skip)
        if args.samples < 1:
            raise ValueError("--samples must be at least 1")
        if args.memory_limit_gib is not None and args.memory_limit_gib <= 0:
            raise ValueError("--memory-limit-gib must be positive")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    facts = Facts(cfg, selected, samples=args.samples, memory_limit_gib=args.memory_limit_gib, preset=args.config)
    return run(facts, json_path=args.json)
