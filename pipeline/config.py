"""Augmentation parameters (DESIGN.md §3 defaults) and the keys a loader can produce (the objectives say which
of them they need: ``required_inputs`` in model/; the pipeline knows no objective names)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
IMAGENET_MEAN = (0.485, 0.456, 0.406)           # the multi-level reference normalises with these
IMAGENET_STD = (0.229, 0.224, 0.225)

MULTILEVEL_OUTPUTS = ("clip_a", "clip_b", "clip_g")   # the three clips; pipeline/multilevel.py lists every key

# Every key a pretraining loader can produce. Clips are [B,3,T,S,S] float32 (channels_last_3d).
PRETRAIN_CLIPS = ("rgb_m", "rgb_n", "raw_m", "raw_n", "diff_m", "diff_n", "diff_m1", "diff_m2", "diff_n1", "diff_n2")
# Non-clip outputs: crop boxes [B,4] of the global (box_m, box_n) and local (box_m1, ...) views and frame_hw
# [B,2] float32; label, index (sample), start_m/start_n (first frame of each window) int64 [B].
PRETRAIN_META = ("box_m", "box_n", "box_m1", "box_m2", "box_n1", "box_n2", "frame_hw", "label", "index",
                 "start_m", "start_n")
# Evaluation loaders: "video" [B,3,T,S,S]; "label", "index" (video), "clip" (clip number), "crop" (crop
# number), "start" (first frame) int64 [B]; -1 in label/index/clip/crop marks test-mode padding.
EVAL_KEYS = ("video", "label", "index", "clip", "crop", "start")

FRAME0_RULES = ("wrap", "zero", "prev")


MIN_FRAMES, MIN_CROP = 2, 16        # a clip needs two frames to move; I3D's and R3D's strides need 16 px


def clip_problem(frames: int, stride: int, crop: int) -> str | None:
    """The one check of a clip's size, for every place that takes one (the training config, the evaluation
    protocols, AugConfig): None, or what is wrong with {frames}/{stride}/{crop} standing for the caller's own
    names of the three settings (str.format them in)."""
    if frames < MIN_FRAMES or stride < 1 or crop < MIN_CROP:
        return (f"{{frames}}={frames}, {{stride}}={stride}, {{crop}}={crop}: a clip needs {{frames}} >= {MIN_FRAMES}, "
                f"{{stride}} >= 1 and {{crop}} >= {MIN_CROP}")
    return None


@dataclass
class AugConfig:
    """Temporal sampling, spatial crop and colour augmentation of every clip a loader produces."""
    num_frames: int = 16                        # T: frames per clip
    stride: int = 2                             # temporal stride of global/eval clips; a window is T*stride frames
    crop_size: int = 224                        # S: output side
    crop_area: tuple[float, float] = (0.2, 1.0)        # random-resized-crop area fraction
    crop_aspect: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect range (log-uniform)
    flip_p: float = 0.5                         # horizontal flip
    color_aug: bool = True                      # False: no grayscale/jitter/blur (normalisation stays)
    grayscale_p: float = 0.2
    jitter_p: float = 0.8                       # probability of applying the colour jitter below
    brightness: tuple[float, float] = (0.6, 1.4)   # factor ranges
    contrast: tuple[float, float] = (0.6, 1.4)
    saturation: tuple[float, float] = (0.6, 1.4)
    hue: float = 0.1                            # max hue shift, in turns (0.1 = 36 degrees)
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # drawn per sample
    blur_kernel: int = 0                        # 0: 0.1*S made odd (23 at 224, 11 at 112)
    mean: tuple[float, float, float] = KINETICS_MEAN
    std: tuple[float, float, float] = KINETICS_STD
    frame0: str = "wrap"                        # first difference: "wrap" (X0-X[T-1], the reference), "zero" (0.5),
                                                # or "prev" (the true predecessor frame, decoded as well)
    antialias: bool = True                      # antialiased downscaling in the crop resize
    test_clips: int = 10                        # eval test mode: clips per video, uniformly spaced
    test_crops: int = 1                         # eval test mode: 1 (centre) or 3 (both ends + centre of the long side)
    test_crop_fraction: float = 0.875           # centre crop side as a fraction of the short side (224 of 256)
    ml_rate: tuple[float, float] = (1.0, 3.0)   # multi-level views: range of the random (fractional) frame step
    per_frame_colour: bool = False              # multi-level views: jitter/grayscale drawn per frame (reference)

    def __post_init__(self):
        if self.frame0 not in FRAME0_RULES:
            raise ValueError(f"frame0={self.frame0!r}: choose one of {FRAME0_RULES}")
        if self.test_crops not in (1, 3):
            raise ValueError(f"test_crops={self.test_crops}: choose 1 or 3")
        problem = clip_problem(self.num_frames, self.stride, self.crop_size)
        if problem:
            raise ValueError(problem.format(frames="num_frames", stride="stride", crop="crop_size"))

    @property
    def kernel(self) -> int:
        """Gaussian blur window: the reference's 2*floor(floor(0.1*S)/2)+1."""
        return self.blur_kernel or 2 * (int(0.1 * self.crop_size) // 2) + 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> AugConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown AugConfig keys {unknown}; valid: {sorted(names)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
