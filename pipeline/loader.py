"""Loaders: the sample order kept outside DALI, fed through an external source, batches as torch tensors.

DALI 2.4 cannot checkpoint a pipeline that holds ``decoders.video``, so the order lives here: per epoch
a permutation of the shard set from (seed, epoch), padded by repetition to steps x world x batch and dealt
to ranks round-robin. Every rank runs ``len(loader)`` steps per epoch; ``state_dict()`` is (epoch, step)
and ``load_state_dict()`` continues the same stream (and, since every random draw is keyed by
(seed, epoch, position), the same crops and colours).

    loader = pretrain_loader("OUT/train", model.required_inputs, batch_size=8, rank=r, world_size=w, seed=0,
                             backend="gpu")
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # dict of tensors; clips [B,3,T,S,S] float32, channels_last_3d
            ...

Bad samples (a damaged tar member, an index that points elsewhere, a video the decoder rejects) do not end a
run. A read failure is caught where the sample is read; a decode failure fails the whole DALI batch, so the
loader decodes each pending sample alone to find the culprit(s), then rebuilds the pipeline at the same
position. Either way the sample joins ``loader.bad`` (video index -> record: key, shard, byte offset, error,
epoch, step, rank) and is never fed again, and its place in the stream goes to a deterministic substitute:
**the next good sample in that epoch's order** (wrapping round), drawn with the random numbers of the bad
sample's position. So batch shapes and per-rank step counts never change, and the stream depends only on
the set of bad samples, not on when they were found: a resumed run that is told the bad set up front
(``exclude()``) feeds exactly what the uninterrupted run fed. Test-mode loaders (evaluation clips) feed a
padding unit instead (label = index = -1), so a bad test video is left out of the metrics, and reported.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from pipeline import sampling
from pipeline.config import AugConfig
from pipeline.container import ivf_frame_count, trim_to_ivf
from pipeline.graph import BACKENDS, video_graph
from pipeline.multilevel import is_multilevel, multilevel_feed, multilevel_graph, multilevel_spec
from pipeline.shards import CodecError, SampleError, ShardSet, check_codec
from pipeline.views import Spec, eval_feed, eval_spec, pretrain_feed, pretrain_spec
from preprocess import shard_format

log = logging.getLogger(__name__)


class VideoLoader:
    """Batches of one shard set for one rank. Build with ``pretrain_loader`` or ``eval_loader``."""

    def __init__(self, shard_dir: str | Path, spec: Spec, kind: str, *, batch_size: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, backend: str = "cpu", device_id: int | None = None,
                 num_threads: int | None = None, prefetch: int = 2, io_threads: int = 4, trim: bool | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: choose one of {sorted(BACKENDS)}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.shards = ShardSet(shard_dir)
        self.spec, self.kind = spec, kind            # kind: "pretrain", "multilevel", "train" or "test"
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.backend = backend
        self.device_id = device_id if backend == "cpu" or device_id is not None else int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu") if backend == "cpu" else torch.device("cuda", self.device_id)
        self.num_threads = num_threads or max(1, len(os.sched_getaffinity(0)) // (1 if backend == "cpu" else
                                                                                    int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
        self.prefetch = prefetch
        # Cut each video to the GOPs its clips need (pipeline/container.py): DALI 2.4's CPU decoder does not seek
        # in in-memory videos, and fewer packets cannot cost pixels (bit-identical, tested) whether NVDEC seeks or
        # not, so on by default on both backends; trim=False is the switch (benchmarks compare both).
        self.trim = True if trim is None else trim
        cfg = spec.cfg
        self.clips_per_video = cfg.test_clips * cfg.test_crops if kind == "test" else 1
        self.num_units = len(self.shards) * self.clips_per_video
        self.steps = sampling.steps_per_epoch(self.num_units, world_size, batch_size)
        self.epoch, self.step = 0, 0                  # position of the next batch handed out
        # counts over the samples fed so far: "short" (window edge-padded), "same_window", "padding" (repeats
        # filling the last batch), "decoded_frames" (frames the decoder works through, GOP lead-ins included)
        self.stats = collections.Counter()
        self._pipe = None
        self._orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.bad: dict[int, dict] = {}           # video index -> record of why it is set aside
        self._new_bad: list[dict] = []           # found since the last take_new_bad()
        self._bad_lock = threading.Lock()
        self._io = ThreadPoolExecutor(max_workers=max(1, io_threads))
        self._check_first_sample()

    # ------------------------------------------------------------------ public
    def __len__(self) -> int:
        """Steps per epoch, the same on every rank."""
        return self.steps

    @property
    def num_videos(self) -> int:
        return len(self.shards)

    @property
    def padding_per_epoch(self) -> int:
        """Units repeated to fill the last global batch (all ranks together)."""
        return self.steps * self.world_size * self.batch_size - self.num_units

    def exclude(self, records: list[dict]) -> int:
        """Set samples aside before they are met: records with "index" (from ``bad`` / bad_samples.jsonl) or
        just "key" (e.g. `python -m preprocess verify`'s bad_keys.txt). Keys of other shard sets are ignored.
        Returns how many samples of this set were added. Prefetched batches are dropped (re-fed without them)."""
        def named(r):      # a record's index is trusted when the key there is its key
            i = r.get("index")
            return i is not None and 0 <= int(i) < len(self.shards) and self.shards.key(int(i)) == r["key"]
        # keys looked up in one pass over the index files, only for records that need it (a key list)
        by_key = self.shards.find_keys({r["key"] for r in records if r.get("key") and not named(r)})
        added = 0
        for r in records:   # the key is the identity; an index alone only for sets whose index has no names
            index = (int(r["index"]) if named(r) else by_key.get(r["key"])) if r.get("key") else r.get("index")
            if index is not None and int(index) not in self.bad:
                self.bad[int(index)] = dict(r, index=int(index))
                added += 1
        if added:
            self._pipe = None
        return added

    def take_new_bad(self) -> list[dict]:
        """The bad-sample records found since the last call (to log, and to share with the other ranks)."""
        with self._bad_lock:
            out, self._new_bad = self._new_bad, []
        return out

    def set_epoch(self, epoch: int) -> None:
        """Jump to the start of ``epoch`` unless that epoch is already the current one."""
        if epoch != self.epoch:
            self._seek(epoch, 0)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "world_size": self.world_size,
                "batch_size": self.batch_size, "num_units": self.num_units}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_units", self.num_units) != self.num_units or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"reader state is for {state.get('num_units')} units with seed {state.get('seed')}, this "
                             f"loader has {self.num_units} with seed {self.seed}: the shard set or seed changed")
        step = int(state["step"])
        old = state.get("world_size", self.world_size) * state.get("batch_size", self.batch_size)
        new = self.world_size * self.batch_size
        if old != new:   # a different global batch: continue from the same number of consumed units
            step = -(-step * old // new)
            log.warning("global batch changed from %d to %d: resuming at step %d of the epoch", old, new, step)
        self._seek(int(state["epoch"]), step)

    def __iter__(self):
        """The remaining batches of the current epoch; then the loader moves on to the next epoch."""
        while self.step < self.steps:
            yield self._next()
        self.epoch, self.step = self.epoch + 1, 0

    def close(self) -> None:
        self._pipe = None
        self._io.shutdown(wait=False)
        self.shards.close()

    # ------------------------------------------------------------------ feeding
    def _check_first_sample(self) -> None:
        """Fail at construction, not inside DALI, when the backend cannot decode the shards."""
        codec = str((self.shards.manifest.get("encoding") or {}).get("codec", ""))
        known = shard_format.codec_named(codec)
        if self.backend == "cpu" and known is not None and not known.cpu:
            raise CodecError(f"{self.shards.dir}: the shards are {codec}, which DALI's CPU video decoder cannot decode "
                             f"(it handles {shard_format.cpu_decodable_text()} only). Re-shard with VP9: "
                             "`python -m preprocess SRC OUT --codec vp9`, or use backend='gpu'.")
        for index in range(len(self.shards)):
            try:
                sample = self.shards.read(index)
            except SampleError:
                continue                  # set aside when the stream meets it
            check_codec(sample, self.backend, str(self.shards.tars[0]))
            return
        raise SampleError(f"{self.shards.dir}: no sample of the {len(self.shards)} can be read: check the shards with "
                          f"`python -m preprocess verify {self.shards.dir}`")

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._orders:
            shuffle = self.kind != "test"
            order = sampling.epoch_order(self.num_units, self.seed, epoch, shuffle)
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = sampling.padded_order(order, self.steps, self.world_size, self.batch_size)
        return self._orders[epoch]

    def _feed_one(self, epoch: int, position: int, unit: int, pad: bool):
        video = unit // self.clips_per_video
        sample = self.shards.read(video)
        check_codec(sample, self.backend, str(self.shards.dir))
        rng = sampling.sample_rng(self.seed, epoch, position)
        if self.kind == "multilevel":
            feed = multilevel_feed(self.spec, sample, rng)
        elif self.kind == "pretrain":
            feed = pretrain_feed(self.spec, sample, rng)
        else:
            cfg = self.spec.cfg
            clip, crop = ((unit // cfg.test_crops) % cfg.test_clips, unit % cfg.test_crops) if self.kind == "test" else (0, 0)
            feed = eval_feed(self.spec, sample, rng, clip, crop, self.kind, pad and self.kind == "test")
        if self.trim and sample.track is not None and self.spec.views:
            cut = trim_to_ivf(sample.data, sample.track, feed.frames)
            if cut is not None:
                feed.encoded, feed.frames = cut
                feed.decoded = ivf_frame_count(cut[0])
        return feed

    def _mark_bad(self, err: SampleError, epoch: int, step: int) -> None:
        record = {"key": err.key or self.shards.key(err.index), "index": err.index, "shard": err.shard,
                  "offset": err.offset, "error": str(err), "epoch": epoch, "step": step, "rank": self.rank}
        with self._bad_lock:
            if err.index not in self.bad:
                self.bad[err.index] = record
                self._new_bad.append(record)
                log.info("bad sample set aside: %s", err)

    def _stand_in(self, units: np.ndarray, is_pad: np.ndarray, p: int) -> tuple[int, bool]:
        """(unit, padding?) fed at position p: its own unit, or for a bad video the next good one in the epoch's
        order (test mode: that one as padding, label -1, so the metrics skip it)."""
        good = lambda u: int(u) // self.clips_per_video not in self.bad      # noqa: E731
        if good(units[p]):
            return int(units[p]), bool(is_pad[p])
        for q in range(p + 1, p + len(units)):
            if good(units[q % len(units)]):
                return int(units[q % len(units)]), self.kind == "test" or bool(is_pad[p])
        raise SampleError(f"{self.shards.dir}: every sample is set aside as bad: check the shards with "
                          f"`python -m preprocess verify {self.shards.dir}`")

    def _feed_at(self, epoch: int, step: int, p: int):
        """(video index, feed) of stream position p, setting aside (and replacing) samples that cannot be read."""
        units, is_pad = self._order(epoch)
        while True:
            unit, pad = self._stand_in(units, is_pad, p)
            try:
                return unit // self.clips_per_video, self._feed_one(epoch, p, unit, pad)
            except SampleError as e:
                self._mark_bad(e, epoch, step)

    def _batch_feeds(self, epoch: int, step: int) -> list:
        pos = sampling.batch_positions(step, self.rank, self.world_size, self.batch_size)
        return [f for _, f in self._io.map(lambda p: self._feed_at(epoch, step, int(p)), pos)]

    def _columns(self, feeds: list) -> tuple:
        fields = {"encoded": lambda f: f.encoded, "frames": lambda f: f.frames, "orders": lambda f: f.orders,
                  "rois": lambda f: f.rois, "colour": lambda f: f.colour}
        return tuple([fields[k](f) if k in fields else f.meta[k] for f in feeds] for k in self.spec.feed_fields)

    def _source(self):
        """External-source callback: the next batch of the stream (DALI calls it ahead, by ``prefetch``)."""
        epoch, step = self._fed
        units, is_pad = self._order(epoch)
        pos = sampling.batch_positions(step, self.rank, self.world_size, self.batch_size)
        feeds = self._batch_feeds(epoch, step)
        self.stats["short"] += sum(f.short for f in feeds)
        self.stats["same_window"] += sum(f.same_window for f in feeds)
        self.stats["padding"] += int(is_pad[pos].sum())
        self.stats["decoded_frames"] += sum(f.decoded for f in feeds)
        if self.stats["short"] and not self._warned_short and any(f.short for f in feeds):
            self._warned_short = True
            log.warning("%s: videos shorter than a window (%d frames) are edge-padded (last frame repeated); "
                        "loader.stats['short'] counts them", self.shards.dir, self.spec.cfg.num_frames * self.spec.cfg.stride)
        self._pending.append((epoch, step))
        self._fed = (epoch, step + 1) if step + 1 < self.steps else (epoch + 1, 0)
        return self._columns(feeds)

    # ------------------------------------------------------------------ running
    def _seek(self, epoch: int, step: int) -> None:
        if step >= self.steps:
            epoch, step = epoch + 1, 0
        self.epoch, self.step = epoch, step
        self._pipe = None                         # prefetched batches belong to the old position

    def _graph(self, source, batch_size: int, num_threads: int, prefetch: int):
        graph = multilevel_graph if self.kind == "multilevel" else video_graph
        pipe = graph(self.spec, source, self.backend, batch_size=batch_size, num_threads=num_threads,
                     device_id=None if self.backend == "cpu" else self.device_id, prefetch_queue_depth=prefetch,
                     seed=self.seed)
        pipe.build()
        return pipe

    def _build(self) -> None:
        self._fed = (self.epoch, self.step)
        self._pending = collections.deque()
        self._warned_short = getattr(self, "_warned_short", False)
        self._pipe = self._graph(self._source, self.batch_size, self.num_threads, self.prefetch)

    def _decodes_alone(self, feed) -> str | None:
        """None when one sample's feed runs through the graph on its own, else DALI's error text."""
        cols = self._columns([feed])
        try:
            self._graph(lambda: cols, 1, 1, 1).run()
        except RuntimeError as e:
            return _dali_reason(e)
        return None

    def _find_culprits(self) -> int:
        """After a failed batch: decode each sample of the batches in flight alone; set aside those that fail.
        Returns how many were found (0: the failure was not a sample's)."""
        found = 0
        for epoch, step in list(self._pending):
            for p in sampling.batch_positions(step, self.rank, self.world_size, self.batch_size):
                video, feed = self._feed_at(epoch, step, int(p))
                error = self._decodes_alone(feed)
                if error is not None:
                    shard, offset = self.shards.location(video)
                    self._mark_bad(SampleError(f"{shard}: sample {video} ({self.shards.key(video)}) at byte {offset} "
                                               f"does not decode: {error}", video, self.shards.key(video), shard,
                                               offset), epoch, step)
                    found += 1
            if found:
                return found
        return found

    def _next(self) -> dict[str, torch.Tensor]:
        while True:
            if self._pipe is None:
                self._build()
            try:
                outs = self._pipe.run()
                break
            except RuntimeError as e:
                self._pipe = None                 # a failed DALI pipeline cannot go on: rebuilt at this position
                if not self._find_culprits():
                    raise RuntimeError(f"{self.shards.dir}: a batch failed at epoch {self.epoch}, step {self.step}, "
                                       f"and no single sample of it fails alone: {e}") from e
        fed = self._pending.popleft()
        assert fed == (self.epoch, self.step), f"pipeline returned batch {fed}, expected {(self.epoch, self.step)}"
        keys = self.spec.clip_keys + self.spec.meta_keys
        batch = {}
        for key, tl in zip(keys, outs):
            t = _to_torch(tl, self.device)
            batch[key] = t.permute(0, 4, 1, 2, 3) if key in self.spec.clip_keys else t   # B,T,S,S,C -> B,C,T,S,S
        self.step += 1
        return batch


def _dali_reason(e: Exception) -> str:
    """The line of a DALI pipeline error that says what went wrong (its text also holds a traceback of the graph
    definition and C++ context): the 'encountered:' line, else the first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if "encountered:" in lines[:-1]:
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else type(e).__name__


def _to_torch(tl, device: torch.device) -> torch.Tensor:
    """Copy a dense DALI TensorList into a new torch tensor: GPU outputs stay on the GPU (copied on the current
    stream), CPU outputs (the small meta fields on the gpu backend too) are moved to ``device``."""
    from nvidia.dali.backend import TensorListGPU
    from nvidia.dali.plugin.pytorch import feed_ndarray, to_torch_type
    on_gpu = isinstance(tl, TensorListGPU)
    t = tl.as_tensor()
    out = torch.empty(t.shape(), dtype=to_torch_type[t.dtype], device=device if on_gpu else "cpu")
    feed_ndarray(t, out, cuda_stream=torch.cuda.current_stream(device) if on_gpu else None)
    return out if out.device == device else out.to(device, non_blocking=True)


def pretrain_loader(shard_dir: str | Path, outputs: tuple[str, ...], *, batch_size: int,
                    config: AugConfig | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                    backend: str = "cpu", device_id: int | None = None, num_threads: int | None = None,
                    prefetch: int = 2, trim: bool | None = None) -> VideoLoader:
    """Pretraining views of ``shard_dir`` (e.g. OUT/train). ``outputs``: the keys to produce, typically a built
    objective's ``required_inputs`` (pipeline.config.PRETRAIN_CLIPS + PRETRAIN_META, or the multi-level keys of
    pipeline/multilevel.py); only those are computed."""
    if isinstance(outputs, str):
        raise TypeError(f"outputs={outputs!r}: give the keys to produce (an objective's required_inputs), not a name")
    outputs = tuple(outputs)
    if is_multilevel(outputs):
        spec, kind = multilevel_spec(outputs, config or AugConfig()), "multilevel"
    else:
        spec, kind = pretrain_spec(outputs, config or AugConfig()), "pretrain"
    return VideoLoader(shard_dir, spec, kind, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       backend=backend, device_id=device_id, num_threads=num_threads, prefetch=prefetch, trim=trim)


def eval_loader(shard_dir: str | Path, mode: str = "test", *, batch_size: int, config: AugConfig | None = None,
                outputs: tuple[str, ...] = ("video", "label", "index"), seed: int = 0, rank: int = 0,
                world_size: int = 1, backend: str = "cpu", device_id: int | None = None,
                num_threads: int | None = None, prefetch: int = 2, trim: bool | None = None) -> VideoLoader:
    """Evaluation clips: mode "train" = one random window per video with crop/flip (+ colour aug unless
    config.color_aug is False), reshuffled per epoch; mode "test" = config.test_clips uniformly spaced clips x
    config.test_crops crops per video, in order, each exactly once over all ranks; the units that pad the last
    global batch have label = index = clip = crop = -1. Default config: AugConfig(blur_p=0)."""
    spec = eval_spec(mode, config or AugConfig(blur_p=0.0), tuple(outputs))
    return VideoLoader(shard_dir, spec, mode, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size,
                       backend=backend, device_id=device_id, num_threads=num_threads, prefetch=prefetch, trim=trim)
