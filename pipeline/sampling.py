"""Pure-numpy sampling: epoch order and rank split, temporal windows, crop boxes, colour parameters.

Everything random is drawn from a generator keyed by (seed, epoch, global position), so a sample's
views are a function of where it sits in the epoch's order, not of thread timing, prefetching, the
number of ranks, or whether the run was resumed.
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.config import AugConfig


# ---------------------------------------------------------------------------------------------- order

def epoch_order(num_units: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The epoch's unit order (int64 [num_units]); the same on every rank."""
    if not shuffle:
        return np.arange(num_units, dtype=np.int64)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_units).astype(np.int64)


def steps_per_epoch(num_units: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: enough for all units, the last global batch padded."""
    return max(1, math.ceil(num_units / (world_size * batch_size)))


def padded_order(order: np.ndarray, steps: int, world_size: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Extend ``order`` to steps*world*batch entries by repeating it from the start.

    Returns (units int64 [L], is_pad bool [L]); entry p belongs to rank p % world, which sees it at step
    (p // world) // batch. The repeats are the padding (at most world*batch - 1 of them)."""
    total = steps * world_size * batch_size
    reps = math.ceil(total / len(order))
    units = np.tile(order, reps)[:total]
    is_pad = np.arange(total) >= len(order)
    return units, is_pad


def batch_positions(step: int, rank: int, world_size: int, batch_size: int) -> np.ndarray:
    """Global positions (into the padded order) of rank ``rank``'s batch at ``step``."""
    return (np.arange(step * batch_size, (step + 1) * batch_size) * world_size + rank).astype(np.int64)


def sample_rng(seed: int, epoch: int, position: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, position, 0xA06])


# ---------------------------------------------------------------------------------------------- time

def window_starts(rng: np.random.Generator, num_frames: int, length: int, count: int) -> np.ndarray:
    """``count`` random window starts in [0, num_frames - length], pairwise distinct where possible."""
    hi = num_frames - length                      # last valid start
    if hi <= 0:
        return np.zeros(count, dtype=np.int64)    # short (or exact) video: one window, edge-padded if short
    if hi + 1 >= count:
        return rng.choice(hi + 1, size=count, replace=False).astype(np.int64)
    return rng.integers(0, hi + 1, size=count).astype(np.int64)


def uniform_starts(num_frames: int, length: int, count: int) -> np.ndarray:
    """``count`` uniformly spaced window starts over all valid windows (the reference's UniformClipSampler)."""
    hi = max(num_frames - length, 0)
    return np.floor(np.linspace(0, hi, count)).astype(np.int64)


def clamp_frames(idx: np.ndarray, num_frames: int) -> np.ndarray:
    """Frame indices clamped into the video: edge padding (the last frame repeats), never black frames."""
    return np.clip(idx, 0, max(num_frames - 1, 0))


# ---------------------------------------------------------------------------------------------- space

def random_resized_crop(rng: np.random.Generator, height: int, width: int, area: tuple[float, float],
                        aspect: tuple[float, float]) -> tuple[int, int, int, int]:
    """(i, j, h, w): row, column, height, width of a random crop, torchvision's RandomResizedCrop rule
    (10 tries of area x log-uniform aspect, then a centre crop clamped to the aspect range)."""
    total = height * width
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for _ in range(10):
        target = total * rng.uniform(area[0], area[1])
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < aspect[0]:
        w, h = width, int(round(width / aspect[0]))
    elif in_ratio > aspect[1]:
        h, w = height, int(round(height * aspect[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def fixed_crop(height: int, width: int, fraction: float, position: float) -> tuple[int, int, int, int]:
    """A square crop of side fraction*short side, centred on the short axis, at ``position`` (0 = start,
    0.5 = centre, 1 = end) along the long axis."""
    side = max(1, int(round(fraction * min(height, width))))
    if width >= height:
        return (height - side) // 2, int(round((width - side) * position)), side, side
    return int(round((height - side) * position)), (width - side) // 2, side, side


def crop_box(i: int, j: int, h: int, w: int, height: int, width: int, flip: bool) -> np.ndarray:
    """(x1, y1, x2, y2) in normalised source coordinates, x1 > x2 when mirrored (the reference's convention)."""
    x1, y1 = j / (width - 1), i / (height - 1)
    x2, y2 = (j + w - 1) / (width - 1), (i + h - 1) / (height - 1)
    if flip:
        x1, x2 = x2, x1
    return np.array([x1, y1, x2, y2], dtype=np.float32)


def crop_roi(i: int, j: int, h: int, w: int, flip: bool) -> np.ndarray:
    """DALI resize ROI (y0, x0, y1, x1) in pixels; x0 > x1 makes DALI mirror the crop."""
    if flip:
        return np.array([i, j + w, i + h, j], dtype=np.float32)
    return np.array([i, j, i + h, j + w], dtype=np.float32)


# ---------------------------------------------------------------------------------------------- colour

def colour_params(rng: np.random.Generator, cfg: AugConfig) -> np.ndarray:
    """(brightness, contrast, saturation, hue in degrees, blur flag, blur sigma, blur window) for one clip,
    float32 [7].

    Grayscale is folded into saturation = 0: DALI's colour twist is one linear map in YIQ, in which
    grayscale-then-jitter equals jitter with zero saturation. The blur window is the configured kernel
    (0.1*S made odd, the reference's) cut to 2*ceil(3*sigma)+1: the weights dropped are < 0.3 % of the
    kernel, and the CPU blur's cost is linear in the window."""
    u = rng.random(8)                            # a fixed number of draws per clip, whatever the config
    gray, jitter, blur = u[0] < cfg.grayscale_p, u[1] < cfg.jitter_p, u[2] < cfg.blur_p

    def between(lo_hi, v):
        return lo_hi[0] + (lo_hi[1] - lo_hi[0]) * v

    b = between(cfg.brightness, u[3]) if jitter else 1.0
    c = between(cfg.contrast, u[4]) if jitter else 1.0
    s = between(cfg.saturation, u[5]) if jitter else 1.0
    hue = (2 * u[6] - 1) * cfg.hue * 360.0 if jitter else 0.0
    sigma = between(cfg.blur_sigma, u[7])
    window = min(cfg.kernel, 2 * math.ceil(3 * sigma) + 1)
    return np.array([b, c, 0.0 if gray else s, hue, float(blur), sigma, window], dtype=np.float32)
