"""Probe and transcode one video: PyAV to look inside, ffmpeg (through ffmpeg-python, never a shell) to re-encode.

The ffmpeg binary is the one shipped by `imageio-ffmpeg` unless ``FFMPEG_BINARY`` names another, so no system
ffmpeg is needed. Output: short side 256 (both sides even), 8-bit 4:2:0, constant frame rate kept from the
source, no audio, a short fixed GOP, VP9 in MP4 by default (the one codec DALI decodes on CPU and GPU).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import av
import ffmpeg

from . import shard_format as fmt


class SkipVideo(Exception):
    """An input that cannot become a sample; the message is the reason written to errors.jsonl."""


@lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    exe = os.environ.get("FFMPEG_BINARY")
    if exe:
        return exe
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


@dataclass(frozen=True)
class Encoding:
    """Everything that decides the encoded bytes; recorded in the manifest."""
    codec: str = "vp9"          # vp9 (CPU+GPU decodable) or h264 (GPU-only decode in DALI)
    short_side: int = 256       # ignored when `size` is set
    size: tuple[int, int] | None = None   # fixed (width, height): one coded size keeps DALI's NVDEC cache hot
    # both sides a multiple of this: the codec's block size (16), so coded size = display size and DALI's GPU
    # decoder cache can reuse a decoder (DESIGN.md §8); 2 = the sides-even rule of shard sets made before it
    align: int = 16
    gop: int = 16               # keyframe every `gop` frames: DALI decodes from the preceding keyframe
    crf: int = 32
    threads: int = 1            # ffmpeg threads per video; parallelism comes from running one video per core
    min_frames: int = 16        # shorter videos are skipped

    def ffmpeg_options(self) -> dict:
        common = {"g": self.gop, "keyint_min": self.gop, "pix_fmt": "yuv420p", "an": None, "sn": None, "dn": None,
                  "map_metadata": -1, "map_chapters": -1, "fflags": "+bitexact", "movflags": "+faststart",
                  "threads": self.threads, "f": "mp4"}
        encoder = {c.name: c.encoder for c in fmt.CODECS if c.encoder}.get(self.codec)   # the one codec table
        if self.codec == "vp9":
            return {**common, "vcodec": encoder, "deadline": "realtime", "cpu-used": 8, "row-mt": 1,
                    "b:v": 0, "crf": self.crf}
        if self.codec == "h264":
            return {**common, "vcodec": encoder, "preset": "veryfast", "crf": min(self.crf, 51), "bf": 0,
                    "sc_threshold": 0}
        raise ValueError(f"unknown codec {self.codec!r}: use vp9 (default; decodable by DALI on CPU and GPU) or h264")

    def scale_filter(self) -> tuple[str, str]:
        if self.size:
            return str(self.size[0]), str(self.size[1])
        s, a = self.short_side, self.align
        if a <= 2:   # landscape: height s, width even and aspect-preserving; portrait/square: width s
            return f"if(gt(iw,ih),-2,{s})", f"if(gt(iw,ih),{s},-2)"
        # the long side: the aspect-preserving length rounded to the nearest multiple of `a` (the aspect changes by
        # at most a/2 pixels, 2.3 % at 342 -> 336; no padding, so no black borders enter the crops)
        return (f"if(gt(iw,ih),trunc(iw*{s}/ih/{a}+0.5)*{a},{s})", f"if(gt(iw,ih),{s},trunc(ih*{s}/iw/{a}+0.5)*{a})")

    def as_dict(self) -> dict:
        d = asdict(self)
        if self.align == 2:   # the manifests of shard sets made before `align` existed: read back unchanged
            del d["align"]
        d["container"] = "mp4"
        d["pix_fmt"] = "yuv420p"
        return d


@dataclass
class VideoInfo:
    frames: int
    fps: Fraction
    width: int
    height: int
    duration: float
    codec: str


def probe(path: str | Path) -> VideoInfo:
    """Look at a file with PyAV; raise SkipVideo with a readable reason when it is not a usable video."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise SkipVideo("empty file (0 bytes)")
    try:
        with av.open(str(path), metadata_errors="ignore") as c:
            if not c.streams.video:
                raise SkipVideo("no video stream (audio-only or not a video)")
            s = c.streams.video[0]
            rate = s.average_rate or s.guessed_rate or s.base_rate
            fps = Fraction(rate) if rate else Fraction(0)
            duration = float(s.duration * s.time_base) if s.duration and s.time_base else (
                c.duration / 1e6 if c.duration else 0.0)
            frames = s.frames or (round(duration * fps) if fps else 0)
            w, h = s.codec_context.width, s.codec_context.height
            if not w or not h:
                raise SkipVideo("video stream has no frame size (corrupt header)")
            return VideoInfo(int(frames), fps, int(w), int(h), duration, s.codec_context.name)
    except SkipVideo:
        raise
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as e:
        raise SkipVideo(f"not a readable video: {type(e).__name__}: {e}") from None


def output_rate(fps: Fraction) -> Fraction:
    """The constant output rate: the source's average rate, sane-bounded (VFR phone videos can report nonsense)."""
    if not fps or fps <= 0 or fps > 240:
        return Fraction(30)
    return fps.limit_denominator(1001)


def transcode_command(src: str | Path, dst: str | Path, enc: Encoding, rate: Fraction) -> list[str]:
    stream = ffmpeg.input(str(src), threads=enc.threads).video          # first video stream; audio dropped
    sw, sh = enc.scale_filter()
    stream = stream.filter("scale", sw, sh).filter("format", "yuv420p")
    out = ffmpeg.output(stream, str(dst), r=f"{rate.numerator}/{rate.denominator}", fps_mode="cfr",
                        **enc.ffmpeg_options())
    # -nostdin: a worker must never wait on the terminal; -y: dst is our own temp file
    return out.global_args("-nostdin", "-hide_banner", "-loglevel", "error").overwrite_output().compile(ffmpeg_exe())


def count_frames(path: str | Path) -> tuple[int, int, int]:
    """(frames, width, height) of an encoded file, by demuxing packets (no decoding: one packet per shown frame)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        n = sum(1 for p in c.demux(s) if p.size)
        return n, s.codec_context.width, s.codec_context.height


def transcode(src: str | Path, dst: str | Path, enc: Encoding, timeout: float = 3600) -> dict:
    """Re-encode `src` into `dst` (written as given; callers make it a temp name). Returns the metadata record."""
    info = probe(src)
    rate = output_rate(info.fps)
    cmd = transcode_command(src, dst, enc, rate)
    try:
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SkipVideo(f"ffmpeg took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        if "No space left on device" in "\n".join(err):
            raise OSError(28, f"no space left on device while writing {dst}: free space and re-run (finished videos are kept)")
        raise SkipVideo("ffmpeg failed: " + (" | ".join(err[-3:]) or f"exit code {proc.returncode}"))
    try:
        frames, width, height = count_frames(dst)
    except (av.error.FFmpegError, IndexError) as e:
        raise SkipVideo(f"ffmpeg wrote an unreadable file: {e}") from None
    if frames < enc.min_frames:
        raise SkipVideo(f"too short: {frames} frames < --min-frames {enc.min_frames}")
    # A truncated or corrupt file decodes to far fewer frames than its header promises.
    expected = round(info.duration * rate) if info.duration else info.frames
    if expected and frames < 0.9 * expected - 1:
        raise SkipVideo(f"truncated or corrupt: decoded {frames} of the {expected} frames its header announces")
    return {"fps": float(rate), "fps_fraction": f"{rate.numerator}/{rate.denominator}", "frames": frames,
            "width": width, "height": height, "duration": round(frames / float(rate), 4),
            "source_frames": info.frames, "source_codec": info.codec,
            "source_width": info.width, "source_height": info.height}
