"""Running the checks: the one ordered list of them, the runner that turns Skip/Fail into rows, and the report
(the table, then one JSON line)."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import sys
import textwrap
import time
import traceback
from pathlib import Path

from preprocess.shard_format import atomic_write

from . import data, decode, dist, env, training
from .core import CHECKS, FAIL, FRAME_TOL_MEAN, FRAME_TOL_P99, LOSS_RTOL, PASS, SKIP, WARN, Fail, Result, Skip
from .facts import Facts

# check name -> function(facts) -> Result, in the order they run: the all-reduce first (every rank must join
# it), then each check before those that reuse its facts (data.read and env.disk want the measured step)
RUN_ORDER = {
    "dist.allreduce": dist.check_allreduce,
    "env.python": env.check_python, "env.torch": env.check_torch, "env.dali": env.check_dali,
    "env.driver": env.check_driver, "env.gpus": env.check_gpus, "env.ffmpeg": env.check_ffmpeg,
    "env.shm": env.check_shm,
    "data.shards": data.check_shards, "data.samples": data.check_samples,
    "decode.codec": decode.check_codec, "decode.cache": decode.check_cache, "decode.cpu": decode.check_cpu,
    "decode.gpu": decode.check_gpu, "decode.match": decode.check_match,
    "train.step": training.check_step, "train.bf16": training.check_bf16, "train.batch": training.check_batch,
    "data.read": data.check_read,
    "env.disk": env.check_disk,
}
assert set(RUN_ORDER) == set(CHECKS)


def run(facts: Facts, json_path: str | None = None) -> int:
    """Run the selected checks in RUN_ORDER, print the report (local rank 0 of each node) and return the exit
    status: 1 when a check FAILed, else 0."""
    t_start = time.perf_counter()
    torchrun = "RANK" in os.environ
    for name, check in RUN_ORDER.items():
        if name in facts.selected and (name == "dist.allreduce" or not torchrun or facts.local_rank == 0):
            facts.results[name] = run_check(name, check, facts)
    if torchrun and facts.local_rank != 0:   # the node's checks run on local rank 0
        r = facts.results.get("dist.allreduce")
        if r and r.status == FAIL:
            print(f"rank {facts.rank}: dist.allreduce FAIL: {r.figure}: {r.fix}", file=sys.stderr)
            return 1
        return 0
    compare_decode_with_training(facts)
    failed = [r.name for r in facts.results.values() if r.status == FAIL]
    code = 1 if failed else 0
    report = {
        "doctor": 1, "ok": not failed, "exit_code": code, "failed": failed,
        "host": socket.gethostname(), "rank": facts.rank, "world_size": facts.world,
        "cpus": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()[0],
        "elapsed_s": round(time.perf_counter() - t_start, 2),
        "config": {"preset": facts.preset, **{k: facts.cfg[k] for k in (
            "data", "backend", "objective", "backbone", "frames", "stride", "crop", "batch_size", "precision",
            "channels_last", "num_threads", "out_dir")}, "run_backend": facts.run_backend},
        "samples": facts.n_samples, "memory_limit_gib": facts.memory_limit_gib,
        "tolerances": {"frames_mean_abs_0_255": FRAME_TOL_MEAN, "frames_p99_abs_0_255": FRAME_TOL_P99,
                       "loss_rtol": LOSS_RTOL},
        "checks": {k: facts.results[k].to_json() for k in CHECKS if k in facts.results},
    }
    print_table(report, facts.results)
    print(json.dumps(report, separators=(",", ":"), default=str), flush=True)
    if json_path:
        path = Path(json_path)
        if torchrun and facts.rank != 0:     # one file per node (local rank 0 of each)
            path = path.with_name(f"{path.stem}.rank{facts.rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(report, indent=1, default=str) + "\n")
    return code


def run_check(name: str, check, facts: Facts) -> Result:
    """One check's row: what it returned, or SKIP/FAIL from what it raised. A check never takes the others down:
    an unexpected error is its FAIL, with the traceback on stderr."""
    t0 = time.perf_counter()
    try:
        res = check(facts)
    except Skip as e:
        res = Result(name, SKIP, fix=str(e))
    except Fail as e:
        figure, fix, measured = (e.args + ("", "", {}))[:3]
        res = Result(name, FAIL, figure, fix, dict(measured))
    except Exception as e:
        traceback.print_exc(file=sys.stderr)
        res = Result(name, FAIL, f"{type(e).__name__}: {e}",
                     "unexpected error (traceback on stderr): fix the cause above, or report it with that trace")
    res.name = name
    res.seconds = time.perf_counter() - t0
    return res


def compare_decode_with_training(facts: Facts) -> None:
    """Decode speed against what a training step consumes, once both are measured (decode runs before the step):
    the run backend's decode row turns WARN when it is slower."""
    run = facts.computed("main_step")
    if not (run and run.get("ok")):
        return
    need, basis = facts.decode_need(facts.run_backend)
    r = facts.results.get(f"decode.{facts.run_backend}")
    if r and r.status == PASS and "videos_per_s" in r.measured:
        r.measured["need_videos_per_s"] = need
        if r.measured["videos_per_s"] < need:
            r.status = WARN
            r.fix = (f"decoding ({r.measured['videos_per_s']:.1f} videos/s) is slower than training consumes "
                     f"({need:.1f}: {basis}): raise num_threads" +
                     (", or train with backend=gpu (NVDEC)" if facts.run_backend == "cpu" else
                      "; re-shard with a shorter GOP (--gop) or one --size"))
        else:
            r.figure += f"; training consumes {need:.3g} videos/s"


def print_table(report: dict, results: dict[str, Result]) -> None:
    rows = [(k, r.status, r.figure, r.fix) for k, r in ((k, results[k]) for k in CHECKS if k in results)]
    width = max(100, shutil.get_terminal_size((160, 20)).columns)
    fig_w = max(66, int((width - 26) * 0.55))
    fix_w = max(40, width - 16 - 7 - fig_w - 3)
    cfg = report["config"]
    print(f"motionpretrain doctor on {report['host']}: {cfg['objective']}/{cfg['backbone']} "
          f"{cfg['frames']}x{cfg['crop']}^2, batch {cfg['batch_size']}, {cfg['precision']}, backend "
          f"{cfg['backend']} (runs as {cfg['run_backend']}), data={cfg['data'] or '(none)'}, N={report['samples']}; "
          f"CPU load {report['load_avg']:.1f} on {report['cpus']} cores")
    print(f"{'check':<16}{'status':<7}{'measured':<{fig_w}} | what to do")
    print("-" * min(width, 16 + 7 + fig_w + 3 + fix_w))
    for name, status, figure, fix in rows:
        f_lines = textwrap.wrap(figure, fig_w) or [""]
        x_lines = textwrap.wrap(fix, fix_w) or [""]
        for i, (a, b) in enumerate(itertools.zip_longest(f_lines, x_lines, fillvalue="")):
            head = f"{name:<16}{status:<7}" if i == 0 else " " * 23
            print(f"{head}{a:<{fig_w}} | {b}".rstrip())
    counts = {s: sum(r[1] == s for r in rows) for s in (PASS, WARN, FAIL, SKIP)}
    verdict = "FAILED: the run as configured would not work (see FAIL rows)" if counts[FAIL] else "ok"
    print(f"{counts[PASS]} pass, {counts[WARN]} warn, {counts[FAIL]} fail, {counts[SKIP]} skipped in "
          f"{report['elapsed_s']:.1f} s: {verdict}")
