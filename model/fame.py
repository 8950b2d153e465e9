"""FAME: foreground-background merging (Ding et al., CVPR 2022, https://arxiv.org/abs/2109.15130) on MoCo.

The first clip of each pair (batch["raw_m"]: cropped/flipped RGB in [0, 1], no colour augmentation) gets
its foreground pasted onto the background of another clip of the batch (random permutation), then
colour augmentation + normalisation (fame_augment.py); the second clip (batch["rgb_n"]) arrives augmented.
The rest is MoCo (moco.py). All of it runs on the tensors' device.

Foreground mask per clip [B, 3, T, H, W] (notes/fima-reference.md section 5):
1. motion energy E = mean_t sum_c |X_t - X_{t+1}|; E' = minmax(blur(E));
2. seeds: top floor(0.5 HW) pixels of E' are foreground, bottom floor(0.1 HW) background;
3. colour bins of the temporal-mean frame in HSV: saturation-weighted hue on the colour wheel
   (a, b) = ((s cos h + 1)/2, (s sin h + 1)/2) and value v, each rounded to 10 levels -> 1000 bins;
4. histograms of the seeds (background + 1), each normalised; R = H_F / (H_F + H_B) per pixel;
5. R' = minmax(blur(R)); the top floor(beta HW) pixels are the foreground.
Blur: Gaussian, kernel odd(floor(0.1 S)), sigma = kernel / 3, reflect padding.
`hue_wrap_bug=True` reproduces the reference, which multiplies kornia's hue (already in radians) by
2*pi again, so the angle wraps about 6.3 times and unrelated hues share bins. Default False.
"""

from __future__ import annotations

import math
from typing import Callable

import kornia
import torch
import torch.nn as nn

from .fame_augment import ColourAugment, blur_kernel_size
from .infonce import fp32
from .moco import MoCo

_EPS = 1e-8


def _blur(img: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, H, W] Gaussian blur with sigma = kernel/3."""
    k = (blur_kernel_size(img.shape[-2]), blur_kernel_size(img.shape[-1]))
    return kornia.filters.gaussian_blur2d(img[:, None], k, (k[0] / 3, k[1] / 3), border_type="reflect")[:, 0]


def _minmax(img: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation of [B, H, W]."""
    flat = img.flatten(1)  # B x HW
    lo, hi = flat.min(dim=1).values, flat.max(dim=1).values  # B
    return (img - lo[:, None, None]) / (hi - lo + _EPS)[:, None, None]


def _top_mask(score: torch.Tensor, n: int, largest: bool = True) -> torch.Tensor:
    """bool [B, H, W] marking exactly n pixels of each sample: the n largest (or smallest) scores."""
    flat = score.flatten(1)  # B x HW
    idx = flat.topk(n, dim=1, largest=largest).indices  # B x n
    mask = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True)  # B x HW
    return mask.view_as(score)


def colour_bins(frame: torch.Tensor, hue_wrap_bug: bool = False) -> torch.Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> long [B, H, W] bin index in 0..999."""
    hsv = kornia.color.rgb_to_hsv(frame)  # hue in radians [0, 2*pi), s, v in [0, 1]
    h, s, v = hsv.unbind(dim=1)  # B x H x W each
    angle = h * (2 * math.pi) if hue_wrap_bug else h
    a = (s * torch.cos(angle) + 1) / 2
    b = (s * torch.sin(angle) + 1) / 2
    i_a, i_b, i_v = (torch.round(9 * c + 1).long() for c in (a, b, v))  # 1..10 each (half to even)
    return (i_a - 1) + 10 * (i_b - 1) + 100 * (i_v - 1)  # B x H x W in 0..999


@torch.no_grad()
def fame_foreground_mask(x: torch.Tensor, beta: float = 0.5, hue_wrap_bug: bool = False) -> torch.Tensor:
    """x [B, 3, T, H, W] in [0, 1] -> bool [B, H, W] with exactly floor(beta*H*W) foreground pixels."""
    x = x.float()
    B, _, T, H, W = x.shape
    HW = H * W
    energy = (x[:, :, :-1] - x[:, :, 1:]).abs().sum(dim=1).mean(dim=1) if T > 1 else x.new_zeros(B, H, W)  # B x H x W
    energy = _minmax(_blur(energy))  # B x H x W
    fg_seed = _top_mask(energy, int(0.5 * HW)).flatten(1).float()  # B x HW
    bg_seed = _top_mask(energy, int(0.1 * HW), largest=False).flatten(1).float()  # B x HW

    bins = colour_bins(x.mean(dim=2), hue_wrap_bug).flatten(1)  # B x HW
    h_fg = x.new_zeros(B, 1000).scatter_add_(1, bins, fg_seed)  # B x 1000
    h_bg = x.new_zeros(B, 1000).scatter_add_(1, bins, bg_seed) + 1  # B x 1000, Laplace smoothing
    h_fg = h_fg / (h_fg.sum(dim=1, keepdim=True) + _EPS)
    h_bg = h_bg / (h_bg.sum(dim=1, keepdim=True) + _EPS)
    p_fg, p_bg = h_fg.gather(1, bins), h_bg.gather(1, bins)  # B x HW
    ratio = (p_fg / (p_fg + p_bg + _EPS)).view(B, H, W)  # B x H x W
    return _top_mask(_minmax(_blur(ratio)), int(beta * HW))  # B x H x W


def fame_merge(x: torch.Tensor, mask: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Foreground of x[b] on the background of x[perm[b]]: x [B, C, T, H, W], mask bool [B, H, W], perm [B]."""
    m = mask[:, None, None].to(x.dtype)  # B x 1 x 1 x H x W, same for every channel and frame
    return m * x + (1 - m) * x[perm]  # B x C x T x H x W


def shared_background_keys(perm: torch.Tensor) -> dict[str, torch.Tensor]:
    """perm [B] of fame_merge -> the in-batch key that shares each query's background: skip_mn [B], the k_n of
    the video whose background q_m[i] carries (perm[i]); skip_nm [B], the merged k_m[j] that carries video i's
    background (perm[j] == i, so j = perm^-1[i])."""
    return {"skip_mn": perm, "skip_nm": torch.argsort(perm)}


class FAME(MoCo):
    """MoCo hyper-parameters (see moco.py) plus beta (foreground fraction, 0.5), hue_wrap_bug, augment_kwargs for
    ColourAugment, and skip_shared_background.

    skip_shared_background (only with batch_negatives): the merged clip of video i carries the background of video
    perm[i], so among in-batch keys one negative shares half the query's pixels (the key of perm[i]; the other way
    round, q_n[i] meets the merged key that carries i's own background). The reference never meets such a key (its
    negatives come from a queue of earlier batches); True drops that one column per row so that in-batch negatives
    pose the reference's task."""

    required_inputs: tuple[str, ...] = ("raw_m", "rgb_n")

    def __init__(
        self, backbone: str | Callable[[], nn.Module] = "i3d", *, beta: float = 0.5, hue_wrap_bug: bool = False,
        augment_kwargs: dict | None = None, skip_shared_background: bool = False, **moco_kwargs,
    ):
        super().__init__(backbone, **moco_kwargs)
        self.beta, self.hue_wrap_bug, self.skip_shared_background = beta, hue_wrap_bug, skip_shared_background
        self.augment = ColourAugment(**(augment_kwargs or {}))

    @torch.no_grad()
    def merge_and_augment(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, T, H, W] in [0, 1] -> (FAME-merged, colour-augmented, normalised clip, perm [B]: clip i carries
        the background of clip perm[i])."""
        with fp32(raw.device):  # blur and histograms in fp32 even under autocast
            mask = fame_foreground_mask(raw, self.beta, self.hue_wrap_bug)  # B x H x W
            perm = torch.randperm(raw.shape[0], device=raw.device)  # B, may map a clip to itself
            return self.augment(fame_merge(raw.float(), mask, perm)), perm  # B x 3 x T x H x W, B

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch["raw_m"] [B, 3, T, H, W] in [0, 1]; batch["rgb_n"] normalised. Returns loss, loss_inst, acc_inst."""
        x_m, perm = self.merge_and_augment(batch["raw_m"])
        if batch["rgb_n"].is_contiguous(memory_format=torch.channels_last_3d):
            x_m = x_m.contiguous(memory_format=torch.channels_last_3d)
        skips = shared_background_keys(perm) if self.skip_shared_background and self.batch_negatives else {}
        return self.moco_forward(x_m, batch["rgb_n"], **skips)
