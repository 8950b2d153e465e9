"""train.*: the trainer's own step (train/recipe.py) on the configured objective: loss, time, memory, bf16 vs fp32,
the largest batch; each a function of the Facts (which run and keep the steps).

On a CPU the training step runs at batch 2 (a batch-8 FIMA step takes tens of seconds on two cores; batch 1 would
leave BatchNorm one value on small feature maps) and a forward at batch 1 (or 3) gives the second point of the memory
fit: the step time at the configured batch is extrapolated linearly, and memory is estimated from what the step
allocates (weights, gradients, SGD momentum, inputs, and the tensors autograd saves for backward, measured with
saved_tensors_hooks), fitted linearly in the batch size; `--memory-limit-gib` simulates a device of that size. On a
GPU both come from real steps at the configured batch (torch.cuda.max_memory_allocated), and the largest batch is
searched by running it. bf16 on a CPU runs under CPU autocast without channels_last_3d (a GPU layout); there a
non-finite or disagreeing bf16 loss is only a WARN unless this CPU is what trains in bf16. Losses are compared per
term (tolerance 5% of max(1, |fp32|)); a term behind a discrete selection (FIMA's dense term: a median-thresholded
foreground mask) is left out of the comparison when its selection count differs.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from .core import PASS, WARN, LOSS_RTOL, GiB, Skip, Fail, Result, gib, mib
from .facts import Facts


def gpu_memory_limit(total: int, limit_gib: float | None, dali_bytes: int, name: str = "GPU") -> tuple[int, str]:
    """(bytes the training step may use, how that was worked out): the GPU's memory (or a smaller
    --memory-limit-gib) less what DALI holds on the same GPU while it feeds the run (its memory pool, NVDEC
    surfaces: measured by decode.gpu), which the training step's own peak does not include."""
    limit = min(total, limit_gib * GiB) if limit_gib else total
    source = f"--memory-limit-gib {limit_gib:g}" if limit_gib and limit_gib * GiB < total else f"{name} memory"
    if dali_bytes > 0:
        limit = max(0, limit - dali_bytes)
        source += f" less {gib(dali_bytes)} held by DALI's GPU pipeline"
    return int(limit), source


def check_step(facts: Facts) -> Result:
    gpu, B, prec, cl, sizes = facts.plan
    r = facts.main_step
    if r["oom_at"] or r.get("oom"):
        raise Fail(f"batch_size={B} ({prec}) does not fit on {facts.torch.cuda.get_device_name(facts.device)}"
                   + (f"; batch {r['batch']} does" if r.get("ok") else ""),
                   "lower batch_size (train.batch says the largest that fits), or crop/frames")
    if not r["ok"]:
        print(r.get("traceback", ""), file=sys.stderr)
        raise Fail(r.get("error", "the step failed"), "the configured objective does not train here: see the "
                   "traceback on stderr; try precision=fp32 to tell numerics from code problems")
    layout = "channels_last_3d" if cl else "contiguous"
    fig = (f"{prec} {layout}, batch {r['batch']} ({r['inputs']}): loss {r['loss']:.4g}, step {r['time_s']:.2f} s, "
           f"{r['batch'] / r['time_s']:.2f} videos/s, peak {gib(r['peak_bytes'])}")
    m = {k: r[k] for k in ("batch", "precision", "channels_last", "loss", "terms", "time_s", "peak_bytes",
                           "peak_source", "inputs")}
    m["videos_per_s"] = r["batch"] / r["time_s"]
    if r["batch"] != B:
        est = r["time_s"] * B / r["batch"]
        m["step_s_at_batch_size_estimate"] = est
        fig += f"; ~{est:.1f} s at batch {B} (linear)"
    if not r["finite"]:
        raise Fail(fig, f"non-finite loss in {prec}: try precision=fp32; if that is finite, keep fp32 or lower lr; "
                   "if not, inspect the data (decode.cpu) and the config", m)
    return Result("", PASS, fig, measured=m)


def check_bf16(facts: Facts) -> Result:
    gpu, B, prec, cl, sizes = facts.plan
    torch = facts.torch
    size = sizes[0]
    if gpu and not torch.cuda.is_bf16_supported():
        status_fix = "this GPU has no bf16: set precision=fp16 (autocast + grad scaler) or fp32"
        if prec == "bf16":
            raise Fail(f"{torch.cuda.get_device_name(facts.device)}: no bf16 support", status_fix)
        raise Skip(f"{torch.cuda.get_device_name(facts.device)} has no bf16 support (the run uses {prec})")
    if gpu:
        main = facts.main_step
        size = main["batch"] if main.get("ok") else size
    while True:
        ref = facts.step(size, "fp32", False)
        low = facts.step(size, "bf16", gpu)      # + channels_last_3d on a GPU
        if not (ref.get("oom") or low.get("oom")) or size == 1:
            break
        size //= 2                               # fp32 needs more memory than the run's bf16
    for r in (ref, low):
        if not r["ok"]:
            if r.get("oom"):
                raise Fail(f"{r['precision']} at batch {size}: out of memory", "lower batch_size (see train.batch)")
            print(r.get("traceback", ""), file=sys.stderr)
            raise Fail(f"{r['precision']}: {r.get('error')}", "see the traceback on stderr")
    f, b = ref["terms"], low["terms"]
    # A term behind a discrete selection (FIMA's dense term: foreground cells above the median, positives by
    # a distance threshold; its count is the metric dense_pos_cells) jumps when bf16 moves a value across
    # the threshold: when such a count differs, that term and the total are not compared, the others are.
    flipped = [k for k in f if not k.startswith(("loss", "acc")) and k in b and f[k] != b[k]]
    excluded = {"loss"} | {f"loss_{k.split('_')[0]}" for k in flipped} if flipped else set()
    compared = [k for k in f if k.startswith("loss") and k in b and k not in excluded] or ["loss"]
    diffs = {k: abs(b[k] - f[k]) for k in compared}
    tols = {k: LOSS_RTOL * max(1.0, abs(f[k])) for k in compared}
    worst = max(compared, key=lambda k: diffs[k] / tols[k])
    layout = " + channels_last_3d" if gpu else " (CPU autocast, contiguous)"
    inside = sum(diffs[k] <= tols[k] for k in compared)
    fig = (f"batch {size}: loss fp32 {ref['loss']:.4f} ({ref['time_s']:.2f} s), bf16{layout} {low['loss']:.4f} "
           f"({low['time_s']:.2f} s); {inside} of {len(compared)} loss terms within {LOSS_RTOL:.0%} of "
           f"max(1, |fp32|), worst {worst} |diff| {diffs[worst]:.4f} (tolerance {tols[worst]:.4f})")
    if flipped:
        fig += ("; not compared: " + ", ".join(sorted(excluded)) + " (" +
                ", ".join(f"{k} {f[k]:.3g} vs {b[k]:.3g}" for k in flipped) + ": a discrete selection flipped)")
    m = {"batch": size, "fp32_loss": ref["loss"], "bf16_loss": low["loss"], "compared": compared,
         "abs_diff": diffs, "tolerance": tols, "not_compared": sorted(excluded), "fp32_s": ref["time_s"],
         "bf16_s": low["time_s"], "bf16_channels_last_3d": gpu, "fp32_terms": f, "bf16_terms": b}
    needs_bf16 = prec == "bf16" and (gpu or facts.run_backend == "cpu")    # this device trains in bf16
    if not all(math.isfinite(v) for v in f.values()):
        raise Fail(fig, "the fp32 loss is not finite: the model or the data is broken here (see train.step)", m)
    if not all(math.isfinite(v) for v in b.values()):
        fix = "bf16 gives a non-finite loss: use precision=fp32 (or fp16 with its grad scaler) on this device"
        if needs_bf16:
            raise Fail(fig, fix, m)
        return Result("", WARN, fig, fix + " (the run does not use bf16 here)", m)
    if diffs[worst] > tols[worst]:
        return Result("", WARN, fig, f"bf16 and fp32 disagree on {worst} more than expected: train with "
                      "precision=fp32 for a few steps and compare the logged losses", m)
    return Result("", PASS, fig, measured=m)


def check_batch(facts: Facts) -> Result:
    torch = facts.torch
    gpu, B, prec, cl, sizes = facts.plan
    main = facts.main_step
    dali_bytes = 0
    if gpu:
        total = torch.cuda.get_device_properties(facts.device).total_memory
        dali_bytes = facts.dali_gpu_bytes
        limit, source = gpu_memory_limit(total, facts.memory_limit_gib, dali_bytes,
                                          torch.cuda.get_device_name(facts.device))
    elif facts.memory_limit_gib:
        limit, source = facts.memory_limit_gib * GiB, f"--memory-limit-gib {facts.memory_limit_gib:g}, simulated"
    else:
        limit, source = _available_ram(), "available RAM"
    if not main.get("ok"):
        raise Fail("no training step succeeded", "see train.step")
    b_main = main["batch"]
    b_other = sizes[1] if b_main == sizes[0] and sizes[1] != b_main else b_main // 2 if b_main > 1 else 2
    other = facts.step(b_other, prec, cl, backward=gpu)   # CPU: the estimate needs only the forward
    if not other.get("ok") and not other.get("oom") and b_other < b_main:   # e.g. BatchNorm at batch 1
        other = facts.step(b_main + 1, prec, cl, backward=gpu)
    points = {r["batch"]: r for r in (main, other) if r.get("ok")}
    if len(points) < 2:
        raise Fail("could not measure two batch sizes", other.get("error") or "see train.step")
    (b1, r1), (b2, r2) = sorted(points.items())[:2]
    per = max((r2["peak_bytes"] - r1["peak_bytes"]) / (b2 - b1), 1.0)
    fixed = r1["peak_bytes"] - per * b1
    budget = limit * (0.95 if gpu else 1.0)       # GPU: leave room for the allocator's fragmentation
    predicted = fixed + per * B
    largest = int((budget - fixed) // per)
    m = {"limit_bytes": limit, "limit_source": source, "dali_gpu_bytes": dali_bytes, "per_sample_bytes": per, "fixed_bytes": fixed,
         "predicted_bytes_at_batch_size": predicted, "batch_size": B, "largest_batch_estimate": largest,
         "fit_points": {str(b): p["peak_bytes"] for b, p in points.items()}, "precision": prec,
         "peak_source": r1["peak_source"]}
    if gpu and largest >= 1:        # verify by running it (capped to keep the check quick)
        trial, verified = min(largest, 8 * max(B, 1), 1024), None
        for _ in range(3):
            if trial <= max(points) or facts.step(trial, prec, cl).get("ok"):
                verified = trial
                break
            trial = int(trial * 0.85)
        m["largest_batch_verified"] = verified
        largest = verified if verified is not None else largest
    if gpu:     # the configured batch ran on this GPU: it fits unless a smaller --memory-limit-gib says not
        fits = main["batch"] == B and not main["oom_at"] and main["peak_bytes"] <= limit
        if fits:
            largest = max(largest, B)
    else:
        fits = predicted <= budget and largest >= B
    fig = (f"{mib(fixed)} + {mib(per)}/video ({prec}, fit over batch {b1} and {b2}): batch {B} needs "
           f"{gib(predicted)} of {gib(limit)} ({source}); largest that fits: {max(largest, 0)}")
    if gpu:
        v = m.get("largest_batch_verified")
        fig += (" (not verified: the trial steps failed)" if v is None else
                " (ran; search capped at 8x the batch)" if v >= min(8 * max(B, 1), 1024) else " (ran)")
    if largest < 1:
        raise Fail(fig, "does not fit even at batch 1: lower crop or frames, use a smaller backbone (backbone=r3d18), "
                   "a smaller queue_size, or a device with more memory", m)
    if not fits:
        raise Fail(fig, f"batch_size={B} does not fit: lower batch_size to {largest} (the largest that fits; "
                   f"keep the global batch by running more processes), or lower crop/frames", m)
    return Result("", PASS, fig, measured=m)


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
