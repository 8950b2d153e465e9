"""The one DALI pipeline definition; ``backend`` picks CPU decode + CPU ops or NVDEC decode + GPU ops.

Per sample (shapes per sample; DALI batches them):

    external source: encoded uint8 [nbytes], frames int32 [F], orders int32 [V, L], rois float32 [V, 4],
                     colour float32 [C, 7], then the meta outputs (boxes, labels, ...): spec.feed_fields
    decoders.video(frames=...)            -> uint8 F x H x W x 3 (FHWC), every needed frame decoded once
    per view: sequence_rearrange(order)   -> uint8 L x H x W x 3   (the view's frames)
              resize(ROI = crop, x0 > x1 = mirror) -> uint8 L x S x S x 3
              rgb:  colour twist to float, clamp (+ blur) -> normalise -> float32 T x S x S x 3
              raw:  / 255                                  -> float32 T x S x S x 3
              diff: (X_t - X_{t-1} + 1) / 2 in float -> colour twist, clamp (+ blur) -> normalise -> float32 T x S x S x 3

All random numbers come from the external source (pipeline/views.py), so the graph has no random ops
and a batch is a pure function of what was fed. Clips stay FHWC: torch's [B,T,S,S,3] permuted to
[B,3,T,S,S] is channels_last_3d with no copy.
"""
from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
import nvidia.dali.math as dmath

from pipeline.views import Spec

META_DTYPES = {"box_m": types.FLOAT, "box_n": types.FLOAT, "box_m1": types.FLOAT, "box_m2": types.FLOAT,
               "box_n1": types.FLOAT, "box_n2": types.FLOAT, "frame_hw": types.FLOAT,
               "label": types.INT64, "index": types.INT64, "clip": types.INT64, "crop": types.INT64, "start": types.INT64,
               "start_m": types.INT64, "start_n": types.INT64}
BACKENDS = {"cpu": "cpu", "gpu": "mixed"}      # backend -> decoders.video device


def _colour(x, p, scale: float, spec: Spec):
    """Colour twist with per-sample parameters shared by all frames, p = (brightness, contrast,
    saturation, hue, blur?, sigma, window), clamp to the value range (as kornia does), and an optional
    Gaussian blur. Grayscale is saturation 0 (see sampling.colour_params). The output is float: on
    uint8 RGB (scale 255) the twist writes float directly, on a [0, 1] difference clip it stays float.
    Float also because DALI's CPU twist and blur are several times slower producing uint8."""
    x = fn.color_twist(x, brightness=p[0], contrast=p[1], saturation=p[2], hue=p[3], dtype=types.FLOAT)
    x = dmath.clamp(x, 0.0, scale)
    if spec.cfg.blur_p > 0:
        if fn.cast(p[4], dtype=types.BOOL):   # a DALI conditional: only the drawn samples pay for the blur
            x = fn.gaussian_blur(x, window_size=fn.cast(p[6], dtype=types.INT32), sigma=p[5])
    return x


def _normalise(x, scale: float, spec: Spec):
    mean = [m * scale for m in spec.cfg.mean]
    std = [s * scale for s in spec.cfg.std]
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="FHWC", mean=mean, std=std)


def feed_and_decode(spec: Spec, source, backend: str, meta_dtypes: dict):
    """The external-source feed of `spec.feed_fields`, and one decode of every frame the views need
    (None when a loader asked only for labels/indices). Returns (field -> DataNode, F x H x W x 3 video)."""
    dtypes = {"encoded": types.UINT8, "frames": types.INT32, "orders": types.INT32, "rois": types.FLOAT,
              "colour": types.FLOAT, **meta_dtypes}
    fields = spec.feed_fields
    ext = fn.external_source(source=source, num_outputs=len(fields), batch=True, dtype=[dtypes[f] for f in fields])
    ext = list(ext) if isinstance(ext, (list, tuple)) else [ext]
    node = dict(zip(fields, ext))
    video = None
    if spec.views:
        video = fn.decoders.video(node["encoded"], device=BACKENDS[backend], frames=node["frames"],
                                  pad_mode="edge")                                             # F x H x W x 3
    return node, video


def view_clip(video, node: dict, k: int, length: int, spec: Spec):
    """View k of every sample: its frames (``node["orders"]``) of the decoded video, cropped (``node["rois"]``; a
    reversed x range mirrors) and resized to S x S. uint8 L x S x S x 3."""
    S = spec.cfg.crop_size
    clip = fn.sequence_rearrange(video, new_order=node["orders"][k, 0:length])
    return fn.resize(clip, size=[S, S], roi_start=node["rois"][k, 0:2], roi_end=node["rois"][k, 2:4],
                     interp_type=types.INTERP_LINEAR, antialias=spec.cfg.antialias)


@pipeline_def(enable_conditionals=True)
def video_graph(spec: Spec, source, backend: str):
    cfg, T = spec.cfg, spec.cfg.num_frames
    node, video = feed_and_decode(spec, source, backend, META_DTYPES)
    colour = node.get("colour")
    slot = {k: i for i, k in enumerate(spec.colour_keys)}
    out = {}
    for k, v in enumerate(spec.views):
        clip = view_clip(video, node, k, v.length, spec)                                    # L x S x S x 3 uint8
        cur = clip if v.prev is None else fn.sequence_rearrange(clip, new_order=list(range(1, v.length)))
        if v.rgb:
            if v.rgb in slot:
                out[v.rgb] = _normalise(_colour(cur, colour[slot[v.rgb]], 255.0, spec), 255.0, spec)
            else:
                out[v.rgb] = _normalise(cur, 255.0, spec)
        if v.raw:
            out[v.raw] = cur * (1.0 / 255.0)
        if v.diff:
            if v.prev is not None:                       # the true predecessor of frame 0
                prev_order = list(range(0, T))
                src = clip
            else:                                        # "wrap": X0 - X[T-1] (reference); "zero": X0 - X0
                prev_order = ([T - 1] if cfg.frame0 == "wrap" else [0]) + list(range(0, T - 1))
                src = cur
            prev = fn.sequence_rearrange(src, new_order=prev_order)
            # float arithmetic: uint8 + float promotes to float, so nothing wraps; D in [0, 1]
            d = ((cur + 255.0) - prev) * (1.0 / 510.0)
            d = fn.reshape(d, layout="FHWC")
            if v.diff in slot:
                d = _colour(d, colour[slot[v.diff]], 1.0, spec)
            out[v.diff] = _normalise(d, 1.0, spec)
    return tuple(out[k] for k in spec.clip_keys) + tuple(node[k] for k in spec.meta_keys)
