"""SSIM on uint8 images, per image, as the field reports it (PSNR: ``core.images.psnr``).

It takes [N, 3, H, W] uint8 (what a saved PNG holds), so generated and reference images are
measured after the same rounding. SSIM is Wang et al. (2004): an 11x11 Gaussian window with
sigma 1.5, K1 = 0.01, K2 = 0.03, data range 255, population (not sample) statistics, over the
window positions that fit inside the image ("valid"), averaged over positions and channels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"images must be two [N, C, H, W] batches of one shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 255.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """[N] mean SSIM."""
    _check(a, b)
    if min(a.shape[-2:]) < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window}, got {tuple(a.shape[-2:])}")
    c = a.shape[1]
    w = gaussian_window(window, sigma).expand(c, 1, window, window).contiguous()
    x, y = a.double(), b.double()
    blur = lambda t: F.conv2d(t, w, groups=c)  # noqa: E731  (valid positions only)
    mx, my = blur(x), blur(y)
    vx = blur(x * x) - mx * mx
    vy = blur(y * y) - my * my
    cov = blur(x * y) - mx * my
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)
