"""Loss math of the multi-level method (Qian et al., ICCV 2021) as pure tensor functions, tested against
slow references written from notes/multilevel-and-evaluation.md Part A.

Everything runs in fp32 with autocast off (losses.fp32) and every normaliser is a log-sum-exp.
Notation: B videos on this rank, N = W*B videos of the gathered (global) batch, `offset` = this rank's
first row in it (rank * B), D embedding dim (128), K prototypes, S time steps of a level.
Clip axis: 0 = A (first 16 frames), 1 = B (next 16), 2 = G (all 32 at half rate).
Features passed in need not be unit vectors: each function L2-normalises what it compares.

| function               | reference (train.py)  | what it computes                                          |
|------------------------|-----------------------|-----------------------------------------------------------|
| instance_logits        | feat_contrast         | A <-> B of a video; negatives: both clips of other videos |
| motion_logits          | motion_contrast       | as above + the video's own time-reversed A and B          |
| local_global_loss      | local_global          | step t of A||B (each pooled to S/2) <-> step t of G       |
| sinkhorn               | sinkhorn              | SwAV Sinkhorn-Knopp codes, rows sum to 1                  |
| proto_loss             | proto_contrast        | A's softmax(logits/0.1) predicts B's code and vice versa  |
| instance_graph         | feat_contrast's 3rd   | softmax over B-clips of A.B / tau (global batch)          |
| graph_target           | graph                 | row-normalise(threshold(G_ins) * same-cluster)           |
| graph_loss             | graph_contrast        | mean over entries of -G_ij log(P_ij + 1e-10)             |

`gather` collects a tensor from all ranks for these losses; with grad="full" (default) its backward
sums the gradients of every rank's loss into each rank's rows, so a DDP step (gradients averaged over
ranks) equals the single-process step on the whole batch (BatchNorm statistics aside). grad="local" is
the reference: only this rank's rows keep their gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .distributed import concat_all_gather, rank, world_size
from .infonce import fp32, info_nce, top1

__all__ = ["gather", "instance_logits", "motion_logits", "local_global_loss", "sinkhorn", "proto_loss",
           "instance_graph", "graph_target", "graph_loss", "info_nce", "top1"]


# --- gathering -------------------------------------------------------------------------------------

class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward hands each rank the sum over ranks of the gradient of its own rows
    (built on concat_all_gather, so model/distributed.py stays the only place that calls torch.distributed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return concat_all_gather(x)  # (W*B) x ...

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        W, r, n = world_size(), rank(), ctx.rows
        every = concat_all_gather(grad.contiguous())  # (W*W*B) x ...: each rank's gradient of the gathered rows
        return every.view(W, W * n, *grad.shape[1:])[:, r * n:(r + 1) * n].sum(dim=0)  # B x ...


def gather(x: torch.Tensor, grad: str = "full") -> tuple[torch.Tensor, int]:
    """([W*B, ...] rows of all ranks in rank order, offset of this rank's rows). grad: "full", "local"
    (only this rank's rows carry gradient, the reference) or "none". The identity on one process."""
    W = world_size()
    offset = rank() * x.shape[0]
    if W == 1:
        return (x if grad != "none" else x.detach()), offset
    if grad == "full":
        return _GatherWithGrad.apply(x), offset
    everyone = concat_all_gather(x.detach())  # (W*B) x ...
    if grad == "none":
        return everyone, offset
    n = x.shape[0]
    return torch.cat([everyone[:offset], x, everyone[offset + n:]]), offset


# --- contrastive terms -----------------------------------------------------------------------------

def _other_videos(sim: torch.Tensor, offset: int) -> torch.Tensor:
    """sim [B, 2, N, 2] (query video, query clip, key video, key clip) -> [2B, 2(N-1)]: the columns of
    every key video except the query's own (global index offset + b)."""
    B, _, N, _ = sim.shape
    own = torch.zeros(B, N, dtype=torch.bool, device=sim.device)
    own[torch.arange(B), offset + torch.arange(B)] = True  # B x N
    keep = ~own[:, None, :, None].expand(B, 2, N, 2)  # B x 2 x N x 2
    return sim[keep].view(2 * B, 2 * (N - 1))  # 2B x 2(N-1)


def instance_logits(z: torch.Tensor, z_all: torch.Tensor, offset: int, tau: float = 0.07) -> torch.Tensor:
    """Instance contrast between clips A and B. z [B, 2, D] this rank's (A, B) embeddings, z_all [N, 2, D]
    the gathered ones. Row (b, c) of the result [2B, 1 + 2(N-1)]: [z_bc.z_b(1-c), z_bc.(both clips of
    every other video)] / tau, positive at class 0; the clip itself is not a candidate. Cross-entropy on it
    is the reference's -log(pos / (pos + sum neg))."""
    with fp32(z.device):
        z, z_all = F.normalize(z.float(), dim=-1), F.normalize(z_all.float(), dim=-1)
        pos = (z * z.flip(1)).sum(dim=-1).reshape(-1, 1)  # 2B x 1
        sim = torch.einsum("bcd,nkd->bcnk", z, z_all)  # B x 2 x N x 2
        return torch.cat([pos, _other_videos(sim, offset)], dim=1) / tau  # 2B x (1 + 2(N-1))


def motion_logits(f: torch.Tensor, f_rev: torch.Tensor, f_all: torch.Tensor, offset: int,
                  tau: float = 0.07) -> torch.Tensor:
    """Motion contrast at the low/mid level. f [B, 2, D] forward-time (A, B) features of this rank,
    f_rev [B, 2, D] the same clips' time-reversed features, f_all [N, 2, D] the gathered forward ones.
    Row (b, c) [2B, 1 + 2(N-1) + 2]: [positive f_bc.f_b(1-c), both clips of every other video (forward),
    f_bc.f_rev_bA, f_bc.f_rev_bB] / tau: the video's own reversed clips are extra negatives, other
    videos' reversed clips are not candidates."""
    with fp32(f.device):
        f, f_rev, f_all = (F.normalize(x.float(), dim=-1) for x in (f, f_rev, f_all))
        pos = (f * f.flip(1)).sum(dim=-1).reshape(-1, 1)  # 2B x 1
        sim = torch.einsum("bcd,nkd->bcnk", f, f_all)  # B x 2 x N x 2
        rev = torch.einsum("bcd,bkd->bck", f, f_rev).reshape(-1, 2)  # 2B x 2
        return torch.cat([pos, _other_videos(sim, offset), rev], dim=1) / tau  # 2B x (1 + 2(N-1) + 2)


def local_global_loss(x: torch.Tensor, tau: float = 0.07) -> tuple[torch.Tensor, torch.Tensor]:
    """Local-to-global timestamp retrieval. x [B, 3, S, D]: per-step embeddings of A, B, G (S even).
    A and B are average-pooled to S/2 steps (pairs of neighbours) and concatenated: L = A||B [B, S, D];
    step t of L must find step t of G among G's S steps, and step t of G step t of L (cross-entropy,
    within the video). Returns (mean of the two directions, top-1 accuracy)."""
    with fp32(x.device):
        x = x.float()
        B, _, S, D = x.shape
        if S % 2:
            raise ValueError(f"local-to-global retrieval needs an even number of steps, got {S}")
        halves = x[:, :2].reshape(B, 2, S // 2, 2, D).mean(dim=3)  # B x 2 x S/2 x D
        local = F.normalize(halves.reshape(B, S, D), dim=-1)  # B x S x D (A's steps, then B's)
        glob = F.normalize(x[:, 2], dim=-1)  # B x S x D
        l2g = (local @ glob.transpose(1, 2) / tau).reshape(B * S, S)  # (B*S) x S, row (b, t): L_t . G_s
        g2l = (glob @ local.transpose(1, 2) / tau).reshape(B * S, S)  # (B*S) x S
        target = torch.arange(S, device=x.device).repeat(B)  # B*S
        loss = 0.5 * (F.cross_entropy(l2g, target) + F.cross_entropy(g2l, target))
        acc = 0.5 * ((l2g.argmax(1) == target).float().mean() + (g2l.argmax(1) == target).float().mean())
        return loss, acc.detach()


# --- prototypes ------------------------------------------------------------------------------------

def _replace_inf(x: torch.Tensor) -> torch.Tensor:
    """The reference's shoot_infs: infinities become the largest finite value."""
    inf = torch.isinf(x)
    finite = x[~inf]
    return torch.where(inf, finite.max() if finite.numel() else torch.zeros((), device=x.device), x)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, eps: float = 0.05, iters: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp on scores [M, K] (prototype logits of M samples) -> codes [M, K], every
    row summing to 1. Q = exp(scores / eps) (shifted by the max), transposed to K x M and scaled to total
    1; then `iters` times: rows (prototypes) to 1/K each, columns (samples) to 1/M each; finally columns
    to 1. More iterations make the prototypes' totals (column sums of the codes) equal, M/K each."""
    with fp32(scores.device):
        s = scores.float() / eps
        Q = torch.exp(s - s.max()).T  # K x M
        Q = Q / Q.sum()
        K, M = Q.shape
        for _ in range(iters):
            u = _replace_inf((1.0 / K) / Q.sum(dim=1))  # K
            Q = Q * u[:, None]
            Q = Q * ((1.0 / M) / Q.sum(dim=0))[None, :]
        return (Q / Q.sum(dim=0, keepdim=True)).T  # M x K


def proto_loss(logits: torch.Tensor, codes: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Swapped prediction. logits [B, 2, K] prototype scores of A and B, codes [B, 2, K] their Sinkhorn
    codes (no gradient): -1/2 [sum_k q_B log softmax(l_A / tau) + sum_k q_A log softmax(l_B / tau)], mean over B."""
    with fp32(logits.device):
        logp = F.log_softmax(logits.float() / tau, dim=-1)  # B x 2 x K
        codes = codes.detach().float()
        return -0.5 * ((codes[:, 1] * logp[:, 0]).sum(-1) + (codes[:, 0] * logp[:, 1]).sum(-1)).mean()


# --- graph constraint ------------------------------------------------------------------------------

@torch.no_grad()
def instance_graph(z_all: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """G_ins [N, N]: row i = softmax over j of (A_i . B_j) / tau on the gathered instance embeddings [N, 2, D]."""
    with fp32(z_all.device):
        z = F.normalize(z_all.float(), dim=-1)
        return torch.softmax(z[:, 0] @ z[:, 1].T / tau, dim=1)  # N x N


@torch.no_grad()
def graph_target(g_ins: torch.Tensor, labels: torch.Tensor, thres: float = 0.05) -> torch.Tensor:
    """G = row-normalise(threshold(G_ins) * same-cluster) [N, N]: entries of G_ins below `thres` become 0
    except the diagonal, which is kept; G_sem_ij = 1 where labels i and j agree. No gradient."""
    g = g_ins.float()
    diag = torch.diagonal(g).clone()  # N
    g = torch.where(g < thres, torch.zeros_like(g), g)
    g = g.clone()
    g.diagonal().copy_(diag)
    g = g * (labels[:, None] == labels[None, :]).float()  # N x N
    return g / g.sum(dim=1, keepdim=True).clamp_min(1e-30)


def graph_loss(za: torch.Tensor, zb_all: torch.Tensor, target: torch.Tensor, tau: float = 0.07) -> torch.Tensor:
    """Graph matching at one level. za [B, D] this rank's A embeddings of a graph head, zb_all [N, D]
    the gathered B embeddings, target [B, N] this rank's rows of G (no gradient):
    P = softmax_j(za_i . zb_j / tau); loss = mean over the B x N entries of -G_ij log(P_ij + 1e-10)."""
    with fp32(za.device):
        za, zb_all = F.normalize(za.float(), dim=-1), F.normalize(zb_all.float(), dim=-1)
        P = torch.softmax(za @ zb_all.T / tau, dim=1)  # B x N
        return -(target.detach().float() * torch.log(P + 1e-10)).mean()
