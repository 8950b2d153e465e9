"""Key queue (ring buffer with wrap-around) and the distributed helpers, on one and on two processes."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from model import FIMA
from model.distributed import batch_shuffle, batch_unshuffle, concat_all_gather, rank, world_size
from model.queue import KeyQueue


def numbered(start, n, dim=4):
    """Rows whose every entry is its running number, so FIFO order is easy to read back."""
    return torch.arange(start, start + n, dtype=torch.float32)[:, None].expand(n, dim).clone()


def fifo_view(q):
    """Queue rows from oldest to newest."""
    order = (q.ptr + torch.arange(q.K)) % q.K
    return q.keys[order][:, 0]


def test_wrap_around_with_a_batch_that_does_not_divide_K():
    q = KeyQueue(K=10, dim=4)
    written = 0
    for _ in range(7):  # 7 writes of 3 rows: the pointer wraps twice, never at a multiple of 3
        q.enqueue(numbered(written, 3))
        written += 3
        assert q.ptr.item() == written % 10
    assert fifo_view(q).tolist() == list(range(written - 10, written))  # the newest 10, oldest first


def test_write_larger_than_K_keeps_the_newest_rows_in_fifo_order():
    q = KeyQueue(K=5, dim=4)
    q.enqueue(numbered(0, 3))
    q.enqueue(numbered(3, 12))  # 12 > K
    assert q.ptr.item() == 15 % 5
    assert fifo_view(q).tolist() == list(range(10, 15))


def test_queue_state_and_empty_queue():
    q = KeyQueue(K=6, dim=3)
    torch.testing.assert_close(q.keys.norm(dim=1), torch.ones(6))  # random unit vectors at start
    assert set(q.state_dict()) == {"keys", "ptr"}
    snap = q.snapshot()
    q.enqueue(torch.zeros(2, 3))
    assert not torch.equal(snap, q.keys)  # the snapshot is a copy
    empty = KeyQueue(K=0, dim=3)
    empty.enqueue(torch.ones(4, 3))
    assert empty.keys.shape == (0, 3)


def test_helpers_are_identities_on_one_process():
    assert world_size() == 1 and rank() == 0
    x = torch.randn(5, 3)
    assert concat_all_gather(x) is x
    y, idx = batch_shuffle(x)
    assert y is x and idx is None and batch_unshuffle(y, idx) is x


def fima_batch(B, S, T=16):
    clip = lambda: torch.randn(B, 3, T, S, S)  # noqa: E731
    batch = {k: clip() for k in ("rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2")}
    batch["box_m"] = torch.tensor([[0.1, 0.1, 0.7, 0.8]]).repeat(B, 1)
    batch["box_n"] = torch.tensor([[0.2, 0.1, 0.8, 0.8]]).repeat(B, 1)
    return batch


def _worker(r, world, tmp):
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=r, world_size=world)
    try:
        x = torch.arange(3 * 2, dtype=torch.float32).view(3, 2) + 100 * r  # 3 rows per rank
        gathered = concat_all_gather(x)
        torch.manual_seed(10 + r)  # different generators per rank: only the broadcast makes the permutations agree
        shuffled, idx = batch_shuffle(x)
        restored = batch_unshuffle(shuffled * 2, idx)  # a per-sample "encoder"
        q = KeyQueue(K=4, dim=2)
        q.enqueue(x)  # 6 gathered rows into K = 4: wraps
        # One FIMA step per rank (different data, same initial weights): keys are shuffled across
        # ranks for BN, queues receive the keys of both ranks, so they stay identical.
        torch.manual_seed(0)
        fima = FIMA("i3d", queue_size=32, dense_queue_size=40, backbone_kwargs={"width": 0.125})
        torch.manual_seed(1 + r)
        out = fima(fima_batch(B=2, S=64))
        out["loss"].backward()
        queues = [fima.queue.keys, fima.motion_queue.keys, fima.dense_queue.keys]
        ptrs = [fima.queue.ptr.item(), fima.motion_queue.ptr.item(), fima.dense_queue.ptr.item()]
        torch.save((gathered, shuffled, restored, q.keys.clone(), q.ptr.item(), out["loss"].item(), queues, ptrs,
                    idx), f"{tmp}/rank{r}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_gather_shuffle_and_queue(tmp_path):
    world = 2
    mp.start_processes(_worker, args=(world, str(tmp_path)), nprocs=world, start_method="spawn")
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    rows = [torch.arange(6, dtype=torch.float32).view(3, 2) + 100 * r for r in range(world)]
    everything = torch.cat(rows)
    for r in range(world):
        gathered, shuffled, restored, keys, ptr, loss, _, ptrs, _ = results[r]
        assert torch.isfinite(torch.tensor(loss))
        assert ptrs == [2 * 2 * world, 4 * 2 * world, (4 * 2 * 2 * 2 * world) % 40]  # 2B, 4B, 4*B*N keys per rank
        assert torch.equal(gathered, everything)
        torch.testing.assert_close(restored, rows[r] * 2)  # un-shuffle undoes the shuffle
        assert ptr == 6 % 4
        # Newest 4 of the 6 gathered rows, at slots (0 + 2 + i) % 4.
        torch.testing.assert_close(keys[[2, 3, 0, 1]], everything[2:])
    for a, b in zip(results[0][6], results[1][6]):
        assert torch.equal(a, b)
    # Shuffle-BN: one permutation of the global batch, the same on every rank (rank 0's, broadcast), that really
    # permutes: rank r's slice is rows r*n .. of the permuted batch, and rows cross ranks.
    idx = [results[r][8] for r in range(world)]
    assert torch.equal(idx[0], idx[1])
    perm = torch.argsort(idx[0])
    assert sorted(perm.tolist()) == list(range(3 * world))
    both = torch.cat([results[0][1], results[1][1]])
    assert torch.equal(both, everything[perm])
    assert not torch.equal(both, everything)                       # not the identity
    assert (perm[:3] >= 3).any() and (perm[3:] < 3).any()           # each rank's keys go through the other rank's BN
