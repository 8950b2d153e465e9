"""Class-agnostic activation maps: where does the backbone's last feature map respond?

Per clip (``test_clips`` uniform windows x centre crop, the test sampling): map = channel mean (``--map mean``)
or channel L2 norm (``--map norm``) of the last feature map [T', H', W'], min-max normalised per clip,
upsampled trilinearly to the clip's T x S x S and overlaid on its frames with a jet colour map. Written per
video: ``<index>-<key>.png`` (per clip a row of frames above a row of overlays, ``--grid-frames`` columns of
``--tile`` pixels) and ``<index>-<key>.mp4`` / ``.gif`` (frame | overlay, every frame of every clip).

``motion_focus`` (results.json, the table): the mean map value on pixels that differ from the clip's
temporal median frame (the things that move), over the mean map value on all pixels. Above 1: the map
favours the moving actor; below 1: the background.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline import eval_loader

from .backbone import EvalError
from .context import Context
from .data import Split, test_config
from .report import write_results

MOVING_THRESHOLD = 0.1        # mean absolute RGB difference from the temporal median (in [0, 1]) that counts as moving


def select_videos(split: Split, wanted: list[str], limit: int = 8) -> list[int]:
    """Sample indices from indices or keys (exact, or a unique prefix); by default the first video of each
    class (up to ``limit``), or the first ``limit`` videos of an unlabelled set."""
    n = split.num_videos
    keys = [split.shards.key(i) or split.shards.read(i).key for i in range(n)]
    if not wanted:
        labels = split.shards.labels()
        if (labels >= 0).any():
            first = {}
            for i, c in enumerate(labels.tolist()):
                first.setdefault(c, i)
            return [first[c] for c in sorted(first) if c >= 0][:limit]
        return list(range(min(limit, n)))
    out = []
    for w in wanted:
        if w.lstrip("-").isdigit():
            i = int(w)
            if not 0 <= i < n:
                raise EvalError(f"video index {i} out of range: {split.dir} holds {n} videos (0..{n - 1})")
            out.append(i)
            continue
        hits = [i for i, k in enumerate(keys) if k == w] or [i for i, k in enumerate(keys) if k.startswith(w)]
        if len(hits) != 1:
            what = "no video" if not hits else f"{len(hits)} videos ({[keys[i] for i in hits[:4]]})"
            raise EvalError(f"--videos {w!r}: {what} in {split.dir} has that key or key prefix; keys look like "
                            f"{keys[:3]}")
        out.append(hits[0])
    return out


def jet(x: np.ndarray) -> np.ndarray:
    """[...] in [0, 1] -> [..., 3] RGB in [0, 1] (blue low, red high)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    return np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)


def activation_maps(backbone, video: torch.Tensor, how: str = "mean") -> torch.Tensor:
    """Clip batch [N,3,T,S,S] -> maps [N,T,S,S] in [0, 1] (min-max per clip), upsampled from the last feature map."""
    fmap = backbone(video).float()                                  # N x C x T' x H' x W'
    m = fmap.mean(dim=1) if how == "mean" else fmap.norm(dim=1)     # N x T' x H' x W'
    flat = m.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    m = (m - lo[:, None, None, None]) / (hi - lo).clamp_min(1e-8)[:, None, None, None]
    size = video.shape[2:]                                          # T, S, S
    return F.interpolate(m[:, None], size=size, mode="trilinear", align_corners=False)[:, 0].clamp(0, 1)


def motion_focus(frames: np.ndarray, maps: np.ndarray) -> float | None:
    """frames [T,S,S,3] in [0,1], maps [T,S,S]: mean map on moving pixels / mean map overall (None: nothing moves)."""
    moving = np.abs(frames - np.median(frames, axis=0, keepdims=True)).mean(-1) > MOVING_THRESHOLD
    if not moving.any() or maps.mean() <= 0:
        return None
    return float(maps[moving].mean() / maps.mean())


def _resize(img: np.ndarray, tile: int) -> np.ndarray:
    if img.shape[0] == tile:
        return img
    return np.asarray(Image.fromarray(img).resize((tile, tile), Image.BILINEAR))


def write_grid(path: Path, frames: np.ndarray, overlays: np.ndarray, columns: int, tile: int) -> tuple[int, int]:
    """frames/overlays uint8 [N,T,S,S,3] -> a PNG of 2N rows (frames, overlays per clip) x ``columns`` tiles."""
    n, t = frames.shape[:2]
    cols = np.unique(np.linspace(0, t - 1, min(columns, t)).round().astype(int))
    rows = []
    for c in range(n):
        for src in (frames, overlays):
            rows.append(np.concatenate([_resize(src[c, j], tile) for j in cols], axis=1))
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).save(path)
    return grid.shape[1], grid.shape[0]


def write_movie(path: Path, frames: np.ndarray, overlays: np.ndarray, tile: int, fps: int) -> None:
    """frame | overlay side by side, clip after clip, as an MP4 (H.264 through the ffmpeg binary) or a GIF."""
    pics = [np.concatenate([_resize(frames[c, j], tile), _resize(overlays[c, j], tile)], axis=1)
            for c in range(frames.shape[0]) for j in range(frames.shape[1])]
    if path.suffix == ".gif":
        images = [Image.fromarray(p) for p in pics]
        images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
        return
    from preprocess.video import ffmpeg_exe
    h, w = pics[0].shape[:2]
    ph, pw = h + h % 2, w + w % 2                                   # H.264 4:2:0 needs even sides
    data = b"".join(np.pad(p, ((0, ph - h), (0, pw - w), (0, 0)), mode="edge").tobytes() for p in pics)
    cmd = [ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{pw}x{ph}", "-framerate", str(fps), "-i", "pipe:", "-c:v", "libx264", "-pix_fmt", "yuv420p",
           "-crf", "18", "-movflags", "+faststart", str(path)]
    proc = subprocess.run(cmd, input=data, capture_output=True)
    if proc.returncode:
        raise RuntimeError(f"ffmpeg failed writing {path}: {proc.stderr.decode(errors='replace')[-400:]}")


def video_clips(ctx: Context, split: Split, indices: list[int], clips: int):
    """For each selected video, its ``clips`` test-sampling clips (uniform windows x centre crop), in one process:
    yields (index, batch dict, frames float32 [N,T,S,S,3] in [0,1], de-normalised for display)."""
    rt = ctx.rt
    cfg = test_config({**ctx.settings, "test_clips": clips, "test_crops": 1})
    mean = torch.tensor(cfg.mean).view(1, 1, 1, 1, 3)
    std = torch.tensor(cfg.std).view(1, 1, 1, 1, 3)
    # test mode, batch = the clips of one video: batch i is exactly video i
    loader = eval_loader(split.dir, "test", batch_size=clips, config=cfg, outputs=("video", "label", "index", "start"),
                         backend=rt.backend, device_id=rt.d.local_rank if rt.backend == "gpu" else None,
                         num_threads=rt.num_threads)
    try:
        for idx in indices:
            if (loader.epoch, loader.step) != (0, idx):
                loader.load_state_dict({"epoch": 0, "step": idx})
            batch = next(iter(loader))
            assert batch["index"].tolist() == [idx] * clips, batch["index"]
            frames = (batch["video"].float().cpu().permute(0, 2, 3, 4, 1) * std + mean).clamp(0, 1)
            yield idx, batch, frames.numpy()
    finally:
        loader.close()


def save_pictures(ctx: Context, split: Split, idx: int, frames: np.ndarray, overlays: np.ndarray) -> dict:
    """frames/overlays float [N,T,S,S,3] in [0,1] -> ``<index>-<key>.png`` grid and movie in ctx.out, as
    {"key", "png", "png_size", "movie"?}."""
    extra = ctx.extra
    tile = extra.get("tile") or max(ctx.settings["crop"], 112)     # small crops are upscaled for viewing
    f8, o8 = np.round(frames * 255).astype(np.uint8), np.round(overlays * 255).astype(np.uint8)
    key = split.shards.key(idx) or f"sample{idx}"
    stem = f"{idx:05d}-{key}"
    png = ctx.out / f"{stem}.png"
    size = write_grid(png, f8, o8, extra.get("grid_frames", 8), tile)
    files = {"key": key, "png": str(png), "png_size": list(size)}
    if extra.get("movie", "mp4") != "none":
        movie = ctx.out / f"{stem}.{extra.get('movie', 'mp4')}"
        write_movie(movie, f8, o8, tile, extra.get("fps", 8))
        files["movie"] = str(movie)
    return files


def add_images(ctx: Context, videos: list[dict], tag: str) -> None:
    """Every video's PNG grid into TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter
    with SummaryWriter(str(ctx.out / "tb")) as w:
        for v in videos:
            image = np.asarray(Image.open(v["png"]).convert("RGB"))
            w.add_image(f"{tag}/{v['index']:05d}-{v['key']}", image, 0, dataformats="HWC")


def run(ctx: Context) -> int:
    s, rt, extra = ctx.settings, ctx.rt, ctx.extra
    if not rt.d.is_main:          # a handful of videos: rank 0 does it alone
        return 0
    split = ctx.splits[extra["split"]]
    indices = select_videos(split, extra.get("videos") or [])
    clips = s["test_clips"]
    backbone = ctx.backbone.to(rt.d.device).eval()
    ctx.out.mkdir(parents=True, exist_ok=True)
    alpha = extra.get("alpha", 0.5)
    videos = []
    for idx, batch, frames in video_clips(ctx, split, indices, clips):
        with torch.no_grad(), rt.amp():
            maps = activation_maps(backbone, batch["video"], extra.get("map", "mean")).float().cpu().numpy()  # N,T,S,S
        files = save_pictures(ctx, split, idx, frames, (1 - alpha) * frames + alpha * jet(maps))
        focus = [motion_focus(frames[c], maps[c]) for c in range(clips)]
        valid = [f for f in focus if f is not None]
        label = int(batch["label"][0])
        videos.append({"index": idx, "label": label,
                       "class": split.classes[label] if 0 <= label < len(split.classes) else None,
                       "starts": batch["start"].tolist(), **files,
                       "motion_focus": float(np.mean(valid)) if valid else None, "motion_focus_per_clip": focus})
    add_images(ctx, videos, "cam")

    focus = [v["motion_focus"] for v in videos if v["motion_focus"] is not None]
    result = {"videos": videos, "map": extra.get("map", "mean"), "clips_per_video": clips, "split": split.name,
              "motion_focus_mean": float(np.mean(focus)) if focus else None, "out_dir": str(ctx.out)}
    rows = [(f"{v['index']} {v['key'][:28]} ({v['class']})", "n/a" if v["motion_focus"] is None
             else f"{v['motion_focus']:.2f}") for v in videos]
    rows.append(("mean motion focus", "n/a" if not focus else f"{np.mean(focus):.2f}"))
    title = (f"activation maps ({extra.get('map', 'mean')} of the last feature map), {ctx.info['backbone']} "
             f"{ctx.info['source']}, {split.name} split, {clips} clip(s) per video; motion focus = map on moving "
             f"pixels / map overall (>1: on the moving actor). Images in {ctx.out}")
    write_results(ctx.out, "cam", {**ctx.describe(), "result": result},
                  {"motion_focus_mean": result["motion_focus_mean"]}, rows, title)
    return 0
