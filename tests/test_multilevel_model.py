"""The multi-level objective on CPU at toy widths: backbone levels, motion excitation, time reversal, one
training step before and after `split`, gradient routing, prototype freezing and renormalisation, the
prototype queue (Sinkhorn on it from `queue_start`, state_dict round trip), DDP over two gloo processes."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import OBJECTIVES, MultiLevel, build_backbone, build_objective
from model.r3d_multilevel import MotionExcitation, time_reversed_batch

TINY = {"widths": (8, 16, 32, 64)}  # ME reduction 16 -> 1 and 2 channels at low / mid
CLIPS = ("clip_a", "clip_b", "clip_g")


pytestmark = pytest.mark.usefixtures("one_thread")   # conftest.py: toy sizes run single-threaded


def make_batch(B=2, T=16, S=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(B, 3, T, S, S, generator=gen).contiguous(memory_format=torch.channels_last_3d)
            for k in CLIPS}


def tiny(**kw):
    torch.manual_seed(0)
    kw = {"cluster": 12, "proto_queue": 10, "split": 2, "proto_queue_start": 1, **kw}
    return build_objective("multilevel", backbone_kwargs=TINY, **kw).train()


def grad_norm(params):
    return sum(float(p.grad.norm()) ** 2 for p in params if p.grad is not None) ** 0.5


# --- backbone -------------------------------------------------------------------------------------

def test_r3d18_ml_levels_at_full_size():
    """Shapes and parameter count of the published width, computed on the meta device (no arithmetic)."""
    with torch.device("meta"):
        net = build_backbone("r3d18_ml")
        low, mid, high = net.forward_levels(torch.empty(2, 3, 16, 112, 112))
        last = net(torch.empty(1, 3, 16, 224, 224))
    assert (low.shape, mid.shape, high.shape) == ((2, 128, 8, 14, 14), (2, 256, 4, 7, 7), (2, 512, 2, 4, 4))
    assert last.shape == (1, 512, 2, 7, 7) and net.feature_dim == 512 and net.level_dims == (128, 256, 512)
    assert sum(p.numel() for p in net.parameters()) == 33_203_904  # r3d18 + (7*7*7 - 3*7*7) * 3 * 64
    stem_conv, pool = net.stem[0], net.stem[3]
    assert stem_conv.kernel_size == (7, 7, 7) and stem_conv.stride == (1, 2, 2)
    assert isinstance(pool, nn.MaxPool3d) and pool.kernel_size == (1, 3, 3) and pool.stride == (1, 2, 2)


# --- motion excitation and time reversal ------------------------------------------------------------

def slow_motion_excitation(me: MotionExcitation, x: torch.Tensor) -> torch.Tensor:
    """The reference's per-frame 2D formulation (A.4), frame by frame, in training-mode BatchNorm."""
    N, C, T, H, W = x.shape
    r = me.reduce.out_channels
    frames = x.permute(0, 2, 1, 3, 4).reshape(N * T, C, H, W)  # (N*T) x C x H x W, per-frame 2D images

    def bn(y, mod):  # batch statistics over all frames, as BatchNorm2d on (N*T) samples
        mean, var = y.mean(dim=(0, 2, 3), keepdim=True), y.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        return (y - mean) / torch.sqrt(var + mod.eps) * mod.weight.view(1, -1, 1, 1) + mod.bias.view(1, -1, 1, 1)

    xr = bn(F.conv2d(frames, me.reduce.weight[:, :, 0]), me.bn1)  # (N*T) x r x H x W
    xp = F.conv2d(xr, me.depthwise.weight[:, :, 0], padding=1, groups=r)
    xr, xp = xr.view(N, T, r, H, W), xp.view(N, T, r, H, W)
    m = torch.zeros(N, T, r, 1, 1)
    for t in range(T - 1):
        m[:, t] = (xp[:, t + 1] - xr[:, t]).mean(dim=(2, 3), keepdim=True)
    gate = torch.sigmoid(bn(F.conv2d(m.view(N * T, r, 1, 1), me.expand.weight[:, :, 0]), me.bn3)) - 0.5
    out = frames + gate * frames
    return out.view(N, T, C, H, W).permute(0, 2, 1, 3, 4)


def test_motion_excitation_matches_per_frame_reference():
    torch.manual_seed(0)
    me = MotionExcitation(32, reduction=16).train()
    for mod in (me.bn1, me.bn3):  # non-trivial affine parameters
        nn.init.uniform_(mod.weight, 0.5, 1.5)
        nn.init.uniform_(mod.bias, -0.2, 0.2)
    x = torch.randn(3, 32, 5, 6, 7)
    torch.testing.assert_close(me(x), slow_motion_excitation(me, x), rtol=1e-4, atol=1e-5)
    # the gate depends on the temporal order: reversing the input does not just reverse the output
    assert not torch.allclose(me(x.flip(2)), me(x).flip(2), atol=1e-3)


def test_time_reversal_batches_the_flipped_copy():
    x = torch.randn(2, 4, 5, 3, 3)
    y = time_reversed_batch(x)
    assert y.shape == (4, 4, 5, 3, 3)
    assert torch.equal(y[:2], x) and torch.equal(y[2:], x.flip(2))
    for t in range(5):
        assert torch.equal(y[2:, :, t], x[:, :, 4 - t])


def test_objective_reverses_features_not_frames():
    """levels(): rows 3B.. of the mid/low outputs are the ME block applied to the layer maps flipped in time."""
    obj = tiny().eval()
    batch = make_batch()
    feats = obj.levels(*(batch[k] for k in CLIPS))
    x = torch.cat([batch[k] for k in CLIPS])
    low, mid, high = obj.encoder_q.forward_levels(x)
    want = obj.me_mid(time_reversed_batch(mid)).mean(dim=(3, 4)).transpose(1, 2)
    torch.testing.assert_close(feats["mid"], want)
    assert feats["low"].shape == (12, 8, 16) and feats["mid"].shape == (12, 4, 32) and feats["high"].shape == (6, 2, 64)


# --- the objective ---------------------------------------------------------------------------------

def test_registry_interface_and_cluster_width():
    assert OBJECTIVES["multilevel"] is MultiLevel and MultiLevel.required_inputs == CLIPS
    obj = tiny(cluster=7, proto_queue=5)
    assert obj.prototypes.weight.shape == (7, 128) and obj.proto_queue.shape == (5, 2, 7)
    assert tiny(dim=16).prototypes.weight.shape == (12, 16)
    with pytest.raises(ValueError):
        build_objective("multilevel", backbone="r3d18", backbone_kwargs=TINY)  # no forward_levels
    with pytest.raises(ValueError):
        tiny(grad_gather="some")


@pytest.mark.parametrize("T,S", [(16, 32), (32, 48)])
def test_any_grid(T, S):
    """Nothing assumes 16x112: 32 frames give 16/8/4 steps, 48 px a 2x2 last grid."""
    obj = tiny()
    batch = make_batch(T=T, S=S)
    x = torch.cat([batch[k] for k in CLIPS])
    with torch.no_grad():
        low, mid, high = obj.encoder_q.forward_levels(x)
    # time halves from layer 2 on (T/2, T/4, T/8); space halves in the stem (conv, pool) and every layer from 2 on:
    # S/8, S/16, S/32, rounded up
    grid = [-(-S // f) for f in (8, 16, 32)]
    assert low.shape == (6, 16, T // 2, grid[0], grid[0])
    assert mid.shape == (6, 32, T // 4, grid[1], grid[1])
    assert high.shape == (6, 64, T // 8, grid[2], grid[2])
    if (T, S) == (32, 48):
        assert (low.shape[2], mid.shape[2], high.shape[2]) == (16, 8, 4) and high.shape[3:] == (2, 2)
    feats = obj.levels(*(batch[k] for k in CLIPS))      # time kept, space pooled, reversed copies at low / mid
    assert feats["low"].shape == (12, T // 2, 16) and feats["mid"].shape == (12, T // 4, 32)
    assert feats["high"].shape == (6, T // 8, 64)
    out = obj(batch)
    assert out["loss"].shape == () and all(torch.isfinite(v).all() for v in out.values())


def test_training_step_before_and_after_split():
    """Finite loss and gradients; the total is the weighted sum of the logged terms; graph heads get zero
    gradient before `split` (and are frozen), real gradient from `split` on; the prototypes are frozen in
    epoch 0 only and L2-renormalised before every training forward; the key modules all receive gradient."""
    obj = tiny()
    with torch.no_grad():
        obj.prototypes.weight.mul_(3.0)
    opt = torch.optim.Adam(obj.parameters(), lr=1e-3, weight_decay=1e-5)
    graph_params = list(obj.graph_heads.parameters())
    for epoch in (0, 1, 2):
        obj.set_epoch(epoch)
        out = obj(make_batch(seed=epoch))  # renormalises the prototypes first
        torch.testing.assert_close(obj.prototypes.weight.norm(dim=1), torch.ones(12))
        snapshot = {n: p.detach().clone() for n, p in obj.named_parameters()}
        assert all(torch.isfinite(v).all() for v in out.values())
        total = sum(w * out[k] for k, w in obj.term_weights().items())
        torch.testing.assert_close(out["loss"], total)
        assert set(obj.term_weights()) | {"loss"} == {k for k in out if k.startswith("loss")}
        assert out["graph_on"].item() == float(epoch >= 2)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in obj.parameters())
        for mod in (obj.encoder_q, obj.me_low, obj.me_mid, obj.contrast_heads, obj.lg_heads, obj.global_head):
            assert grad_norm(mod.parameters()) > 0
        assert grad_norm(obj.prototypes.parameters()) > 0
        assert (grad_norm(graph_params) > 0) == (epoch >= 2)
        frozen = {id(p) for p in obj.frozen_parameters()}
        assert (id(obj.prototypes.weight) in frozen) == (epoch == 0)
        assert all((id(p) in frozen) == (epoch < 2) for p in graph_params)
        obj.drop_frozen_grads()
        opt.step()
        moved = {n for n, p in obj.named_parameters() if not torch.equal(p, snapshot[n])}
        assert ("prototypes.weight" in moved) == (epoch > 0)
        assert any(n.startswith("graph_heads.") for n in moved) == (epoch >= 2)
        assert any(n.startswith("encoder_q.") for n in moved)


def test_graph_target_carries_no_gradient():
    """The graph terms reach the graph heads and the backbone, never the instance head or the prototypes
    that define the target."""
    obj = tiny()
    obj.set_epoch(5)
    out = obj(make_batch())
    graph = out["loss_graph_high"] + out["loss_graph_mid"] + out["loss_graph_low"]
    graph.backward()
    assert grad_norm(obj.graph_heads.parameters()) > 0 and grad_norm(obj.encoder_q.parameters()) > 0
    for mod in (obj.contrast_heads, obj.global_head, obj.prototypes):
        assert all(p.grad is None for p in mod.parameters())


def test_prototype_queue_and_state_dict_round_trip():
    """The queue takes the batch's A/B logits as its newest rows at every training step (not in eval);
    from `queue_start` the codes come from Sinkhorn over the whole queue; the queue travels in state_dict."""
    obj = tiny(proto_queue_start=1)
    batch = make_batch()
    queue0 = obj.proto_queue.clone()
    obj(batch)
    q1 = obj.proto_queue.clone()
    torch.testing.assert_close(q1[:-2], queue0[2:])  # shifted by B = 2, newest last
    with torch.no_grad():
        e = F.normalize(obj.global_head(obj.levels(*(batch[k] for k in CLIPS))["high"].mean(dim=1)), dim=1)
        want = obj.prototypes(e).view(3, 2, -1)[:2].transpose(0, 1)
    torch.testing.assert_close(q1[-2:], want, rtol=1e-4, atol=1e-5)  # (also shows the BN in train mode)
    obj.eval()(batch)
    assert torch.equal(obj.proto_queue, q1)

    # epoch 0 vs queue_start: same model, same batch, different codes (batch-only vs queue Sinkhorn)
    a, b = copy.deepcopy(obj).eval(), copy.deepcopy(obj).eval()
    a.set_epoch(0)
    b.set_epoch(1)
    assert abs(a(batch)["loss_proto"].item() - b(batch)["loss_proto"].item()) > 1e-6

    restored = tiny(proto_queue_start=1)
    restored.load_state_dict(obj.state_dict())
    assert torch.equal(restored.proto_queue, obj.proto_queue)
    for m in (restored, obj):
        m.eval().set_epoch(3)
    out_r, out_o = restored(batch), obj(batch)
    for k in out_o:
        torch.testing.assert_close(out_r[k], out_o[k])


def test_eval_forward_changes_no_state():
    obj = tiny().eval()
    before = copy.deepcopy(obj.state_dict())
    obj(make_batch())
    assert all(torch.equal(before[k], v) for k, v in obj.state_dict().items())


def test_bf16_autocast_runs_losses_in_fp32():
    obj = tiny()
    ref = copy.deepcopy(obj)
    batch = make_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(batch)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    want = ref(batch)["loss"].item()
    assert abs(out["loss"].item() - want) < 0.05 * want


# --- two processes ----------------------------------------------------------------------------------

def _ddp_worker(r, world, tmp):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=r, world_size=world)
    try:
        raw = tiny(split=1, proto_queue_start=1)  # same initial weights on both ranks (seeded)
        model = DDP(raw, broadcast_buffers=False)  # no find_unused_parameters
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-5)
        graph0 = [p.detach().clone() for p in raw.graph_heads.parameters()]
        moved = []
        for step, epoch in enumerate((0, 1, 1)):  # each forward checks that the previous step reduced every grad
            raw.set_epoch(epoch)
            out = model(make_batch(B=1, seed=10 * step + r))  # different videos per rank
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            raw.drop_frozen_grads()
            opt.step()
            moved.append(any(not torch.equal(p, q) for p, q in zip(raw.graph_heads.parameters(), graph0)))
        torch.save((raw.state_dict(), moved, float(out["loss"])), f"{tmp}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_across_split(tmp_path):
    """DDP (gloo, no find_unused_parameters) over two epochs with split = 1: no unused-parameter error when
    the graph heads switch on, the graph heads stay put before `split` and move after it, and both ranks end
    with identical parameters and prototype queues (the queue holds both ranks' logits)."""
    import torch.multiprocessing as mp
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path)), nprocs=2, start_method="spawn")
    (sd0, moved0, loss0), (sd1, moved1, loss1) = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert moved0 == moved1 == [False, True, True]
    assert all(torch.isfinite(torch.tensor(x)) for x in (loss0, loss1))
    for k in sd0:
        if "running_" in k or "num_batches_tracked" in k:  # per-rank BatchNorm statistics may differ
            continue
        torch.testing.assert_close(sd0[k], sd1[k], msg=k)
