"""Views of the multi-level method (Qian et al., ICCV 2021): clips A, B and G of one video.

Per video (notes/multilevel-and-evaluation.md A.3 and F.8; the reference's rule):
1. step r ~ U[lo, min(hi, F / 2T)] with (lo, hi) = ``AugConfig.ml_rate`` (1, 3); r = lo when that range is
   empty (a video shorter than 2T frames);
2. start s ~ integer U[0, int(F - 2T r)] (inclusive; 0 when negative);
3. indices i_k = round-half-even(s + r k), k = 0 .. 2T-1, clamped to F - 1 (edge padding, never black);
4. A = i_0 .. i_{T-1}, B = i_T .. i_{2T-1}, G = i_0, i_2, .., i_{2T-2} (A and B at half the rate).
Each clip has its own random-resized crop and flip (``crop_area``, ``crop_aspect``, ``flip_p``) and its own
colour draw. Colour is clip-consistent by default (the FIMA pipeline's ``_colour``: jitter, grayscale folded
into saturation 0, blur, per clip); ``AugConfig.per_frame_colour=True`` draws the jitter and grayscale for
every frame independently, as the reference does (blur stays per clip). The reference's other numbers are
in ``REFERENCE_AUG`` (crop 112, area 0.5-1, jitter 0.5/0.5/0.5/0.25 with p 1, grey p 0.5, no blur, ImageNet
mean/std, per-frame colour).

Outputs (``pretrain_loader(dir, MULTILEVEL_OUTPUTS)`` gives clips A, B, G; any subset of these keys works):
* "clip_a", "clip_b", "clip_g": float32 [B, 3, T, S, S] channels_last_3d, colour-augmented and normalised;
* "raw_a", "raw_b", "raw_g": the cropped clips in [0, 1] without colour augmentation or normalisation;
* "box_a", "box_b", "box_g" [B, 4] crop boxes (pipeline.sampling.crop_box), "frame_hw" [B, 2] float32;
* "ml_frames" int64 [B, 2T] (the 2T indices), "ml_step" float64 [B], "ml_start" int64 [B];
  "label", "index" int64 [B].
Every random number is drawn in Python from (seed, epoch, position), in a fixed order (step, start, crops
of A, B, G, colours of A, B, G), whatever outputs are requested.
"""
from __future__ import annotations

import numpy as np
import nvidia.dali.math as dmath
from nvidia.dali import fn, pipeline_def, types

from pipeline import sampling
from pipeline.config import IMAGENET_MEAN, IMAGENET_STD, MULTILEVEL_OUTPUTS, AugConfig
from pipeline.graph import META_DTYPES, _colour, _normalise, feed_and_decode, view_clip
from pipeline.shards import Sample
from pipeline.views import Feed, Spec, View

__all__ = ["MULTILEVEL_CLIPS", "MULTILEVEL_META", "MULTILEVEL_OUTPUTS", "REFERENCE_AUG", "clip_frames",
           "draw_step_and_start", "is_multilevel", "multilevel_feed", "multilevel_graph", "multilevel_indices",
           "multilevel_spec"]

MULTILEVEL_CLIPS = ("clip_a", "clip_b", "clip_g", "raw_a", "raw_b", "raw_g")
MULTILEVEL_META = ("box_a", "box_b", "box_g", "frame_hw", "ml_frames", "ml_step", "ml_start", "label", "index")
_CLIPS = ("a", "b", "g")

# The reference's augmentation (augmentation.py, train.py), as AugConfig fields.
REFERENCE_AUG = dict(crop_size=112, crop_area=(0.5, 1.0), grayscale_p=0.5, jitter_p=1.0, brightness=(0.5, 1.5),
                     contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue=0.25, blur_p=0.0, mean=IMAGENET_MEAN,
                     std=IMAGENET_STD, per_frame_colour=True, ml_rate=(1.0, 3.0))

_DTYPES = {**META_DTYPES, "box_a": types.FLOAT, "box_b": types.FLOAT, "box_g": types.FLOAT,
           "ml_frames": types.INT64, "ml_step": types.FLOAT64, "ml_start": types.INT64}


def is_multilevel(outputs: tuple[str, ...]) -> bool:
    """True when ``outputs`` asks for multi-level views (any multi-level-only key)."""
    only = set(MULTILEVEL_CLIPS + MULTILEVEL_META) - {"frame_hw", "label", "index"}
    return any(k in only for k in outputs)


# ---------------------------------------------------------------------------------------------- sampling

def draw_step_and_start(rng: np.random.Generator, num_frames: int, count: int,
                        rate: tuple[float, float]) -> tuple[float, int]:
    """(r, s): the step r ~ U[rate[0], min(rate[1], F / count)] and the start s ~ U{0 .. int(F - count r)}."""
    lo = float(rate[0])
    hi = max(lo, min(float(rate[1]), num_frames / count))
    step = float(rng.uniform(lo, hi))
    start = int(rng.integers(0, max(int(num_frames - count * step), 0) + 1))
    return step, start


def multilevel_indices(num_frames: int, step: float, start: int, count: int) -> np.ndarray:
    """int64 [count]: round-half-even(start + step * k), clamped into the video."""
    return sampling.clamp_frames(np.rint(start + step * np.arange(count)).astype(np.int64), num_frames)


def clip_frames(indices: np.ndarray) -> dict[str, np.ndarray]:
    """The 2T indices -> {"a": first T, "b": next T, "g": every second of all 2T}."""
    T = len(indices) // 2
    return {"a": indices[:T], "b": indices[T:], "g": indices[::2]}


# ---------------------------------------------------------------------------------------------- spec, feed

def multilevel_spec(outputs: tuple[str, ...], cfg: AugConfig) -> Spec:
    unknown = [k for k in outputs if k not in MULTILEVEL_CLIPS + MULTILEVEL_META]
    if unknown:
        raise ValueError(f"unknown multi-level outputs {unknown}; available: {MULTILEVEL_CLIPS + MULTILEVEL_META}")
    lo, hi = cfg.ml_rate
    if not 0 < lo <= hi:
        raise ValueError(f"ml_rate={cfg.ml_rate}: need 0 < low <= high")
    views = []
    for c in _CLIPS:   # offsets: positions 0..T-1 inside the clip (the frames themselves are per sample)
        rgb, raw = (k if k in outputs else None for k in (f"clip_{c}", f"raw_{c}"))
        if rgb or raw:
            views.append(View(c, 0, tuple(range(cfg.num_frames)), rgb=rgb, raw=raw))
    colour = tuple(f"clip_{c}" for c in _CLIPS if f"clip_{c}" in outputs) if cfg.color_aug else ()
    clips = tuple(k for k in MULTILEVEL_CLIPS if k in outputs)
    meta = tuple(k for k in MULTILEVEL_META if k in outputs)
    return Spec(tuple(views), colour, meta, clips, cfg)


def multilevel_feed(spec: Spec, sample: Sample, rng: np.random.Generator) -> Feed:
    """One video's feed. ``Feed.colour`` is float32 [colour outputs, T, 7]: a row per frame (all rows equal
    unless ``per_frame_colour``)."""
    cfg = spec.cfg
    T, nf, H, W = cfg.num_frames, sample.num_frames, sample.height, sample.width
    step, start = draw_step_and_start(rng, nf, 2 * T, cfg.ml_rate)
    indices = multilevel_indices(nf, step, start, 2 * T)
    parts = clip_frames(indices)
    crops = {}
    for c in _CLIPS:
        i, j, h, w = sampling.random_resized_crop(rng, H, W, cfg.crop_area, cfg.crop_aspect)
        crops[c] = (i, j, h, w, bool(rng.random() < cfg.flip_p))
    colour = {}
    for c in _CLIPS:
        if cfg.per_frame_colour:
            colour[f"clip_{c}"] = np.stack([sampling.colour_params(rng, cfg) for _ in range(T)])   # T x 7
        else:
            colour[f"clip_{c}"] = np.repeat(sampling.colour_params(rng, cfg)[None], T, axis=0)     # T x 7
    wanted = [parts[v.name] for v in spec.views]
    frames = np.unique(np.concatenate(wanted)) if wanted else np.zeros(1, np.int64)
    orders = np.zeros((len(spec.views), T), dtype=np.int32)
    rois = np.zeros((len(spec.views), 4), dtype=np.float32)
    for k, (v, idx) in enumerate(zip(spec.views, wanted)):
        orders[k] = np.searchsorted(frames, idx)
        rois[k] = sampling.crop_roi(*crops[v.name])
    col = (np.stack([colour[k] for k in spec.colour_keys]) if spec.colour_keys
           else np.zeros((1, T, 7), np.float32)).astype(np.float32)
    meta = {f"box_{c}": sampling.crop_box(*crops[c][:4], H, W, crops[c][4]) for c in _CLIPS}
    meta.update({"frame_hw": np.array([H, W], dtype=np.float32), "ml_frames": indices.astype(np.int64),
                 "ml_step": np.array(step, dtype=np.float64), "ml_start": np.array(start, dtype=np.int64),
                 "label": np.array(sample.label, dtype=np.int64), "index": np.array(sample.index, dtype=np.int64)})
    return Feed(encoded=sample.data, frames=frames.astype(np.int32), orders=orders, rois=rois, colour=col,
                meta={k: meta[k] for k in spec.meta_keys}, short=nf < 2 * T, same_window=nf <= 2 * T,
                decoded=int(frames.max()) + 1 if spec.views else 0)


# ---------------------------------------------------------------------------------------------- graph

def _colour_per_frame(x, p, spec: Spec):
    """Colour twist with a parameter row per frame (p: [T, 7]), clamp, and the clip's blur (row 0's)."""
    x = fn.color_twist(x, brightness=fn.per_frame(p[:, 0]), contrast=fn.per_frame(p[:, 1]),
                       saturation=fn.per_frame(p[:, 2]), hue=fn.per_frame(p[:, 3]), dtype=types.FLOAT)
    x = dmath.clamp(x, 0.0, 255.0)
    if spec.cfg.blur_p > 0:
        if fn.cast(p[0, 4], dtype=types.BOOL):
            x = fn.gaussian_blur(x, window_size=fn.cast(p[0, 6], dtype=types.INT32), sigma=p[0, 5])
    return x


@pipeline_def(enable_conditionals=True)
def multilevel_graph(spec: Spec, source, backend: str):
    """pipeline.graph.video_graph for the multi-level feed: decode the needed frames once, then per clip
    rearrange -> crop/flip/resize -> colour -> normalise (clip_*) and / 255 (raw_*)."""
    cfg = spec.cfg
    node, video = feed_and_decode(spec, source, backend, _DTYPES)
    colour = node.get("colour")
    slot = {k: i for i, k in enumerate(spec.colour_keys)}
    out = {}
    for k, v in enumerate(spec.views):
        clip = view_clip(video, node, k, v.length, spec)                                    # T x S x S x 3 uint8
        if v.rgb:
            x = clip
            if v.rgb in slot:
                p = colour[slot[v.rgb]]                                                        # T x 7
                x = _colour_per_frame(x, p, spec) if cfg.per_frame_colour else _colour(x, p[0], 255.0, spec)
            out[v.rgb] = _normalise(x, 255.0, spec)
        if v.raw:
            out[v.raw] = clip * (1.0 / 255.0)
    return tuple(out[k] for k in spec.clip_keys) + tuple(node[k] for k in spec.meta_keys)
