"""`python -m train doctor`: the preflight. Proves that a machine (or a cluster node) can run a recipe, on its
own data, in a minute or two, by running the real code path on a few samples, not just listing versions.

    python -m train doctor --config k400_i3d_fima [key=value ...] [--samples N] [--only a,b] [--skip a,b]
                           [--json PATH] [--memory-limit-gib X]
    torchrun --nproc-per-node=8 -m train doctor --config k400_i3d_fima        # + the all-reduce across ranks

It takes the trainer's `--config` and `key=value` overrides (an unknown key is the trainer's config error,
exit 2), prints a table (check, status, measured figure, what to do) and then one JSON line with every
measured figure (also written to `--json PATH`). Exit status: 0 when no check FAILs, 1 when one does (FAIL
means the run as configured would not work; WARN means it would, slower or riskier), 2 for bad arguments.

Checks (names for --only/--skip; a group name selects all of its checks):
  env      python, torch (+CUDA build), DALI (+its CUDA major; must match torch's), NVIDIA driver, GPUs,
           ffmpeg (+libvpx-vp9/libx264 encoders), free disk where out_dir goes, /dev/shm and memlock
  data     manifest/tar/index agreement over every shard (arithmetic on the indexes, plus the tar header in
           front of each member wherever the index does not describe a contiguous tar), N samples read
           in full (lbl/nf/JSON/manifest/MP4 agree), read throughput vs what training consumes
  decode   codec vs backend, one coded size (GPU decoder cache), N samples through the real pipeline on
           the CPU backend and (with a GPU) the mixed backend, CPU-vs-GPU frame agreement
  train    forward/backward of the configured objective: fp32 and bf16 (+channels_last_3d on a GPU), finite
           and agreeing losses, step time, peak memory and the largest batch that fits
  dist     under torchrun: an all-reduce across all ranks (NCCL on GPU, gloo on CPU), its bandwidth and the
           rendezvous settings; one process: skipped

Under torchrun every rank runs the all-reduce first; then local rank 0 of each node runs the other checks
on that node (its GPU 0, its filesystem) and prints the table; the other ranks exit with their all-reduce
status.

Without a GPU the GPU checks report SKIP with the reason. On a CPU the training step runs at batch 2 (a batch-8 FIMA
step takes tens of seconds on two cores; batch 1 would leave BatchNorm one value on small feature maps) and a
forward at batch 1 (or 3) gives the second point of the memory fit: the step time at the configured batch is
extrapolated linearly, and memory is estimated from what the step allocates (weights, gradients, SGD
momentum, inputs, and the tensors autograd saves for backward, measured with saved_tensors_hooks), fitted
linearly in the batch size; `--memory-limit-gib` simulates a device of that size. On a GPU both come from
real steps at the configured batch (torch.cuda.max_memory_allocated), and the largest batch is searched by
running it. bf16 on a CPU runs under CPU autocast without channels_last_3d (a GPU layout); there a
non-finite or disagreeing bf16 loss is only a WARN unless this CPU is what trains in bf16. Losses are compared
per term (tolerance 5% of max(1, |fp32|)); a term behind a discrete selection (FIMA's dense term: a median-
thresholded foreground mask) is left out of the comparison when its selection count differs.
"""
from __future__ import annotations

from .cli import Doctor, build_parser, main, select
from .core import CHECKS, GROUPS, RUN_ORDER, Result

__all__ = ["CHECKS", "GROUPS", "RUN_ORDER", "Doctor", "Result", "build_parser", "main", "select"]
