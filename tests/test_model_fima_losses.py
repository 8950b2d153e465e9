"""FIMA/MoCo loss math against slow loop-by-loop references written from DESIGN.md section 4."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model.fima_losses import dense_loss, dense_positive_pairs, foreground_mask, foreground_score, local_loss
from model.infonce import info_nce, info_nce_logits
from model.moco import MoCo


def unit(*shape, gen):
    return F.normalize(torch.randn(*shape, generator=gen), dim=-1)


# --- slow references ---------------------------------------------------------------------------

def slow_positives(box_q, box_k, H, W, mask_q, mask_k, rho=0.7, frame_hw=None):
    """Per sample, per cell pair: |centre_q - centre_k| / max(diag_q, diag_k) < rho and both foreground."""
    B = len(box_q)
    A = np.zeros((B, H * W, H * W), dtype=bool)
    for b in range(B):
        geo = []
        for box in (box_q[b], box_k[b]):
            x1, y1, x2, y2 = (float(v) for v in box)
            if frame_hw is not None:  # source pixels: x = column, y = row
                fh, fw = (float(v) for v in frame_hw[b])
                x1, x2, y1, y2 = x1 * (fw - 1), x2 * (fw - 1), y1 * (fh - 1), y2 * (fh - 1)
            w, h = (x2 - x1) / W, (y2 - y1) / H
            centres = [(x1 + (x + 0.5) * w, y1 + (y + 0.5) * h) for y in range(H) for x in range(W)]
            geo.append((centres, math.hypot(w, h)))
        (cq, dq), (ck, dk) = geo
        for i in range(H * W):
            for j in range(H * W):
                d = math.dist(cq[i], ck[j]) / max(dq, dk)
                A[b, i, j] = d < rho and bool(mask_q[b].flatten()[i]) and bool(mask_k[b].flatten()[j])
    return A


def slow_dense(P, Z, t, A, T, queue=None):
    """-log(sum over positives / sum over every cell of every slice of every sample [+ queue]),
    averaged over cells with a positive, then over samples with such a cell; 0 when there is none."""
    P, Z = P.double().numpy(), Z.double().numpy()
    queue = np.zeros((0, P.shape[-1])) if queue is None else queue.double().numpy()
    B, S, N, _ = Z.shape
    per_sample = []
    for b in range(B):
        cells = []
        for i in range(N):
            pos = [j for j in range(N) if A[b, i, j]]
            if not pos:
                continue
            num = sum(math.exp(P[b, i] @ Z[b, t, j] / T) for j in pos)
            den = sum(math.exp(P[b, i] @ Z[b2, s, j] / T) for b2 in range(B) for s in range(S) for j in range(N))
            den += sum(math.exp(P[b, i] @ q / T) for q in queue)
            cells.append(-math.log(num / den))
        if cells:
            per_sample.append(sum(cells) / len(cells))
    return sum(per_sample) / len(per_sample) if per_sample else 0.0


def random_boxes(gen, B, identical=(), mirrored=()):
    """Crop boxes (x1,y1,x2,y2) = (j/(W-1), i/(H-1), (j+w-1)/(W-1), (i+h-1)/(H-1)) of random crops,
    x1/x2 swapped when mirrored; the key crop overlaps the query crop (a shifted, rescaled copy)."""
    fh = torch.randint(200, 400, (B,), generator=gen).float()
    fw = torch.randint(200, 400, (B,), generator=gen).float()
    boxes = []
    for b in range(B):
        crops = []
        for view in range(2):
            if view == 1 and b in identical:
                crops.append(crops[0])
                continue
            h = int(torch.randint(60, int(fh[b]) - 20, (1,), generator=gen))
            w = int(torch.randint(60, int(fw[b]) - 20, (1,), generator=gen))
            i = int(torch.randint(0, int(fh[b]) - h, (1,), generator=gen))
            j = int(torch.randint(0, int(fw[b]) - w, (1,), generator=gen))
            box = [j / (fw[b] - 1), i / (fh[b] - 1), (j + w - 1) / (fw[b] - 1), (i + h - 1) / (fh[b] - 1)]
            if b in mirrored and view == 1:
                box = [box[2], box[1], box[0], box[3]]
            crops.append(torch.tensor(box))
        boxes.append(torch.stack(crops))
    boxes = torch.stack(boxes)  # B x 2 x 4
    return boxes[:, 0], boxes[:, 1], torch.stack([fh, fw], dim=1)


# --- dense loss ---------------------------------------------------------------------------------

@pytest.mark.parametrize("grid,coords,with_queue", [((4, 4), "normalized", False), ((3, 5), "normalized", True),
                                                     ((4, 4), "pixel", True)])
def test_dense_loss_matches_slow_reference(grid, coords, with_queue):
    gen = torch.Generator().manual_seed(1)
    B, S, D, T = 5, 2, 8, 0.1
    H, W = grid
    # 0: identical boxes; 1: overlapping, key mirrored; 2: overlapping; 3: identical mirrored boxes;
    # 4: the same crop, only the query mirrored.
    box_q, box_k, frame_hw = random_boxes(gen, B, identical=(0, 3, 4), mirrored=(1,))
    box_q[3], box_k[3] = box_q[3][[2, 1, 0, 3]], box_k[3][[2, 1, 0, 3]]
    box_q[4] = box_q[4][[2, 1, 0, 3]]
    mask_q = torch.rand(B, H, W, generator=gen) > 0.3
    mask_k = torch.rand(B, H, W, generator=gen) > 0.3
    fhw = frame_hw if coords == "pixel" else None
    A = dense_positive_pairs(box_q, box_k, (H, W), mask_q, mask_k, 0.7, fhw)
    A_ref = slow_positives(box_q, box_k, H, W, mask_q, mask_k, 0.7, fhw)
    assert np.array_equal(A.numpy(), A_ref)
    assert A[0].any() and A[3].any() and A[4].any()
    P, Z = unit(B, H * W, D, gen=gen), unit(B, S, H * W, D, gen=gen)
    queue = unit(11, D, gen=gen) if with_queue else None
    for t in range(S):
        loss, n_cells = dense_loss(P, Z, t, A, T, queue)
        assert abs(loss.item() - slow_dense(P, Z, t, A_ref, T, queue)) < 1e-5
        assert n_cells.item() == int(A_ref.any(axis=2).sum())


def test_dense_loss_drops_samples_without_positives():
    gen = torch.Generator().manual_seed(2)
    B, H, W, D = 3, 4, 4, 8
    box_q, box_k, _ = random_boxes(gen, B, identical=(0, 1, 2))
    mask = torch.ones(B, H, W, dtype=torch.bool)
    mask_q = mask.clone()
    mask_q[1] = False  # sample 1 has no foreground query cell
    A = dense_positive_pairs(box_q, box_k, (H, W), mask_q, mask, 0.7)
    assert not A[1].any() and A[0].any()
    P, Z = unit(B, H * W, D, gen=gen), unit(B, 2, H * W, D, gen=gen)
    loss, _ = dense_loss(P, Z, 1, A, 0.1)
    assert abs(loss.item() - slow_dense(P, Z, 1, A.numpy(), 0.1)) < 1e-5


def test_dense_loss_without_any_positive_is_a_finite_zero_with_graph():
    gen = torch.Generator().manual_seed(3)
    B, N, D = 2, 9, 8
    P = unit(B, N, D, gen=gen).requires_grad_(True)
    Z = unit(B, 2, N, D, gen=gen)
    A = torch.zeros(B, N, N, dtype=torch.bool)
    loss, n_cells = dense_loss(P, Z, 0, A, 0.1, unit(5, D, gen=gen))
    assert loss.item() == 0.0 and n_cells.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.isfinite(P.grad).all() and (P.grad == 0).all()


def test_dense_loss_is_stable_in_half_precision_inputs():
    # Sums of exp(s/T) are computed by log-sum-exp in fp32: a small temperature cannot overflow.
    gen = torch.Generator().manual_seed(4)
    B, N, D = 2, 4, 8
    P, Z = unit(B, N, D, gen=gen), unit(B, 2, N, D, gen=gen)
    A = torch.eye(N, dtype=torch.bool).expand(B, N, N)
    loss, _ = dense_loss(P.bfloat16(), Z.bfloat16(), 0, A, 0.001)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# --- the positive rule: examples from issue 11 ---------------------------------------------------

def crop_box(frame_wh, crop_xywh, mirror=False):
    (fw, fh), (j, i, w, h) = frame_wh, crop_xywh
    box = [j / (fw - 1), i / (fh - 1), (j + w - 1) / (fw - 1), (i + h - 1) / (fh - 1)]
    return torch.tensor([[box[2], box[1], box[0], box[3]] if mirror else box])


def pairs(box, frame_wh, coords="normalized", grid=(7, 7)):
    mask = torch.ones(1, *grid, dtype=torch.bool)
    frame_hw = torch.tensor([[frame_wh[1], frame_wh[0]]], dtype=torch.float32) if coords == "pixel" else None
    return dense_positive_pairs(box, box, grid, mask, mask, 0.7, frame_hw)[0]  # N x N


def neighbours(A, W, step):
    """Positive pairs (i, j) with j - i == step inside one row (step=±1) or across rows (step=±W)."""
    idx = A.nonzero().tolist()
    return sum(1 for i, j in idx if j - i == step and (abs(step) != 1 or i // W == j // W))


def test_identical_200px_crop_of_340x256_frame_pairs_133_cells_per_axis():
    box = crop_box((340, 256), (70, 30, 200, 200))
    A = pairs(box, (340, 256))
    assert A.sum().item() == 133  # 49 same cells + 2 * 6 * 7 left/right neighbours
    assert A.diagonal().all() and neighbours(A, 7, 1) == neighbours(A, 7, -1) == 42
    assert neighbours(A, 7, 7) == 0
    # Source-pixel coordinates: the crop is square in pixels, so only the same cell pairs.
    A_px = pairs(box, (340, 256), "pixel")
    assert A_px.sum().item() == 49 and A_px.diagonal().all()
    # Mirrored identical boxes behave the same.
    assert pairs(crop_box((340, 256), (70, 30, 200, 200), mirror=True), (340, 256)).sum().item() == 133


def test_portrait_frame_pairs_vertical_neighbours():
    A = pairs(crop_box((256, 340), (30, 70, 200, 200)), (256, 340))
    assert A.sum().item() == 133 and neighbours(A, 7, 7) == 42 and neighbours(A, 7, 1) == 0


def test_square_cells_in_normalised_units_pair_only_the_same_cell():
    for box in ([0.1, 0.2, 0.5, 0.6], [0.5, 0.2, 0.1, 0.6]):  # plain and mirrored
        A = pairs(torch.tensor([box]), (340, 256))
        assert A.sum().item() == 49 and A.diagonal().all()


def test_pixel_switch_depends_on_crop_shape_in_pixels():
    # 300x150 px crop: wide cells in pixels, so the vertical neighbours are closer than 0.7 diagonals.
    A = pairs(crop_box((340, 256), (20, 50, 300, 150)), (340, 256), "pixel")
    assert A.sum().item() == 133 and neighbours(A, 7, 7) == 42 and neighbours(A, 7, 1) == 0


def test_positive_rule_needs_both_cells_foreground():
    box = torch.tensor([[0.1, 0.2, 0.5, 0.6]])
    mask_q, mask_k = torch.ones(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    mask_q[0, 0, 0] = False
    mask_k[0, 3, 3] = False
    A = dense_positive_pairs(box, box, (4, 4), mask_q, mask_k)[0]
    assert A.sum().item() == 14 and not A[0].any() and not A[:, 15].any()


def test_shifted_crop_pairs_by_geometry():
    # Key crop shifted right by exactly one query cell: query cell (y, x) pairs key cell (y, x - 1).
    A = pairs(torch.tensor([[0.1, 0.1, 0.5, 0.5]]), (300, 300))  # sanity: square, 49
    assert A.sum().item() == 49
    box_q, box_k = torch.tensor([[0.1, 0.1, 0.5, 0.5]]), torch.tensor([[0.2, 0.1, 0.6, 0.5]])
    ones = torch.ones(1, 4, 4, dtype=torch.bool)
    A = dense_positive_pairs(box_q, box_k, (4, 4), ones, ones)[0]
    expected = {(y * 4 + x, y * 4 + x - 1) for y in range(4) for x in range(1, 4)}
    assert set(map(tuple, A.nonzero().tolist())) == expected


# --- foreground mask ----------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(4, 4), (7, 7), (3, 5)])
def test_foreground_mask_marks_cells_above_the_median(grid):
    gen = torch.Generator().manual_seed(5)
    H, W = grid
    rgb, diff = torch.rand(3, 16, 2, H, W, generator=gen), torch.rand(3, 16, 2, H, W, generator=gen)
    score = foreground_score(rgb) + foreground_score(diff)
    torch.testing.assert_close(score, rgb.mean(dim=(1, 2)) + diff.mean(dim=(1, 2)))  # channels and time
    mask = foreground_mask(score)
    assert mask.shape == (3, H, W)  # one mask per clip, static over time
    for b in range(3):
        vals = sorted(score[b].flatten().tolist())
        median = vals[(H * W - 1) // 2]  # lower median
        assert mask[b].sum().item() == (H * W) // 2
        assert torch.equal(mask[b], score[b] > median)


# --- local (frame-level motion) loss ------------------------------------------------------------

def slow_local(p, u, queue, T):
    p, u, queue = p.double().numpy(), u.double().numpy(), queue.double().numpy()
    B = p.shape[2]
    total = 0.0
    for b in range(2):
        for t in range(2):
            ce = 0.0
            for i in range(B):
                logits = [p[b, t, i] @ u[b, t, i]]
                logits += [p[b, t, i] @ u[b, 1 - t, j] for j in range(B)]  # other half, same clip
                logits += [p[b, t, i] @ u[1 - b, h, j] for h in range(2) for j in range(B)]  # other clip
                logits += [p[b, t, i] @ q for q in queue]
                logits = np.array(logits) / T
                ce += -logits[0] + math.log(np.exp(logits).sum())
            total += ce / B
    return total / 4


def test_local_loss_matches_slow_reference():
    gen = torch.Generator().manual_seed(6)
    B, D = 3, 8
    p, u, queue = unit(2, 2, B, D, gen=gen), unit(2, 2, B, D, gen=gen), unit(7, D, gen=gen)
    loss, acc = local_loss(p, u, queue, 0.1)
    assert abs(loss.item() - slow_local(p, u, queue, 0.1)) < 1e-5
    assert 0.0 <= acc.item() <= 1.0


# --- instance loss ------------------------------------------------------------------------------

def slow_instance(q_m, q_n, k_m, k_n, queue, T, self_negative, ptr):
    q_m, q_n, k_m, k_n, Q = (x.double().numpy() for x in (q_m, q_n, k_m, k_n, queue))
    K, B = len(Q), len(q_m)

    def ce(q, k, Q):
        out = 0.0
        for i in range(B):
            logits = np.array([q[i] @ k[i]] + [q[i] @ Q[j] for j in range(K)]) / T
            out += -logits[0] + math.log(np.exp(logits).sum())
        return out / B

    first = ce(q_m, k_n, Q)
    if self_negative:  # the reference enqueues k_n before the n -> m direction
        Q = Q.copy()
        for i in range(B):
            Q[(ptr + i) % K] = k_n[i]
    return 0.5 * (first + ce(q_n, k_m, Q))


@pytest.mark.parametrize("self_negative_bug", [False, True])
def test_instance_loss_matches_slow_reference_and_enqueues_fifo(self_negative_bug):
    gen = torch.Generator().manual_seed(7)
    B, D, K = 3, 8, 7
    moco = MoCo("r3d18", dim=D, queue_size=K, temperature=0.1, self_negative_bug=self_negative_bug,
                backbone_kwargs={"widths": (4, 4, 4, 4)})
    moco.queue.ptr.fill_(5)  # the write of k_n wraps around: slots 5, 6, 0
    queue0 = moco.queue.keys.clone()
    q_m, q_n, k_m, k_n = (unit(B, D, gen=gen) for _ in range(4))
    out = moco.instance_loss(q_m, q_n, k_m, k_n)
    expected = slow_instance(q_m, q_n, k_m, k_n, queue0, 0.1, self_negative_bug, 5)
    assert abs(out["loss_inst"].item() - expected) < 1e-5
    torch.testing.assert_close(moco.queue.keys[[5, 6, 0]], k_n)
    torch.testing.assert_close(moco.queue.keys[[1, 2, 3]], k_m)
    assert moco.queue.ptr.item() == 4


def test_self_negative_switch_changes_the_loss():
    gen = torch.Generator().manual_seed(8)
    q_m, q_n, k_m, k_n = (unit(2, 8, gen=gen) for _ in range(4))
    losses = []
    for bug in (False, True):
        torch.manual_seed(0)
        moco = MoCo("r3d18", dim=8, queue_size=16, self_negative_bug=bug, backbone_kwargs={"widths": (4, 4, 4, 4)})
        losses.append(moco.instance_loss(q_m, q_n, k_m, k_n)["loss_inst"].item())
    assert losses[1] > losses[0] + 1e-3


def test_info_nce_runs_in_fp32_under_autocast():
    gen = torch.Generator().manual_seed(9)
    q, k, neg = unit(4, 8, gen=gen), unit(4, 8, gen=gen), unit(10, 8, gen=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = info_nce_logits(q, k, neg, 0.1)
        loss = info_nce(logits)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(loss, info_nce(info_nce_logits(q, k, neg, 0.1)))
