"""SimCLR augmentations for multispectral tensors, torch ops only, driven by a torch.Generator.

Why not torchvision: it does not install beside the CPU torch here, and its colour ops
assume 3-channel RGB in [0, 1]. Our inputs are standardised bands (mean 0, std 1 per band,
see `satfuse.data.packing.normalize`), 3 (S2 RGB), 13 (S2) or 15 (S1+S2) channels. So:

- colour jitter acts per channel group in standard-deviation units: brightness is an
  additive shift, contrast a scaling about the group's mean. Independent groups change the
  relative band intensities, the multispectral analogue of hue/saturation jitter;
- grayscale replaces every band by the mean over bands;
- flips are horizontal and vertical (overhead imagery has no "up").

Why an explicit generator: every random number comes from `gen`, so a resumed run that
restores the generator (or reseeds it from (seed, epoch, key)) reproduces the same views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from satfuse.utils import SatfuseError

S2_RGB = [3, 2, 1]  # B4, B3, B2 (same as satfuse.data.packing.normalize.S2_RGB)


@dataclass(frozen=True)
class SimCLRAugment:
    """Strengths, defaults after SimCLR (Chen et al. 2020, strength s=1 with the
    multispectral reinterpretation above)."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_hflip: float = 0.5
    p_vflip: float = 0.5
    p_jitter: float = 0.8
    brightness: float = 0.4  # max additive shift, in std units
    contrast: float = 0.4  # contrast factor in [1 - c, 1 + c]
    p_gray: float = 0.2
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    groups: tuple[tuple[int, ...], ...] | None = (
        None  # channel groups for jitter; None: one per channel
    )


DEFAULT = SimCLRAugment()


def _uniform(gen: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=gen)) < p


def random_resized_crop(
    x: torch.Tensor, gen: torch.Generator, out_size: int, aug: SimCLRAugment = DEFAULT
) -> torch.Tensor:
    """torchvision's RandomResizedCrop: area fraction in `scale`, aspect in `ratio` (log-
    uniform), 10 tries then the largest centred crop; bilinear resize to out_size."""
    _, h, w = x.shape
    top, left, ch, cw = _crop_box(h, w, gen, aug)
    crop = x[:, top : top + ch, left : left + cw]
    return F.interpolate(
        crop[None], size=(out_size, out_size), mode="bilinear", align_corners=False
    )[0]


def _crop_box(
    h: int, w: int, gen: torch.Generator, aug: SimCLRAugment
) -> tuple[int, int, int, int]:
    area = h * w
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    for _ in range(10):
        target = area * _uniform(gen, *aug.scale)
        aspect = math.exp(_uniform(gen, log_lo, log_hi))
        cw = round(math.sqrt(target * aspect))
        ch = round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=gen))
            left = int(torch.randint(0, w - cw + 1, (), generator=gen))
            return top, left, ch, cw
    side = min(h, w)
    return (h - side) // 2, (w - side) // 2, side, side


def color_jitter(
    x: torch.Tensor, gen: torch.Generator, aug: SimCLRAugment = DEFAULT
) -> torch.Tensor:
    """Per channel group: contrast factor about the group mean, then a brightness shift."""
    groups = aug.groups or tuple((c,) for c in range(x.shape[0]))
    out = x.clone()
    for group in groups:
        idx = list(group)
        part = out[idx]
        factor = _uniform(gen, 1 - aug.contrast, 1 + aug.contrast)
        shift = _uniform(gen, -aug.brightness, aug.brightness)
        mean = part.mean()
        out[idx] = (part - mean) * factor + mean + shift
    return out


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Every band replaced by the mean over bands (the multispectral 'luminance')."""
    return x.mean(dim=0, keepdim=True).expand_as(x).clone()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur, kernel ~10% of the image side (odd), reflect padding."""
    size = max(3, int(0.1 * min(x.shape[-2:])) // 2 * 2 + 1)
    half = size // 2
    if min(x.shape[-2:]) <= half:  # too small to blur with reflect padding
        return x.clone()
    t = torch.arange(size, dtype=x.dtype, device=x.device) - half
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[0]
    y = F.pad(x[None], (half, half, half, half), mode="reflect")
    y = F.conv2d(y, k.view(1, 1, 1, size).expand(c, 1, 1, size), groups=c)
    y = F.conv2d(y, k.view(1, 1, size, 1).expand(c, 1, size, 1), groups=c)
    return y[0]


def simclr_view(
    x: torch.Tensor, gen: torch.Generator, out_size: int, aug: SimCLRAugment = DEFAULT
) -> torch.Tensor:
    """One augmented view: crop+resize, flips, jitter, grayscale, blur (SimCLR's order)."""
    v = random_resized_crop(x, gen, out_size, aug)
    if _chance(gen, aug.p_hflip):
        v = v.flip(-1)
    if _chance(gen, aug.p_vflip):
        v = v.flip(-2)
    if _chance(gen, aug.p_jitter):
        v = color_jitter(v, gen, aug)
    if _chance(gen, aug.p_gray):
        v = grayscale(v)
    if _chance(gen, aug.p_blur):
        v = gaussian_blur(v, _uniform(gen, *aug.blur_sigma))
    return v.contiguous()


def simclr_views(
    x: torch.Tensor, gen: torch.Generator, out_size: int, aug: SimCLRAugment = DEFAULT
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent SimCLR views of one (C, H, W) float sample, each (C, out_size, out_size)."""
    if x.dim() != 3 or not x.is_floating_point():
        raise SatfuseError(
            f"simclr_views: expected one (C, H, W) float sample, got {tuple(x.shape)} {x.dtype}; "
            "normalise the sample first (satfuse.data.packing.normalize)"
        )
    if out_size < 1:
        raise SatfuseError(f"simclr_views: out_size must be >= 1, got {out_size}; set data.crop")
    return simclr_view(x, gen, out_size, aug), simclr_view(x, gen, out_size, aug)


def simclr_input(s1: torch.Tensor, s2: torch.Tensor, mode: str) -> torch.Tensor:
    """The SimCLR input of one sample per `model.simclr_input`: S2 RGB, S2 (13) or S1+S2 (15)."""
    if mode == "s2_rgb":
        return s2[S2_RGB]
    if mode == "s2":
        return s2
    if mode == "s1s2":
        return torch.cat([s1, s2], dim=0)
    raise SatfuseError(f"model.simclr_input={mode!r} is not one of ['s2_rgb', 's2', 's1s2']")
