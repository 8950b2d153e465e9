"""Multi-level loss math against slow loop-by-loop references written from notes/multilevel-and-evaluation.md
(Part A.5-A.7, F.6-F.7), Sinkhorn-Knopp against plain numpy, and the gather over two gloo processes."""

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from model.multilevel_losses import (gather, graph_loss, graph_target, info_nce, instance_graph, instance_logits,
                                     local_global_loss, motion_logits, proto_loss, sinkhorn)

TAU = 0.07


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: toy sizes run single-threaded


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).float()


def nz(x):
    """Unit vectors as float64 numpy (the slow references work in double precision)."""
    x = x.double().numpy()
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- slow references ---------------------------------------------------------------------------

def slow_instance(z, z_all, offset, T, rev=None):
    """Per query (video b, clip c): -log(e^{pos} / (e^{pos} + sum over both clips of every other video
    [+ the query video's own time-reversed clips])), mean over queries (A.5 rows 1 and 3)."""
    z, z_all = nz(z), nz(z_all)
    rev = None if rev is None else nz(rev)
    B, N = len(z), len(z_all)
    total = 0.0
    for b in range(B):
        for c in range(2):
            q = z[b, c]
            pos = math.exp(q @ z[b, 1 - c] / T)
            neg = sum(math.exp(q @ z_all[j, k] / T) for j in range(N) if j != offset + b for k in range(2))
            if rev is not None:
                neg += sum(math.exp(q @ rev[b, k] / T) for k in range(2))
            total += -math.log(pos / (pos + neg))
    return total / (2 * B)


def slow_local_global(x, T):
    """A, B pooled to S/2 steps each (pairs), concatenated; CE of step t against G's steps, both ways."""
    x = x.double().numpy()
    B, _, S, D = x.shape
    total, count = 0.0, 0
    for b in range(B):
        local = [(x[b, c, 2 * s] + x[b, c, 2 * s + 1]) / 2 for c in range(2) for s in range(S // 2)]
        local = [v / np.linalg.norm(v) for v in local]
        glob = [x[b, 2, s] / np.linalg.norm(x[b, 2, s]) for s in range(S)]
        for t in range(S):
            for q, keys in ((local[t], glob), (glob[t], local)):
                logits = np.array([q @ k / T for k in keys])
                total += -logits[t] + math.log(np.exp(logits).sum())
                count += 1
    return total / count


def numpy_sinkhorn(scores, eps, iters):
    """SwAV's Sinkhorn-Knopp, written out with numpy (float64)."""
    Q = np.exp(scores / eps - (scores / eps).max()).T  # K x M
    Q /= Q.sum()
    K, M = Q.shape
    for _ in range(iters):
        Q *= ((1.0 / K) / Q.sum(axis=1))[:, None]
        Q *= ((1.0 / M) / Q.sum(axis=0))[None, :]
    return (Q / Q.sum(axis=0, keepdims=True)).T


def slow_proto(logits, codes, T):
    logits, codes = logits.double().numpy(), codes.double().numpy()
    B, _, K = logits.shape
    total = 0.0
    for b in range(B):
        for c in range(2):
            logp = logits[b, c] / T - math.log(np.exp(logits[b, c] / T).sum())
            total += -0.5 * sum(codes[b, 1 - c, k] * logp[k] for k in range(K))
    return total / B


def slow_graph_target(g_ins, labels, thres):
    g, labels = g_ins.double().numpy(), labels.numpy()
    N = len(g)
    out = np.zeros((N, N))
    for i in range(N):
        for j in range(N):
            keep = g[i, j] if (i == j or g[i, j] >= thres) else 0.0
            out[i, j] = keep * (labels[i] == labels[j])
        out[i] /= out[i].sum()
    return out


def slow_graph_loss(za, zb_all, target, T):
    za, zb, G = nz(za), nz(zb_all), target.double().numpy()
    B, N = G.shape
    total = 0.0
    for i in range(B):
        e = np.array([math.exp(za[i] @ zb[j] / T) for j in range(N)])
        P = e / e.sum()
        total += sum(-G[i, j] * math.log(P[j] + 1e-10) for j in range(N))
    return total / (B * N)


# --- contrastive terms ---------------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 3])
def test_instance_loss_matches_slow_reference(offset):
    """z_all = the gathered batch (N = 6) with this rank's 3 videos at `offset`."""
    gen = torch.Generator().manual_seed(0)
    z_all = unit(6, 2, 8, gen=gen) * 2.5  # not unit: the function normalises
    z = z_all[offset:offset + 3].clone()
    logits = instance_logits(z, z_all, offset, TAU)
    assert logits.shape == (6, 1 + 2 * 5)
    assert abs(info_nce(logits).item() - slow_instance(z, z_all, offset, TAU)) < 1e-5


@pytest.mark.parametrize("offset", [0, 2])
def test_motion_loss_matches_slow_reference(offset):
    gen = torch.Generator().manual_seed(1)
    f_all = unit(4, 2, 8, gen=gen)
    f, f_rev = f_all[offset:offset + 2].clone(), unit(2, 2, 8, gen=gen)
    logits = motion_logits(f, f_rev, f_all, offset, TAU)
    assert logits.shape == (4, 1 + 2 * 3 + 2)
    assert abs(info_nce(logits).item() - slow_instance(f, f_all, offset, TAU, rev=f_rev)) < 1e-5


def test_motion_negatives_are_own_reversed_clips_only():
    """Constructed features: a video's own reversed clips are candidates of its queries (the logits hold
    exactly their similarities, and making them equal to the query raises the loss); other videos'
    reversed clips never reach another video's queries (zero gradient)."""
    gen = torch.Generator().manual_seed(2)
    B, D = 3, 8
    f = unit(B, 2, D, gen=gen)
    f_rev = unit(B, 2, D, gen=gen).requires_grad_(True)
    logits = motion_logits(f, f_rev, f, 0, TAU)  # 2B x (1 + 2(B-1) + 2)
    for b in range(B):
        for c in range(2):
            want = torch.stack([f[b, c] @ f_rev[b, k] for k in range(2)]) / TAU
            torch.testing.assert_close(logits[2 * b + c, -2:], want)
    per_query = F.cross_entropy(logits, torch.zeros(2 * B, dtype=torch.long), reduction="none").view(B, 2)
    (grad,) = torch.autograd.grad(per_query[0].sum(), f_rev)  # video 0's queries only
    assert grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0
    # the video's own reversed clips as hard negatives: identical to the query -> larger loss
    hard = f_rev.detach().clone()
    hard[0] = f[0]
    base = info_nce(motion_logits(f, f_rev.detach(), f, 0, TAU))
    assert info_nce(motion_logits(f, hard, f, 0, TAU)) > base + 0.1
    # without the reversed negatives the motion term is the instance term
    torch.testing.assert_close(logits[:, :-2], instance_logits(f, f, 0, TAU))


def test_local_global_loss_matches_slow_reference_and_retrieves_aligned_steps():
    gen = torch.Generator().manual_seed(3)
    for S in (2, 4, 8):
        x = torch.randn(2, 3, S, 8, generator=gen)
        loss, acc = local_global_loss(x, TAU)
        assert abs(loss.item() - slow_local_global(x, TAU)) < 1e-5
        assert 0 <= acc.item() <= 1
    # G's step t equal to A||B's step t (pooled): retrieval is perfect
    S, D = 4, 16
    steps = unit(2, S, D, gen=gen)  # the S steps of the 32-frame span
    a = steps[:, :S // 2].repeat_interleave(2, dim=1)  # A: S steps at double rate, pairs pool back to steps
    b = steps[:, S // 2:].repeat_interleave(2, dim=1)
    loss, acc = local_global_loss(torch.stack([a, b, steps], dim=1), TAU)
    assert acc.item() == 1.0 and loss.item() < 0.1
    with pytest.raises(ValueError):
        local_global_loss(torch.randn(1, 3, 3, 4), TAU)


# --- prototypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("M,K", [(12, 5), (40, 16)])
def test_sinkhorn_matches_numpy_and_balances(M, K):
    gen = torch.Generator().manual_seed(4)
    scores = unit(M, 8, gen=gen) @ unit(K, 8, gen=gen).T  # cosine logits, as the prototype layer gives
    codes = sinkhorn(scores, eps=0.05, iters=3)
    np.testing.assert_allclose(codes.double().numpy(), numpy_sinkhorn(scores.double().numpy(), 0.05, 3),
                               rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(M))  # each sample's code sums to 1
    totals = sinkhorn(scores, eps=0.05, iters=200).sum(dim=0)  # per prototype
    assert (totals / (M / K) - 1).abs().max() < 1e-3


def test_sinkhorn_survives_underflow():
    scores = torch.tensor([[0.0, -80.0], [0.0, -90.0], [0.0, -85.0]])  # exp(-80 / 0.05) underflows to 0
    codes = sinkhorn(scores, eps=0.05, iters=3)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(3))


def test_proto_loss_matches_slow_reference():
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 2, 6, generator=gen)
    codes = torch.softmax(torch.randn(3, 2, 6, generator=gen), dim=-1)
    assert abs(proto_loss(logits, codes, 0.1).item() - slow_proto(logits, codes, 0.1)) < 1e-5


# --- graph ---------------------------------------------------------------------------------------

def test_graph_target_matches_slow_reference():
    gen = torch.Generator().manual_seed(6)
    z_all = unit(6, 2, 8, gen=gen)
    g_ins = instance_graph(z_all, TAU)
    zn = nz(z_all)
    want = np.exp(zn[:, 0] @ zn[:, 1].T / TAU)
    np.testing.assert_allclose(g_ins.numpy(), want / want.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    for thres in (0.0, 0.05, 0.3):
        G = graph_target(g_ins, labels, thres)
        np.testing.assert_allclose(G.numpy(), slow_graph_target(g_ins, labels, thres), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(G.sum(dim=1), torch.ones(6))
        assert (G.diagonal() > 0).all()


def test_graph_loss_matches_slow_reference_and_target_has_no_gradient():
    gen = torch.Generator().manual_seed(7)
    za = unit(3, 8, gen=gen).requires_grad_(True)
    zb_all = unit(6, 8, gen=gen)
    target = torch.softmax(torch.randn(3, 6, generator=gen), dim=1).requires_grad_(True)
    loss = graph_loss(za, zb_all, target, TAU)
    assert abs(loss.item() - slow_graph_loss(za.detach(), zb_all, target.detach(), TAU)) < 1e-5
    loss.backward()
    assert target.grad is None and za.grad.abs().sum() > 0


def test_losses_run_in_fp32_under_autocast():
    gen = torch.Generator().manual_seed(8)
    z = unit(2, 2, 8, gen=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = instance_logits(z.bfloat16(), z.bfloat16(), 0, TAU)
        loss, _ = local_global_loss(torch.randn(2, 3, 4, 8, generator=gen).bfloat16(), TAU)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32


# --- gathering across processes ------------------------------------------------------------------

def all_terms(z_all_src, f_rev, grad_mode):
    """Loss on this rank's rows: instance + motion + graph, each with gathered negatives."""
    z, offset = z_all_src
    z_all, _ = gather(z, grad_mode)
    loss = info_nce(instance_logits(z, z_all, offset, TAU)) + info_nce(motion_logits(z, f_rev, z_all, offset, TAU))
    zb_all, _ = gather(z[:, 1], grad_mode)
    G = torch.full((z.shape[0], z_all.shape[0]), 1.0 / z_all.shape[0])
    return loss + graph_loss(z[:, 0], zb_all, G, TAU)


def _gather_worker(r, world, tmp, data):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=r, world_size=world)
    try:
        z_full, f_rev_full = data
        n = z_full.shape[0] // world
        z = z_full[r * n:(r + 1) * n].clone().requires_grad_(True)
        f_rev = f_rev_full[r * n:(r + 1) * n]
        gathered, offset = gather(z.detach(), "none")
        grads = {}
        for mode in ("full", "local"):
            z.grad = None
            all_terms((z, offset), f_rev, mode).backward()
            grads[mode] = z.grad.clone()
        torch.save((gathered, offset, grads), f"{tmp}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_gives_the_single_process_gradient(tmp_path):
    """Two gloo ranks with 2 videos each: the gathered batch is both ranks' rows in rank order, and with
    grad="full" the DDP gradient (the mean over ranks) equals the single-process gradient of the loss on
    all 4 videos; grad="local" (the reference) misses the other rank's key-side terms."""
    gen = torch.Generator().manual_seed(9)
    z_full, f_rev_full = unit(4, 2, 8, gen=gen), unit(4, 2, 8, gen=gen)
    world = 2
    mp.start_processes(_gather_worker, args=(world, str(tmp_path), (z_full, f_rev_full)), nprocs=world,
                       start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    z = z_full.clone().requires_grad_(True)
    all_terms((z, 0), f_rev_full, "full").backward()
    single = z.grad
    for r, (gathered, offset, grads) in enumerate(results):
        torch.testing.assert_close(gathered, z_full)
        assert offset == 2 * r
    ddp_full = torch.cat([results[r][2]["full"] / world for r in range(world)])  # DDP averages over ranks
    ddp_local = torch.cat([results[r][2]["local"] / world for r in range(world)])
    torch.testing.assert_close(ddp_full, single, rtol=1e-4, atol=1e-6)
    assert (ddp_local - single).abs().max() > 1e-3
