"""Synthetic motion videos: the project's embedded sample, so the demo and the tests need no download.

`python -m preprocess.sample_videos OUT` writes OUT/{train,test}/<class>/<class>_NNN.mp4 (H.264, like a
typical raw input) for the `folders` format. A class is a **motion**: an object moving right, left, up,
down, or orbiting clockwise / counter-clockwise. Everything else is shared across classes by construction:
video i of every class has the *same* static background, the same object (shape, colour, size), the same
static distractor object and the same path (right and left run along the same segment in opposite directions,
up and down likewise, the two orbits on the same circle); only the direction of motion differs. So a model that
looks only at backgrounds, at one frame's appearance or at where things move is at chance on it (a
background-bias benchmark), and one that sees the direction of motion can solve it. For self-supervised
instance discrimination the same-scene videos are hard negatives that only motion direction separates;
`--scenes N` reuses N scenes across the video indices, so more of them meet in a queue.
Every object speeds up along its path, so the set also has an arrow of time (see `trajectory`).
Train and test use disjoint backgrounds (different seeds).

`--kind camera` renders the same six classes as motion of the whole picture instead (`camera_render`): a static
textured scene under a camera that pans (the content moves right / left / up / down) or rolls (the content turns
clockwise / counter-clockwise about the centre), speeding up the same way. Motion over the whole frame is what a
small model trained briefly can pick up; a small object's motion is a few per cent of a globally pooled signal
(measurements in the README's Status section).
"""
from __future__ import annotations

import argparse
import math
import subprocess
import sys
from functools import partial
from pathlib import Path

import ffmpeg
import numpy as np
from tqdm import tqdm

from .video import ffmpeg_exe

CLASSES = ("right", "left", "up", "down", "clockwise", "counterclockwise")


def bilinear(img: np.ndarray, iy: np.ndarray, ix: np.ndarray, fy: np.ndarray, fx: np.ndarray) -> np.ndarray:
    """img [H, W, C] sampled between its pixels (iy, ix) and (iy + 1, ix + 1) at fractions (fy, fx) [..., 1]."""
    return (img[iy, ix] * (1 - fy) * (1 - fx) + img[iy + 1, ix] * fy * (1 - fx)
            + img[iy, ix + 1] * (1 - fy) * fx + img[iy + 1, ix + 1] * fy * fx)


def background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A static textured background [h, w, 3] uint8: smooth colour noise, stripes, checks or a gradient."""
    return background_of_kind(int(rng.integers(4)), rng, h, w)


def background_of_kind(kind: int, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == 0:    # smooth colour noise: low-res noise upsampled
        small = rng.uniform(0, 255, size=(h // 24 + 2, w // 24 + 2, 3)).astype(np.float32)
        iy = np.clip((yy / 24).astype(int), 0, small.shape[0] - 2)
        ix = np.clip((xx / 24).astype(int), 0, small.shape[1] - 2)
        img = bilinear(small, iy, ix, (yy / 24 - iy)[..., None], (xx / 24 - ix)[..., None])
    elif kind == 1:  # stripes at a random angle
        a, period = rng.uniform(0, math.pi), rng.uniform(10, 40)
        t = (np.sin((xx * math.cos(a) + yy * math.sin(a)) * 2 * math.pi / period) + 1) / 2
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        img = t[..., None] * c1 + (1 - t[..., None]) * c2
    elif kind == 2:  # checkerboard
        s = int(rng.integers(12, 40))
        t = (((yy // s) + (xx // s)) % 2)[..., None]
        img = t * rng.uniform(0, 255, 3) + (1 - t) * rng.uniform(0, 255, 3)
    else:            # two-colour gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (xx * math.cos(a) + yy * math.sin(a))
        t = ((t - t.min()) / (np.ptp(t) + 1e-6))[..., None]
        img = t * rng.uniform(0, 255, 3) + (1 - t) * rng.uniform(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


SHAPES = ("disk", "square", "diamond", "triangle", "cross", "ring")


def object_mask(shape: int, size: int) -> np.ndarray:
    """A boolean [size, size] mask of SHAPES[shape]: disk, square, diamond, triangle, cross or ring."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size]
    if shape == 0:
        return (yy - c) ** 2 + (xx - c) ** 2 <= c ** 2
    if shape == 1:
        return np.ones((size, size), bool)
    if shape == 2:
        return np.abs(yy - c) + np.abs(xx - c) <= c
    if shape == 3:                                   # apex up
        return np.abs(xx - c) <= yy / 2 + 0.5
    if shape == 4:
        return (np.abs(yy - c) <= size / 6) | (np.abs(xx - c) <= size / 6)
    r2 = (yy - c) ** 2 + (xx - c) ** 2
    return (r2 <= c ** 2) & (r2 >= (0.55 * c) ** 2)


def object_side(rng: np.random.Generator, lo: int, hi: int, scale: float) -> int:
    """A shape's side in pixels: drawn in [lo, hi) for a 240-px short side, times scale (short side / 240), >= 4."""
    return max(4, round(int(rng.integers(lo, hi)) * scale))


def paste(frame: np.ndarray, mask: np.ndarray, colour: np.ndarray, y: float, x: float) -> None:
    s = mask.shape[0]
    y0, x0 = int(round(y)), int(round(x))
    h, w = frame.shape[:2]
    ys, xs = slice(max(y0, 0), min(y0 + s, h)), slice(max(x0, 0), min(x0 + s, w))
    m = mask[ys.start - y0: ys.stop - y0, xs.start - x0: xs.stop - x0]
    frame[ys, xs][m] = colour


ACCELERATION = 1.6   # progress along the path = u ** ACCELERATION: every object speeds up (see `trajectory`)


def speeding_up(n: int) -> np.ndarray:
    """[n] progress from 0 to 1 over n frames, u ** ACCELERATION: slow at first, faster later."""
    return (np.arange(n) / max(n - 1, 1)) ** ACCELERATION


def trajectory(motion: str, rng: np.random.Generator, n: int, h: int, w: int, size: int) -> np.ndarray:
    """[n, 2] top-left (y, x) positions; the whole path stays inside the frame.

    Every object speeds up along its path (progress u ** ACCELERATION over the video): the data has an arrow of time.
    Played backwards a "right" video is a *slowing* leftward motion, which no video shows, so forward and
    time-reversed clips can be told apart (what `python -m evaluate temporal` measures). At constant speed
    the class set would be time-symmetric (reversed "right" = "left") and temporal order unlearnable."""
    margin = 4
    progress = speeding_up(n)
    if motion in ("right", "left", "up", "down"):
        along = w if motion in ("right", "left") else h
        travel = (along - size - 2 * margin) * rng.uniform(0.6, 1.0)
        start = margin + rng.uniform(0, along - size - 2 * margin - travel)
        # left / up: the same path mirrored in space (not reversed in time, which would make it slow down)
        pos = start + travel * (1 - progress if motion in ("left", "up") else progress)
        across = w if motion in ("up", "down") else h
        other = np.full(n, rng.uniform(margin, across - size - margin))
        return np.stack([other, pos] if motion in ("right", "left") else [pos, other], 1)
    radius = rng.uniform(0.18, 0.3) * min(h, w)
    cy = rng.uniform(radius + margin, h - radius - size - margin)
    cx = rng.uniform(radius + margin, w - radius - size - margin)
    phase = rng.uniform(0, 2 * math.pi)
    turns = rng.uniform(0.75, 1.25)
    sign = 1 if motion == "clockwise" else -1       # image y points down: +angle turns clockwise on screen
    ang = phase + sign * 2 * math.pi * turns * progress
    return np.stack([cy + radius * np.sin(ang), cx + radius * np.cos(ang)], 1)


def render(motion: str, scene_seed: int, motion_seed: int, frames: int, h: int, w: int) -> np.ndarray:
    """[frames, h, w, 3] uint8. The scene (background, object, distractor) comes from scene_seed only."""
    scene = np.random.default_rng(scene_seed)
    bg = background(scene, h, w)
    scale = min(h, w) / 240                 # object sizes are drawn for a 240-px short side and scaled with it
    size = object_side(scene, 24, 44, scale)
    mask = object_mask(int(scene.integers(3)), size)
    colour = scene.uniform(0, 255, 3).astype(np.uint8)
    d_mask = object_mask(int(scene.integers(3)), object_side(scene, 20, 40, scale))
    d_colour = scene.uniform(0, 255, 3).astype(np.uint8)
    d_pos = scene.uniform(0, h - d_mask.shape[0]), scene.uniform(0, w - d_mask.shape[0])
    path = trajectory(motion, np.random.default_rng(motion_seed), frames, h, w, size)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        out[t] = bg
        paste(out[t], d_mask, d_colour, *d_pos)
        paste(out[t], mask, colour, *path[t])
    return out


def actor_render(motion: str, scene_seed: int, motion_seed: int, frames: int, h: int, w: int) -> np.ndarray:
    """[frames, h, w, 3] uint8: the actor kind. Like `render`, but the class is carried by *what moves and how*: the
    moving object has the class's shape (SHAPES[class number]) and motion, as an actor's look and movement make an
    action; everything static is shared by the classes (video i of every class has the same background, the same
    object colour and size, the same path and the same static distractors, whose shapes are drawn from all six,
    so a shape seen standing still says nothing). A model must attend to the moving object to tell the classes
    apart: the background-bias test that FAME and FIMA are about, at a scale a CPU learns in minutes."""
    scene = np.random.default_rng(scene_seed)
    bg = background(scene, h, w)
    scale = min(h, w) / 240
    size = object_side(scene, 40, 56, scale)
    colour = scene.uniform(0, 255, 3).astype(np.uint8)
    mask = object_mask(CLASSES.index(motion) % len(SHAPES), size)
    for _ in range(2):                                     # static distractors of any shape
        d_mask = object_mask(int(scene.integers(len(SHAPES))), object_side(scene, 36, 52, scale))
        paste(bg, d_mask, scene.uniform(0, 255, 3).astype(np.uint8),
              scene.uniform(0, h - d_mask.shape[0]), scene.uniform(0, w - d_mask.shape[0]))
    path = trajectory(motion, np.random.default_rng(motion_seed), frames, h, w, size)
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        out[t] = bg
        paste(out[t], mask, colour, *path[t])
    return out


def camera_texture(rng: np.random.Generator, side: int, scale: float) -> np.ndarray:
    """A [side, side, 3] uint8 scene for the camera kind: smooth colour noise with static shapes on it. Textured
    everywhere (no stripes or gradients, whose motion is ambiguous or invisible along their direction)."""
    img = background_of_kind(0, rng, side, side)
    for _ in range(int(rng.integers(8, 16)) * max(1, round((side / 480) ** 2))):
        m = object_mask(int(rng.integers(3)), object_side(rng, 20, 60, scale))
        paste(img, m, rng.uniform(0, 255, 3).astype(np.uint8), *rng.uniform(0, side - m.shape[0], 2))
    return img


def camera_render(motion: str, scene_seed: int, motion_seed: int, frames: int, h: int, w: int,
                  drift: int = 0) -> np.ndarray:
    """[frames, h, w, 3] uint8: the camera kind. The whole picture moves: a static textured scene seen by a camera
    that pans (content moves right / left / up / down in the frame) or rolls (content turns clockwise /
    counter-clockwise about the frame centre). The scene comes from scene_seed, the speed from motion_seed; the
    motion speeds up like `trajectory` (progress u ** ACCELERATION), so the set keeps an arrow of time.
    Bilinear sampling of the scene canvas; the canvas is large enough that the frame never leaves it.
    ``drift`` > 0 (the drift kind): the scene itself changes, cross-fading to a new texture every ``drift`` frames,
    so that two windows of a video far apart share its motion but not its appearance."""
    scene, speed = np.random.default_rng(scene_seed), np.random.default_rng(motion_seed)
    short = min(h, w)
    travel = speed.uniform(0.8, 1.1) * short * frames / 64          # pixels over the video: ~3 px per frame at 240
    turn = speed.uniform(0.5, 0.75) * math.pi * frames / 64         # radians over the video for the rolls
    side = int(math.ceil(math.hypot(h, w) + 2 * travel)) + 4
    canvases = [camera_texture(scene, side, short / 240).astype(np.float32)
                for _ in range(frames // drift + 2 if drift else 1)]
    progress = speeding_up(frames)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    py, px = yy - (h - 1) / 2, xx - (w - 1) / 2                     # output pixel relative to the frame centre
    c = (side - 1) / 2
    out = np.empty((frames, h, w, 3), np.uint8)
    for t, p in enumerate(progress):
        dy, dx, ang = 0.0, 0.0, 0.0
        if motion in ("right", "left"):
            dx = travel * (p - 0.5) * (1 if motion == "right" else -1)
        elif motion in ("up", "down"):
            dy = travel * (p - 0.5) * (1 if motion == "down" else -1)
        else:                                   # image y points down: +angle turns clockwise on screen
            ang = turn * (p - 0.5) * (1 if motion == "clockwise" else -1)
        # content moved by (dy, dx) and turned by ang: output pixel p shows scene point R(-ang) (p - shift)
        qy, qx = py - dy, px - dx
        sy = c + math.cos(ang) * qy - math.sin(ang) * qx
        sx = c + math.sin(ang) * qy + math.cos(ang) * qx
        y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
        if drift:                               # the scene of frame t: a cross-fade between consecutive textures
            k, a = divmod(t / drift, 1.0)
            canvas = (1 - a) * canvases[int(k)] + a * canvases[int(k) + 1]
        else:
            canvas = canvases[0]
        img = bilinear(canvas, y0, x0, (sy - y0)[..., None], (sx - x0)[..., None])
        out[t] = np.clip(img + 0.5, 0, 255).astype(np.uint8)
    return out


DRIFT_FRAMES = 16   # the drift kind's scene changes completely every 16 frames (a FIMA window is 32)
KINDS = {"object": render, "camera": camera_render, "drift": partial(camera_render, drift=DRIFT_FRAMES),
         "actor": actor_render}


def encode(frames: np.ndarray, path: Path, fps: int = 25, pix_fmt: str = "yuv420p") -> None:
    """Encode RGB frames to H.264 MP4 with the project's ffmpeg (raw frames through a pipe, no shell)."""
    n, h, w, _ = frames.shape
    cmd = (ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{w}x{h}", framerate=fps)
           .output(str(path), vcodec="libx264", pix_fmt=pix_fmt, crf=18, preset="veryfast", g=32, f="mp4",
                   fflags="+bitexact", threads=1)
           .global_args("-nostdin", "-hide_banner", "-loglevel", "error").overwrite_output().compile(ffmpeg_exe()))
    proc = subprocess.run(cmd, input=frames.tobytes(), capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-500:]}")


MIN_SIDE = 40    # the largest object (0.18 x the short side) on the largest orbit (0.3 x) still fits inside the frame


def check_size(width: int, height: int) -> None:
    if min(height, width) < MIN_SIDE:
        raise ValueError(f"sample videos of {width}x{height}: both sides must be at least {MIN_SIDE} px (the largest "
                         "orbit with the largest object needs it)")


def make_sample_videos(out: Path, classes: tuple[str, ...] = CLASSES, train_per_class: int = 8,
                       test_per_class: int = 4, frames: int = 64, height: int = 240, width: int = 320,
                       seed: int = 0, progress: bool = True, scenes: int = 0, kind: str = "object") -> list[Path]:
    """Render and encode the set; returns the video paths. ``scenes``: distinct scenes per split (video i gets
    scene i mod scenes); 0 = one per video index (video i of every class shares scene i). ``kind``: "object"
    (an object moves over a static scene, `render`) or "camera" (the whole picture moves, `camera_render`)."""
    check_size(width, height)
    if kind not in KINDS:
        raise ValueError(f"sample kind {kind!r}: choose from {', '.join(KINDS)}")
    out = Path(out)
    jobs = [(split, c, i) for split, n in (("train", train_per_class), ("test", test_per_class))
            for c in classes for i in range(n)]
    paths = []
    for split, c, i in tqdm(jobs, desc="sample videos", unit="video", disable=not progress):
        path = out / split / c / f"{c}_{i:03d}.mp4"
        paths.append(path)
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        split_id = 0 if split == "train" else 1
        base = (seed * 1000 + split_id) * 100_003
        scene_seed = base + (i % scenes if scenes else i)    # shared by every class: same scene
        motion_seed = base + i                               # one path per video index, shared by the classes too
        tmp = path.with_name(f".{path.stem}.tmp.mp4")
        encode(KINDS[kind](c, scene_seed, motion_seed, frames, height, width), tmp)
        tmp.replace(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m preprocess.sample_videos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="output folder (gets train/<class>/ and test/<class>/)")
    p.add_argument("--classes", type=int, default=len(CLASSES), choices=range(2, len(CLASSES) + 1),
                   help=f"use the first N motion classes of {', '.join(CLASSES)} (default: all)")
    p.add_argument("--train-per-class", type=int, default=8, help="training videos per class")
    p.add_argument("--test-per-class", type=int, default=4, help="test videos per class")
    p.add_argument("--frames", type=int, default=64, help="frames per video (25 fps)")
    p.add_argument("--size", default="320x240", help="frame size WxH")
    p.add_argument("--seed", type=int, default=0, help="seed of scenes and motions")
    p.add_argument("--scenes", type=int, default=0, help="distinct scenes per split, reused in turn (video i gets "
                   "scene i mod N); fewer scenes make scene identity a weaker cue for self-supervised instance "
                   "discrimination (default 0: one scene per video index, shared by the classes)")
    p.add_argument("--kind", choices=tuple(KINDS), default="object",
                   help="object: one object moves over a static scene, the classes are its motion (a background-bias "
                   "benchmark); camera: the whole picture pans or rolls, the classes are that motion (motion over "
                   "the whole frame, which a small model learns from labels in minutes on a CPU); drift: the camera "
                   "kind over a scene that cross-fades to a new texture every 16 frames, so only the motion persists "
                   "through a video (two windows of one video share nothing else); actor: the moving object's shape "
                   "and motion are the class, everything static is shared by the classes (default: object)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if a.scenes < 0:
        p.error(f"--scenes {a.scenes}: give a positive number of scenes, or 0 for one per video index")
    w, h = (int(v) for v in a.size.split("x"))
    try:
        check_size(w, h)
    except ValueError as e:
        p.error(f"--size: {e}")
    paths = make_sample_videos(a.out, CLASSES[: a.classes], a.train_per_class, a.test_per_class, a.frames, h, w,
                               a.seed, not a.no_progress, a.scenes, a.kind)
    print(f"{len(paths)} videos in {a.out} ({a.classes} {a.kind}-motion classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
