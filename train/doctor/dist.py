"""dist.allreduce: an all-reduce across every rank under torchrun (result, bandwidth, rendezvous), a function of the Facts."""
from __future__ import annotations

import os
import time

from .core import PASS, WARN, MiB, Skip, Fail, Result
from .facts import Facts


def check_allreduce(facts: Facts) -> Result:
    if "RANK" not in os.environ:
        raise Skip("one process (not under torchrun): run `torchrun --nproc-per-node=N -m train doctor ...` "
                   "(docker/entrypoint.sh doctor does) to check the all-reduce and the rendezvous")
    torch = facts.torch
    import torch.distributed as dist
    from .. import distributed as D
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK",
                                          "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    backend = "nccl" if facts.use_cuda else "gloo"
    rdzv = (f"{backend} via {env['MASTER_ADDR']}:{env['MASTER_PORT']}, world {env['WORLD_SIZE']} "
            f"({env['LOCAL_WORLD_SIZE']} per node), run id {env['TORCHELASTIC_RUN_ID']}")
    try:
        d = D.setup(facts.use_cuda, timeout_min=5)
    except Exception as e:
        raise Fail(f"{rdzv}: process group failed: {type(e).__name__}: {e}",
                   "check that MASTER_ADDR:MASTER_PORT is reachable from every node (firewall, the right "
                   "interface: NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME), and that every node uses the same "
                   "rendezvous endpoint and id")
    try:
        dev, w = d.device, d.world_size
        t = torch.full((4,), float(d.rank + 1), device=dev)
        dist.all_reduce(t)
        expect = w * (w + 1) / 2
        ok = torch.tensor([1.0 if bool((t == expect).all()) else 0.0], device=dev)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        nbytes = (256 if dev.type == "cuda" else 16) * MiB
        iters = 5 if dev.type == "cuda" else 3
        buf = torch.ones(nbytes // 4, device=dev)
        dist.all_reduce(buf)                              # warm-up (NCCL builds its rings here)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(buf)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = torch.tensor([(time.perf_counter() - t0) / iters], device=dev, dtype=torch.float64)
        dist.all_reduce(dt, op=dist.ReduceOp.MAX)        # the slowest rank's time
        sec = float(dt)
    finally:
        D.cleanup()
    algbw = nbytes / sec / 1e9
    busbw = algbw * 2 * (w - 1) / w                      # nccl-tests' bus bandwidth
    m = {"backend": backend, "world_size": w, "rendezvous": env, "correct": bool(ok.item() == 1.0),
         "bytes": nbytes, "seconds": sec, "algbw_gb_s": algbw, "busbw_gb_s": busbw}
    fig = (f"{backend}, {w} ranks: sum correct={m['correct']}, {nbytes // MiB} MiB in {sec * 1e3:.1f} ms, "
           f"bus bandwidth {busbw:.2f} GB/s; {rdzv}")
    if not m["correct"]:
        raise Fail(fig, "the all-reduce returned a wrong sum on some rank: a broken GPU/network path; rerun "
                   "with NCCL_DEBUG=INFO and check the node's GPUs and links", m)
    if backend == "nccl" and w > 1 and busbw < 5.0:
        return Result("", WARN, fig, "slow all-reduce for NCCL: check it uses NVLink/InfiniBand "
                      "(NCCL_DEBUG=INFO; NCCL_IB_HCA, NCCL_SOCKET_IFNAME), not TCP", m)
    return Result("", PASS, fig, measured=m)

