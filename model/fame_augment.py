"""Clip-level colour augmentation on the accelerator (plain torch + kornia colour conversions and blur).

Used inside FAME (which must colour-augment after merging). Every random parameter is drawn per
sample and shared by all frames of that sample. Input [B, 3, T, H, W] float in [0, 1]; output the
augmented clip normalised with the Kinetics mean/std. Any memory format.

Order: grayscale (p 0.2) -> colour jitter (p 0.8; brightness, contrast and saturation factors in
[1-0.4, 1+0.4], hue shift in [-0.1, 0.1] of a turn, the four applied in a random order per call, as
torchvision does) -> Gaussian blur (p 0.5, kernel odd(floor(0.1*S)), sigma ~ U(0.1, 2) per sample;
the reference draws sigma once per run) -> normalise.
"""

from __future__ import annotations

import math

import kornia
import torch
import torch.nn as nn

from .infonce import fp32

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
_GRAY = (0.299, 0.587, 0.114)


def blur_kernel_size(size: int) -> int:
    """Odd kernel of about a tenth of the crop: 23 at 224, 11 at 112."""
    return 2 * (int(0.1 * size) // 2) + 1


def _gray(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, T, H, W] -> [B, 1, T, H, W] luma."""
    w = torch.tensor(_GRAY, device=x.device, dtype=x.dtype).view(1, 3, 1, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1, 1)  # B -> B x 1 x 1 x 1 x 1


def _uniform(B: int, lo: float, hi: float, device) -> torch.Tensor:
    return torch.empty(B, device=device).uniform_(lo, hi)  # B


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` [B] turns: [B, 3, T, H, W] -> same."""
    B, _, T, H, W = x.shape
    frames = x.transpose(1, 2).reshape(B * T, 3, H, W)  # (B*T) x 3 x H x W
    hsv = kornia.color.rgb_to_hsv(frames)  # hue in radians [0, 2*pi)
    h = torch.remainder(hsv[:, :1] + shift.repeat_interleave(T).view(-1, 1, 1, 1) * (2 * math.pi), 2 * math.pi)
    rgb = kornia.color.hsv_to_rgb(torch.cat([h, hsv[:, 1:]], dim=1))  # (B*T) x 3 x H x W
    return rgb.reshape(B, T, 3, H, W).transpose(1, 2)  # B x 3 x T x H x W


class ColourAugment(nn.Module):
    def __init__(
        self, *, p_gray: float = 0.2, p_jitter: float = 0.8, brightness: float = 0.4, contrast: float = 0.4,
        saturation: float = 0.4, hue: float = 0.1, p_blur: float = 0.5, blur_sigma: tuple[float, float] = (0.1, 2.0),
        mean: tuple[float, ...] = KINETICS_MEAN, std: tuple[float, ...] = KINETICS_STD,
    ):
        super().__init__()
        self.p_gray, self.p_jitter, self.p_blur = p_gray, p_jitter, p_blur
        self.brightness, self.contrast, self.saturation, self.hue = brightness, contrast, saturation, hue
        self.blur_sigma = blur_sigma
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1, 1), persistent=False)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        b = _per_sample(_uniform(B, 1 - self.brightness, 1 + self.brightness, dev))
        c = _per_sample(_uniform(B, 1 - self.contrast, 1 + self.contrast, dev))
        s = _per_sample(_uniform(B, 1 - self.saturation, 1 + self.saturation, dev))
        h = _uniform(B, -self.hue, self.hue, dev)  # B, in turns
        ops = [
            lambda v: (v * b).clamp(0, 1),
            lambda v: (c * v + (1 - c) * _gray(v).mean(dim=(3, 4), keepdim=True)).clamp(0, 1),  # per-frame mean
            lambda v: (s * v + (1 - s) * _gray(v)).clamp(0, 1),
            lambda v: adjust_hue(v, h),
        ]
        for i in torch.randperm(4).tolist():
            x = ops[i](x)
        return x

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        B, C, T, H, W = x.shape
        sigma = _uniform(B, *self.blur_sigma, x.device).repeat_interleave(T)  # (B*T)
        frames = x.transpose(1, 2).reshape(B * T, C, H, W)  # (B*T) x C x H x W
        k = (blur_kernel_size(H), blur_kernel_size(W))
        out = kornia.filters.gaussian_blur2d(frames, k, torch.stack([sigma, sigma], dim=1), border_type="reflect")
        return out.reshape(B, T, C, H, W).transpose(1, 2)  # B x C x T x H x W

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] in [0, 1] -> augmented and normalised, float32, same shape."""
        with fp32(x.device):  # under autocast, kornia's blur convolution would otherwise run in bf16
            return self._augment(x.float())

    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        B, dev = x.shape[0], x.device
        gray = _per_sample(torch.rand(B, device=dev) < self.p_gray)
        x = torch.where(gray, _gray(x).expand_as(x), x)
        jitter = _per_sample(torch.rand(B, device=dev) < self.p_jitter)
        x = torch.where(jitter, self._jitter(x), x)
        blur = _per_sample(torch.rand(B, device=dev) < self.p_blur)
        x = torch.where(blur, self._blur(x), x)
        return (x - self.mean) / self.std
