"""Objectives end to end on CPU at toy sizes: one training step, gradient routing, EMA, queues, bf16."""

import copy
import warnings

import pytest
import torch

from model import FAME, FIMA, MoCo, build_objective
from model.queue import KeyQueue

CLIPS = ("rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2")
TINY_I3D = {"width": 0.125}


def make_batch(B=2, S=64, T=16, seed=0):
    """Pipeline-contract batch in channels_last_3d memory format."""
    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last_3d
    batch = {k: torch.randn(B, 3, T, S, S, generator=gen).contiguous(memory_format=cl) for k in CLIPS}
    batch["box_m"] = torch.tensor([[0.1, 0.1, 0.7, 0.8], [0.9, 0.0, 0.2, 0.9]])[:B]  # second one mirrored
    batch["box_n"] = torch.tensor([[0.2, 0.1, 0.8, 0.8], [0.7, 0.1, 0.1, 1.0]])[:B]
    batch["frame_hw"] = torch.tensor([[256.0, 340.0], [256.0, 256.0]])[:B]
    batch["raw_m"] = torch.rand(B, 3, T, S, S, generator=gen)
    return batch


def key_params(obj):
    return [*obj.encoder_k.parameters(), *obj.projector_k.parameters()]


def test_required_inputs():
    assert MoCo.required_inputs == ("rgb_m", "rgb_n")
    assert FAME.required_inputs == ("raw_m", "rgb_n")
    assert FIMA.required_inputs == CLIPS + ("box_m", "box_n")
    pixel = FIMA("i3d", queue_size=8, dense_coords="pixel", backbone_kwargs=TINY_I3D)
    assert pixel.required_inputs == CLIPS + ("box_m", "box_n", "frame_hw")
    with pytest.raises(ValueError):
        FIMA("i3d", queue_size=8, dense_coords="isotropic", backbone_kwargs=TINY_I3D)


@pytest.mark.parametrize("name,kwargs", [
    ("moco", {"backbone": "i3d", "backbone_kwargs": TINY_I3D}),
    ("fame", {"backbone": "i3d", "backbone_kwargs": TINY_I3D}),
    ("fima", {"backbone": "i3d", "backbone_kwargs": TINY_I3D, "dense_queue_size": 40}),
    ("fima", {"backbone": "i3d", "backbone_kwargs": TINY_I3D, "dense_coords": "pixel", "self_negative_bug": True}),
    ("fima", {"backbone": "r3d18", "backbone_kwargs": {"widths": (8, 8, 16, 16)}}),
    ("fima", {"backbone": "r2plus1d18", "backbone_kwargs": {"widths": (8, 8, 16, 16)}}),
])
def test_one_training_step(name, kwargs):
    torch.manual_seed(0)
    obj = build_objective(name, queue_size=48, **kwargs).train()
    batch = make_batch(S=64 if kwargs["backbone"] == "i3d" else 32)
    out = obj({k: batch[k] for k in obj.required_inputs})  # only what it declares
    assert "loss" in out and "loss_inst" in out and "acc_inst" in out
    assert all(torch.isfinite(v).all() for v in out.values())
    if name == "fima":
        torch.testing.assert_close(out["loss"], out["loss_inst"] + out["loss_dense"] + out["loss_local"])
    opt = torch.optim.SGD([p for p in obj.parameters() if p.requires_grad], lr=0.01, momentum=0.9, weight_decay=1e-4)
    out["loss"].backward()
    grads = [p.grad for p in obj.encoder_q.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in key_params(obj))
    opt.step()


def grads_from(obj, batch, term):
    obj.zero_grad(set_to_none=True)
    obj(batch)[term].backward()
    norm = lambda mod: sum(p.grad.norm() ** 2 for p in mod.parameters() if p.grad is not None) ** 0.5  # noqa: E731
    return norm(obj.encoder_q), norm(obj.decoder), [p.grad for p in key_params(obj)]


def test_query_backbone_gets_gradient_from_each_loss_and_keys_none():
    torch.manual_seed(0)
    fima = FIMA("i3d", queue_size=32, backbone_kwargs=TINY_I3D)
    batch = make_batch()
    for term in ("loss_inst", "loss_dense", "loss_local"):
        g_backbone, g_decoder, g_keys = grads_from(fima, batch, term)
        assert g_backbone > 0, term
        assert (g_decoder > 0) == (term != "loss_inst"), term  # the decoder only serves dense and local
        assert all(g is None for g in g_keys), term


def test_ema_update_moves_keys_by_exactly_one_minus_m_times_the_gap():
    torch.manual_seed(0)
    moco = MoCo("i3d", queue_size=8, momentum_ema=0.99, backbone_kwargs=TINY_I3D)
    assert all(torch.equal(pk, pq) for pk, pq in zip(key_params(moco), moco._query_params()))  # copies at start
    with torch.no_grad():
        for p in moco._query_params():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in key_params(moco)]
    moco.momentum_update()
    for pk0, pk, pq in zip(before, key_params(moco), moco._query_params()):
        torch.testing.assert_close(pk - pk0, (1 - 0.99) * (pq - pk0), atol=1e-6, rtol=1e-5)


def test_forward_updates_ema_and_queues_in_training_only():
    torch.manual_seed(0)
    fima = FIMA("i3d", queue_size=32, dense_queue_size=100, backbone_kwargs=TINY_I3D)
    B, N = 2, 4  # I3D at 64x64 -> a 2x2 grid
    with torch.no_grad():
        for p in fima._query_params():
            p.add_(0.01)
    state0 = copy.deepcopy(fima.state_dict())
    fima.eval()
    fima(make_batch())
    assert all(torch.equal(v, fima.state_dict()[k]) for k, v in state0.items())
    fima.train()
    fima(make_batch())
    assert fima.queue.ptr.item() == 2 * B and fima.motion_queue.ptr.item() == 4 * B
    assert fima.dense_queue.ptr.item() == 4 * B * N
    assert not torch.equal(state0["encoder_k.layers.conv1a.conv.weight"], fima.encoder_k.layers.conv1a.conv.weight)


def test_queues_are_saved_in_state_dict():
    torch.manual_seed(0)
    fima = FIMA("i3d", queue_size=16, dense_queue_size=24, backbone_kwargs=TINY_I3D)
    fima(make_batch())
    sd = fima.state_dict()
    for name in ("queue", "motion_queue", "dense_queue"):
        assert f"{name}.keys" in sd and f"{name}.ptr" in sd
    fresh = FIMA("i3d", queue_size=16, dense_queue_size=24, backbone_kwargs=TINY_I3D)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.motion_queue.keys, fima.motion_queue.keys)
    assert fresh.dense_queue.ptr.item() == fima.dense_queue.ptr.item() == (4 * 2 * 4) % 24


def test_self_negative_switch_gives_different_losses_on_the_same_input():
    torch.manual_seed(0)
    fixed = FIMA("i3d", queue_size=32, dropout=0.0, backbone_kwargs=TINY_I3D)
    buggy = copy.deepcopy(fixed)
    buggy.self_negative_bug = True
    batch = make_batch()
    a, b = fixed(batch), buggy(batch)
    assert b["loss_inst"].item() > a["loss_inst"].item() + 1e-3  # q_n meets its own key (logit 1/T)
    torch.testing.assert_close(a["loss_local"], b["loss_local"])
    torch.testing.assert_close(a["loss_dense"], b["loss_dense"])


def test_pixel_coordinates_need_frame_hw():
    fima = FIMA("i3d", queue_size=8, dense_coords="pixel", backbone_kwargs=TINY_I3D)
    batch = make_batch()
    del batch["frame_hw"]
    with pytest.raises(KeyError):
        fima(batch)


def test_fima_needs_two_time_slices():
    fima = FIMA("i3d", queue_size=8, backbone_kwargs=TINY_I3D)
    with pytest.raises(ValueError, match="T' = 2"):
        fima(make_batch(T=8))  # I3D on 8 frames gives T' = 1


def test_bf16_autocast_matches_fp32():
    # Stated tolerance: total loss within 10 %; L_inst and L_local within 0.1, L_dense within 0.3
    # (absolute; typical differences over 8 seeds: 0.01, 0.03, 0.08). The dense term is a discrete
    # function of the foreground mask (a median of bf16 activations), which may flip a cell; the loss
    # math itself runs in fp32 (tests/test_model_fima_losses.py).
    torch.manual_seed(0)
    fp32 = FIMA("i3d", queue_size=64, dense_queue_size=50, dropout=0.0, backbone_kwargs=TINY_I3D)
    start = copy.deepcopy(fp32)
    batch = make_batch()
    ref = fp32(batch)
    ref["loss"].backward()

    def bf16_step():
        model = copy.deepcopy(start)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
        out["loss"].backward()
        return model, out, [n for n, p in model.named_parameters() if p.grad is not None
                            and not torch.isfinite(p.grad).all()]

    bf16, out, bad = bf16_step()
    if bad:
        # Seen here once in ~6 runs on a busy machine: a NaN in one conv weight gradient, a different layer each
        # time, that the same step from the same weights and batch did not give again (the kernel alone,
        # test_bf16_conv3d_weight_gradient_is_finite, never did). A NaN that the inputs determine repeats and fails
        # below; the trainer skips any update with a non-finite gradient (recipe.train_step, tests/test_train.py).
        warnings.warn(f"CPU bf16 step gave non-finite gradients once, not on the rerun: {bad}")
        bf16, out, bad = bf16_step()
    assert out["loss"].dtype == torch.float32
    assert abs(out["loss"].item() - ref["loss"].item()) <= 0.1 * ref["loss"].item()
    for term, tol in (("loss_inst", 0.1), ("loss_dense", 0.3), ("loss_local", 0.1)):
        assert abs(out[term].item() - ref[term].item()) <= tol, term
    # Every gradient entry finite: one NaN poisons the weights at the next update. (If the CPU bf16 conv3d
    # weight-gradient kernel ever returns NaN here, test_bf16_conv3d_weight_gradient_is_finite fails too and
    # names the kernel; the trainer skips such an update, tests/test_train.py.)
    assert not bad, bad
    assert sum(p.grad is not None for p in bf16.parameters()) == sum(p.grad is not None for p in fp32.parameters())


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last_3d])
def test_bf16_conv3d_weight_gradient_is_finite(memory_format):
    """The kernel alone: CPU bf16 conv3d on tiny maps (the shapes of a width-0.125 I3D), weight and input
    gradients finite and close to fp32's, over seeds."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 8, 4, 6, 6, generator=g).contiguous(memory_format=memory_format).requires_grad_()
        w = torch.randn(16, 8, 3, 3, 3, generator=g).contiguous(memory_format=memory_format).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = torch.nn.functional.conv3d(x, w, padding=1)
        y.float().square().mean().backward()
        got = (w.grad.clone(), x.grad.clone())
        w.grad = x.grad = None
        torch.nn.functional.conv3d(x, w, padding=1).square().mean().backward()
        for a, b in zip(got, (w.grad, x.grad)):
            assert torch.isfinite(a).all(), seed
            assert (a - b).abs().max() <= 0.05 * b.abs().max(), seed


def test_fima_forward_wiring_matches_the_design_text():
    """Recompute FIMA's three terms from its parts, following DESIGN section 4 step by step (training
    mode with dropout 0: the recomputation feeds BN the same batches, so it sees the same statistics;
    queues are read as they were before the step; the EMA update already happened inside forward)."""
    import torch.nn.functional as F
    try:  # pytest's default import mode puts tests/ on sys.path; importlib mode needs the package path
        from test_model_fima_losses import slow_dense, slow_positives
    except ImportError:
        from tests.test_model_fima_losses import slow_dense, slow_positives

    from model.fima_decoder import sinusoidal_encoding

    torch.manual_seed(0)
    fima = FIMA("i3d", queue_size=16, dense_queue_size=8, dropout=0.0, backbone_kwargs=TINY_I3D).train()
    batch = make_batch()
    queue, mqueue, dqueue = fima.queue.keys.clone(), fima.motion_queue.keys.clone(), fima.dense_queue.keys.clone()
    out = fima(batch)
    T = 0.1
    with torch.no_grad():
        def key_pooled(x):
            return F.normalize(fima.projector_k(fima.encoder_k(x).mean(dim=(2, 3, 4))), dim=1)

        k = {c: key_pooled(batch["rgb_" + c]) for c in "mn"}
        u = {c: [key_pooled(batch[f"diff_{c}{i}"]) for i in (1, 2)] for c in "mn"}
        G = {c: fima.encoder_k(batch["diff_" + c]) for c in "mn"}  # B x C x 2 x H x W
        Z = {c: torch.stack([F.normalize(fima.projector_k(G[c][:, :, t : t + 1]), dim=1) for t in range(2)], 1)
             for c in "mn"}  # B x 2 x D x H x W, the projector run per slice as a 1x1 conv
        score = {c: fima.encoder_k(batch["rgb_" + c]).mean(dim=(1, 2)) + G[c].mean(dim=(1, 2)) for c in "mn"}
        mask = {c: score[c] > score[c].flatten(1).median(dim=1).values[:, None, None] for c in "mn"}
        fq = {c: fima.encoder_q(batch["rgb_" + c]) for c in "mn"}
        q = {c: F.normalize(fima.projector_q(fq[c].mean(dim=(2, 3, 4))), dim=1) for c in "mn"}
        B, _, _, H, W = fq["m"].shape
        N = H * W

        def tokens(c, t):  # E1 per location of slice t, raster order, plus the sinusoid
            x = fq[c][:, :, t].flatten(2).transpose(1, 2)  # B x N x C
            return fima.decoder.e1(x) + sinusoidal_encoding(N, 512)

        def ce(logits):
            return F.cross_entropy(logits / T, torch.zeros(len(logits), dtype=torch.long))

        inst = 0.5 * (ce(torch.cat([(q["m"] * k["n"]).sum(1, keepdim=True), q["m"] @ queue.T], 1))
                      + ce(torch.cat([(q["n"] * k["m"]).sum(1, keepdim=True), q["n"] @ queue.T], 1)))
        local, dense = [], []
        for a, b in (("m", "n"), ("n", "m")):
            A = slow_positives(batch["box_" + a], batch["box_" + b], H, W, mask[a], mask[b])
            for t in range(2):
                o = fima.decoder(tokens(a, t), tokens(b, t))  # B x 1+N x C: target from a, memory from b
                o = F.normalize(fima.projector_q(o.transpose(1, 2)[..., None]), dim=1)[..., 0]  # B x D x 1+N
                p, P = o[:, :, 0], o[:, :, 1:].transpose(1, 2)  # B x D, B x N x D
                negs = torch.cat([u[b][1 - t], u[a][0], u[a][1], mqueue])
                local.append(ce(torch.cat([(p * u[b][t]).sum(1, keepdim=True), p @ negs.T], 1)))
                Zb = Z[b].flatten(3).transpose(2, 3)  # B x 2 x N x D
                dense.append(slow_dense(P, Zb, t, A, T, dqueue))
    assert abs(out["loss_inst"].item() - inst.item()) < 1e-4
    assert abs(out["loss_local"].item() - (sum(local) / 4).item()) < 1e-4
    assert abs(out["loss_dense"].item() - sum(dense) / 4) < 1e-4 and out["dense_pos_cells"] > 0


def test_bn_groups_is_split_batchnorm_with_permuted_keys():
    """bn_groups=2 (one-process shuffle-BN): the query encoder's output is the encoder run on each half of the batch
    on its own; the keys are the key encoder run on halves of a permuted batch, returned in the original order.
    Checked against those computations done by hand; in eval mode the setting changes nothing."""
    torch.manual_seed(0)
    obj = MoCo("i3d", queue_size=16, bn_groups=2, backbone_kwargs=TINY_I3D).train()
    x = make_batch(B=4, S=32)["rgb_m"]
    solo = copy.deepcopy(obj.encoder_q).train()
    fmap, _ = obj.encode_q(x)
    assert torch.allclose(fmap, torch.cat([solo(x[:2]), solo(x[2:])]), atol=1e-6)
    assert not torch.allclose(fmap, copy.deepcopy(obj.encoder_q)(x), atol=1e-3)     # whole-batch BN differs

    key_enc = copy.deepcopy(obj.encoder_k).train()
    torch.manual_seed(5)
    (k,) = obj.key_forward(x, obj._embed_k)
    torch.manual_seed(5)
    perm = torch.randperm(4)
    by_hand = torch.cat([key_enc(x[perm][:2]), key_enc(x[perm][2:])])[torch.argsort(perm)]
    assert torch.allclose(k, obj._embed_k(by_hand)[0], atol=1e-6)

    plain = MoCo("i3d", queue_size=16, backbone_kwargs=TINY_I3D)
    plain.load_state_dict(obj.state_dict())
    obj.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(obj.encode_q(x)[1], plain.encode_q(x)[1])
    with pytest.raises(ValueError, match="bn_groups"):
        MoCo("i3d", queue_size=16, bn_groups=0, backbone_kwargs=TINY_I3D)
    # a batch too small for two samples per group uses fewer groups (4 samples, 3 groups asked: 2 groups)
    three = MoCo("i3d", queue_size=16, bn_groups=3, backbone_kwargs=TINY_I3D).train()
    three.load_state_dict(obj.state_dict())
    three.encoder_q.train()
    assert torch.allclose(three.encode_q(x)[0], torch.cat([solo(x[:2]), solo(x[2:])]), atol=1e-6)


def test_batch_negatives_add_the_other_videos_keys_of_the_step():
    """batch_negatives=True: each direction's loss is cross-entropy over [q.k_own, q.queue, q.k_other] / T, recomputed
    here from the returned keys by hand; False keeps the reference's [q.k_own, q.queue]."""
    torch.manual_seed(0)
    obj = MoCo("i3d", queue_size=16, temperature=0.2, batch_negatives=True,
               backbone_kwargs=TINY_I3D).eval()   # eval: no EMA / enqueue
    batch = make_batch(B=3, S=32)
    q_m, q_n = obj.encode_q(batch["rgb_m"])[1], obj.encode_q(batch["rgb_n"])[1]
    (k_m,), (k_n,) = obj.key_forward(batch["rgb_m"], obj._embed_k), obj.key_forward(batch["rgb_n"], obj._embed_k)
    queue = obj.queue.snapshot()

    def by_hand(q, k, batch_negs):
        losses = []
        for i in range(len(q)):
            cands = [k[i], *queue] + ([k[j] for j in range(len(k)) if j != i] if batch_negs else [])
            logits = torch.stack([q[i] @ c for c in cands]) / 0.2
            losses.append(-torch.log_softmax(logits, 0)[0])
        return torch.stack(losses).mean()

    out = obj.instance_loss(q_m, q_n, k_m, k_n)
    assert torch.allclose(out["loss_inst"], 0.5 * (by_hand(q_m, k_n, True) + by_hand(q_n, k_m, True)), atol=1e-5)
    obj.batch_negatives = False
    out = obj.instance_loss(q_m, q_n, k_m, k_n)
    assert torch.allclose(out["loss_inst"], 0.5 * (by_hand(q_m, k_n, False) + by_hand(q_n, k_m, False)), atol=1e-5)
    # No queue (the cpu_small recipe): the candidates are the step's own keys only, B of them per query.
    obj.batch_negatives, queue = True, queue[:0]
    obj.queue = KeyQueue(0, 128)
    out = obj.instance_loss(q_m, q_n, k_m, k_n)
    assert torch.allclose(out["loss_inst"], 0.5 * (by_hand(q_m, k_n, True) + by_hand(q_n, k_m, True)), atol=1e-5)
