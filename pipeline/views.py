"""What a loader cuts out of each video: the static view layout, and per sample the numbers DALI needs.

A *view* is one clip taken from a decoded window with its own crop and flip. Pretraining has up to six
(per window m and n: the global clip, every ``stride``-th frame, and the two local halves); evaluation
has one. The graph (``pipeline/graph.py``) is built from a ``Spec``; per sample, a ``Feed`` says which
frames to decode (sorted, each once) and where each view's frames sit in that decoded list.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline import sampling
from pipeline.config import EVAL_KEYS, PRETRAIN_CLIPS, PRETRAIN_META, AugConfig
from pipeline.shards import Sample


@dataclass(frozen=True)
class View:
    name: str                      # "gm", "m1", "m2", "gn", "n1", "n2" or "eval"
    window: int                    # 0 (m) or 1 (n)
    offsets: tuple[int, ...]       # the clip's T frame offsets inside its window
    prev: int | None = None        # offset of the frame before the clip (frame0="prev", diff requested)
    rgb: str | None = None         # output key: normalised RGB, colour-augmented when listed in Spec.colour_keys
    raw: str | None = None         # output key: cropped RGB in [0, 1], no colour aug, no normalisation
    diff: str | None = None        # output key: colour-augmented, normalised frame differences

    @property
    def length(self) -> int:       # frames fed to the crop: the clip, plus its predecessor in "prev" mode
        return len(self.offsets) + (self.prev is not None)


@dataclass(frozen=True)
class Spec:
    views: tuple[View, ...]
    colour_keys: tuple[str, ...]   # outputs with colour augmentation, in slot order of Feed.colour
    meta_keys: tuple[str, ...]     # non-clip outputs, fed straight through
    clip_keys: tuple[str, ...]     # clip outputs, in the order the graph returns them
    cfg: AugConfig

    @property
    def feed_fields(self) -> tuple[str, ...]:
        """External-source outputs, in order: only what the graph uses."""
        video = ("encoded", "frames", "orders", "rois") if self.views else ()
        return video + (("colour",) if self.colour_keys else ()) + self.meta_keys


@dataclass
class Feed:
    """One sample's inputs to the DALI graph (the external source outputs)."""
    encoded: np.ndarray            # uint8 [nbytes]
    frames: np.ndarray             # int32 [F]: frame indices to decode, sorted, unique
    orders: np.ndarray             # int32 [views, Lmax]: positions in ``frames`` of each view's frames
    rois: np.ndarray               # float32 [views, 4]: crop (y0, x0, y1, x1) in pixels, x0 > x1 = mirrored
    colour: np.ndarray             # float32 [colour outputs, 7]: see sampling.colour_params
    meta: dict = field(default_factory=dict)
    short: bool = False            # a window ran past the end (edge-padded)
    same_window: bool = False      # the video had room for only one window position
    decoded: int = 0               # frames the decoder works through (from the start, or the kept GOPs)


# Canonical pretraining views: (name, window, part); every random draw is made for all of them, in this
# order, so asking for fewer outputs never changes the crops and colours of the others.
_PRETRAIN_VIEWS = (("gm", 0, "global"), ("m1", 0, "local1"), ("m2", 0, "local2"),
                   ("gn", 1, "global"), ("n1", 1, "local1"), ("n2", 1, "local2"))
_PRETRAIN_COLOUR = ("rgb_m", "rgb_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2")


def pretrain_spec(outputs: tuple[str, ...], cfg: AugConfig) -> Spec:
    unknown = [k for k in outputs if k not in PRETRAIN_CLIPS + PRETRAIN_META]
    if unknown:
        raise ValueError(f"unknown pretraining outputs {unknown}; available: {PRETRAIN_CLIPS + PRETRAIN_META}")
    T, st = cfg.num_frames, cfg.stride
    wants_local = any(k in outputs for k in ("diff_m1", "diff_m2", "diff_n1", "diff_n2"))
    if wants_local and st != 2:
        raise ValueError(f"local clips are the two halves of a window of 2T frames: they need stride 2, not {st}")
    views = []
    for name, window, part in _PRETRAIN_VIEWS:
        c = "m" if window == 0 else "n"
        if part == "global":
            offsets, prev, keys = tuple(range(0, T * st, st)), -st, dict(rgb=f"rgb_{c}", raw=f"raw_{c}", diff=f"diff_{c}")
        else:
            half = 0 if part == "local1" else T
            offsets, prev, keys = tuple(range(half, half + T)), half - 1, dict(diff=f"diff_{c}{part[-1]}")
        keys = {k: (v if v in outputs else None) for k, v in keys.items()}
        if not any(keys.values()):
            continue
        views.append(View(name, window, offsets, prev if (keys["diff"] and cfg.frame0 == "prev") else None, **keys))
    colour = tuple(k for k in _PRETRAIN_COLOUR if k in outputs) if cfg.color_aug else ()
    clips = tuple(k for k in PRETRAIN_CLIPS if k in outputs)
    meta = tuple(k for k in PRETRAIN_META if k in outputs)
    return Spec(tuple(views), colour, meta, clips, cfg)


def eval_spec(mode: str, cfg: AugConfig, outputs: tuple[str, ...]) -> Spec:
    if mode not in ("train", "test"):
        raise ValueError(f"eval mode {mode!r}: choose 'train' or 'test'")
    colour = mode == "train" and cfg.color_aug
    offsets = tuple(range(0, cfg.num_frames * cfg.stride, cfg.stride))
    view = View("eval", 0, offsets, rgb="video")
    unknown = [k for k in outputs if k not in EVAL_KEYS]
    if unknown:
        raise ValueError(f"unknown eval outputs {unknown}; available: {EVAL_KEYS}")
    meta = tuple(k for k in EVAL_KEYS[1:] if k in outputs)
    views, clips = ((view,), ("video",)) if "video" in outputs else ((), ())
    return Spec(views, ("video",) if colour and views else (), meta, clips, cfg)


def _assemble(spec: Spec, sample: Sample, starts: np.ndarray, crops: dict, colour: dict, meta: dict,
              window_length: int) -> Feed:
    """Turn window starts and per-view crops into decode indices, view orders and ROIs."""
    nf = sample.num_frames
    wanted = []
    for v in spec.views:
        offs = ([v.prev] if v.prev is not None else []) + list(v.offsets)
        wanted.append(sampling.clamp_frames(starts[v.window] + np.asarray(offs), nf))
    frames = np.unique(np.concatenate(wanted)) if wanted else np.zeros(1, np.int64)
    lmax = max((v.length for v in spec.views), default=1)
    orders = np.zeros((len(spec.views), lmax), dtype=np.int32)
    rois = np.zeros((len(spec.views), 4), dtype=np.float32)
    for k, (v, idx) in enumerate(zip(spec.views, wanted)):
        orders[k, :len(idx)] = np.searchsorted(frames, idx)
        i, j, h, w, flip = crops[v.name]
        rois[k] = sampling.crop_roi(i, j, h, w, flip)
    col = np.stack([colour[k] for k in spec.colour_keys]) if spec.colour_keys else np.zeros((1, 7), np.float32)
    return Feed(encoded=sample.data, frames=frames.astype(np.int32), orders=orders, rois=rois, colour=col,
                meta={k: meta[k] for k in spec.meta_keys},
                short=nf < window_length, same_window=nf <= window_length,
                decoded=int(frames.max()) + 1 if spec.views else 0)


def pretrain_feed(spec: Spec, sample: Sample, rng: np.random.Generator) -> Feed:
    cfg = spec.cfg
    length = cfg.num_frames * cfg.stride
    starts = sampling.window_starts(rng, sample.num_frames, length, 2)
    H, W = sample.height, sample.width
    crops = {}
    for name, _, _ in _PRETRAIN_VIEWS:
        i, j, h, w = sampling.random_resized_crop(rng, H, W, cfg.crop_area, cfg.crop_aspect)
        crops[name] = (i, j, h, w, bool(rng.random() < cfg.flip_p))
    colour = {k: sampling.colour_params(rng, cfg) for k in _PRETRAIN_COLOUR}
    boxes = {}
    for name, key in (("gm", "box_m"), ("gn", "box_n"), ("m1", "box_m1"), ("m2", "box_m2"), ("n1", "box_n1"),
                      ("n2", "box_n2")):
        boxes[key] = sampling.crop_box(*crops[name][:4], H, W, crops[name][4])
    meta = {**boxes,
            "frame_hw": np.array([H, W], dtype=np.float32),
            "label": np.array(sample.label, dtype=np.int64), "index": np.array(sample.index, dtype=np.int64),
            "start_m": np.array(starts[0], dtype=np.int64), "start_n": np.array(starts[1], dtype=np.int64)}
    return _assemble(spec, sample, starts, crops, colour, meta, length)


def eval_feed(spec: Spec, sample: Sample, rng: np.random.Generator, clip: int, crop: int, mode: str,
              pad: bool) -> Feed:
    """One evaluation clip. ``clip``/``crop`` pick the test-mode window and crop; padding units are
    marked with label = index = clip = crop = -1."""
    cfg = spec.cfg
    length = cfg.num_frames * cfg.stride
    H, W = sample.height, sample.width
    if mode == "train":
        starts = sampling.window_starts(rng, sample.num_frames, length, 1)
        i, j, h, w = sampling.random_resized_crop(rng, H, W, cfg.crop_area, cfg.crop_aspect)
        crop_params = (i, j, h, w, bool(rng.random() < cfg.flip_p))
        colour = {"video": sampling.colour_params(rng, cfg)}
    else:
        starts = sampling.uniform_starts(sample.num_frames, length, cfg.test_clips)[clip:clip + 1]
        position = 0.5 if cfg.test_crops == 1 else (0.0, 0.5, 1.0)[crop]
        crop_params = (*sampling.fixed_crop(H, W, cfg.test_crop_fraction, position), False)
        colour = {}
    mark = -1 if pad else None
    meta = {"label": np.array(mark if pad else sample.label, dtype=np.int64),
            "index": np.array(mark if pad else sample.index, dtype=np.int64),
            "clip": np.array(mark if pad else clip, dtype=np.int64), "crop": np.array(mark if pad else crop, dtype=np.int64),
            "start": np.array(starts[0], dtype=np.int64)}
    return _assemble(spec, sample, starts, {"eval": crop_params}, colour, meta, length)
