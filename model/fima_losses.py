"""FIMA's loss terms as pure tensor functions (the tests call them directly): foreground score and mask, the
dense positive rule (cell geometry on the crop boxes), the dense loss and the local motion loss.

Notation: B batch, D embedding dim (128), N = H'*W' cells of one time slice, Tp = T' time slices, K
queue, tau temperature.
The InfoNCE pieces they share with the other objectives are in infonce.py.
"""

from __future__ import annotations


import torch

from .infonce import fp32, info_nce, info_nce_logits, top1


def foreground_score(fmap: torch.Tensor) -> torch.Tensor:
    """[B, C, T', H', W'] -> [B, H', W']: mean over channels and time (FIMA's foreground score)."""
    return fmap.float().mean(dim=(1, 2))


def foreground_mask(score: torch.Tensor) -> torch.Tensor:
    """[B, H', W'] -> bool [B, H', W']: cells strictly above the per-sample (lower) median.

    With no ties that is floor(H'W'/2) cells. FIMA's score is foreground_score(rgb map) +
    foreground_score(diff map) of the key encoder; the mask is static over time.
    """
    med = score.flatten(1).median(dim=1).values  # B (torch's median is the lower median)
    return score > med[:, None, None]  # B x H' x W'


def cell_geometry(box: torch.Tensor, grid_hw: tuple[int, int], frame_hw: torch.Tensor | None = None):
    """Cell centres [B, N, 2] (x, y; raster order, x fastest) and cell diagonals [B] of a crop's grid.

    box [B, 4] = (x1, y1, x2, y2) in per-axis normalised source coordinates (x = column/(W-1),
    y = row/(H-1)); x1 > x2 means mirrored, which reverses the column order of the grid. With
    frame_hw [B, 2] (source height, width in pixels) the coordinates are scaled to source pixels,
    which makes distances isotropic.
    """
    box = box.float()
    x1, y1, x2, y2 = box.unbind(dim=1)  # B each
    if frame_hw is not None:
        hgt, wid = (frame_hw.float() - 1).unbind(dim=1)  # B each
        x1, x2, y1, y2 = x1 * wid, x2 * wid, y1 * hgt, y2 * hgt
    Hg, Wg = grid_hw
    w = (x2 - x1) / Wg  # B, negative when mirrored
    h = (y2 - y1) / Hg  # B
    cx = x1[:, None] + (torch.arange(Wg, device=box.device) + 0.5) * w[:, None]  # B x W'
    cy = y1[:, None] + (torch.arange(Hg, device=box.device) + 0.5) * h[:, None]  # B x H'
    centres = torch.stack(torch.broadcast_tensors(cx[:, None, :], cy[:, :, None]), dim=-1)  # B x H' x W' x 2
    return centres.flatten(1, 2), torch.sqrt(w * w + h * h)  # B x N x 2, B


def dense_positive_pairs(
    box_q: torch.Tensor, box_k: torch.Tensor, grid_hw: tuple[int, int], mask_q: torch.Tensor, mask_k: torch.Tensor,
    pos_ratio: float = 0.7, frame_hw: torch.Tensor | None = None,
) -> torch.Tensor:
    """A [B, N, N] bool: query cell i (box_q's grid) and key cell j (box_k's grid) are positive when
    |centre_i - centre_j| / max(diag_q, diag_k) < pos_ratio and both cells are foreground.

    mask_q, mask_k: bool [B, H', W'] foreground masks of the query and key clips.
    """
    c_q, d_q = cell_geometry(box_q, grid_hw, frame_hw)  # B x N x 2, B
    c_k, d_k = cell_geometry(box_k, grid_hw, frame_hw)  # B x N x 2, B
    dist = torch.linalg.vector_norm(c_q[:, :, None, :] - c_k[:, None, :, :], dim=-1)  # B x N x N
    close = dist / torch.maximum(d_q, d_k)[:, None, None] < pos_ratio  # B x N x N
    return close & mask_q.flatten(1)[:, :, None] & mask_k.flatten(1)[:, None, :]  # B x N x N


def dense_loss(
    P: torch.Tensor, Z: torch.Tensor, t: int, A: torch.Tensor, tau: float = 0.1, queue: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FIMA's spatiotemporal dense contrast for one (query clip, key clip, slice t) triple.

    P [B, N, D]: unit query predictions on the query clip's grid. Z [B, Tp, N, D]: unit key features of
    the key clip's diff map, all Tp slices. A [B, N, N]: positives between P's cells and Z[:, t]'s
    cells. queue [K, D] or None: extra negatives.
    For query cell i of sample b: -log( sum_{j: A_bij} e^{P_bi.Z_btj/tau} / sum_{all b', s, j} e^{P_bi.Z_b'sj/tau}
    [+ sum_queue] ), i.e. the denominator holds every cell of every slice of every sample in the batch,
    positives included. Averaged over cells with a positive, then over samples with such a cell; with
    none in the whole batch the result is an exact 0 that is still attached to P's graph.
    Returns (loss, number of query cells with a positive).
    """
    with fp32(P.device):
        P, Z = P.float(), Z.float()
        B, Tp, N, D = Z.shape
        logits = P @ Z.reshape(B * Tp * N, D).T / tau  # B x N x (B*Tp*N)
        if queue is not None and queue.shape[0] > 0:
            logits = torch.cat([logits, P @ queue.float().T / tau], dim=2)  # B x N x (B*Tp*N + K)
        log_den = torch.logsumexp(logits, dim=2)  # B x N
        pos = torch.einsum("bid,bjd->bij", P, Z[:, t]) / tau  # B x N x N (same values as in `logits`)
        has_pos = A.any(dim=2)  # B x N
        # Rows without any positive get finite dummies so neither the value nor its gradient is NaN.
        pos = pos.masked_fill(~A & has_pos[:, :, None], float("-inf"))  # B x N x N
        log_num = torch.logsumexp(pos, dim=2)  # B x N
        cell_loss = torch.where(has_pos, log_den - log_num, torch.zeros_like(log_num))  # B x N
        n_cells = has_pos.sum(dim=1)  # B
        sample_loss = cell_loss.sum(dim=1) / n_cells.clamp(min=1)  # B
        has_any = n_cells > 0  # B
        loss = (sample_loss * has_any).sum() / has_any.sum().clamp(min=1)  # scalar
        return loss, n_cells.sum()


def local_loss(p: torch.Tensor, u: torch.Tensor, queue: torch.Tensor, tau: float = 0.1):
    """FIMA's frame-level motion contrast. p [2, 2, B, D]: cls predictions for (clip b, half t);
    u [2, 2, B, D]: key features of the diff-local clips (clip, half); queue [K, D].

    Prediction (b, t) is positive with u[b, t]; its negatives are the other three local features of
    the batch (u[b, 1-t], u[1-b, 0], u[1-b, 1], all B rows of each) plus the queue. Returns (mean of
    the four cross-entropies, top-1 accuracy).
    """
    losses, accs = [], []
    for b in range(2):
        for t in range(2):
            negatives = torch.cat([u[b, 1 - t], u[1 - b, 0], u[1 - b, 1], queue])  # (3B + K) x D
            logits = info_nce_logits(p[b, t], u[b, t], negatives, tau)  # B x (1 + 3B + K)
            losses.append(info_nce(logits))
            accs.append(top1(logits))
    return sum(losses) / 4, sum(accs) / 4
