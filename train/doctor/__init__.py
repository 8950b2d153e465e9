"""`python -m train doctor`: the preflight. Proves that a machine (or a cluster node) can run a recipe, on its
own data, in a minute or two, by running the real code path on a few samples, not just listing versions.

    python -m train doctor --config k400_i3d_fima [key=value ...] [--samples N] [--only a,b] [--skip a,b]
                           [--json PATH] [--memory-limit-gib X]
    torchrun --nproc-per-node=8 -m train doctor --config k400_i3d_fima        # + the all-reduce across ranks

It takes the trainer's `--config` and `key=value` overrides (an unknown key is the trainer's config error,
exit 2), prints a table (check, status, measured figure, what to do) and then one JSON line with every
measured figure (also written to `--json PATH`). Exit status: 0 when no check FAILs, 1 when one does (FAIL
means the run as configured would not work; WARN means it would, slower or riskier), 2 for bad arguments.

Under torchrun every rank runs the all-reduce first; then local rank 0 of each node runs the other checks
on that node (its GPU 0, its filesystem) and prints the table; the other ranks exit with their all-reduce
status. Without a GPU the GPU checks report SKIP with the reason (FAIL where the configured backend needs one).

Where things are: `core.py` the vocabulary (check names and what each checks, statuses, tolerances, `Result`,
`Skip`, `Fail`); `facts.py` the one object every check looks at, `Facts`: the config, and each fact computed the
first time a check asks and then kept (the shard set, the sampled samples, decoded batches, the objective, its
training steps); `env.py`, `data.py`, `decode.py`, `training.py`, `dist.py` the checks, each a plain function
`check_x(facts) -> Result` that raises `Skip` or `Fail` when it does not PASS; `run.py` `RUN_ORDER`, the one
ordered list of the checks, the runner that turns their exceptions into rows, and the report; `cli.py` the
arguments.
"""
from __future__ import annotations

from .cli import build_parser, main, select
from .core import CHECKS, GROUPS, Result
from .facts import Facts
from .run import RUN_ORDER, run

__all__ = ["CHECKS", "GROUPS", "RUN_ORDER", "Facts", "Result", "build_parser", "main", "run", "select"]
