"""Images as every stage passes them, and the pictures made of them.

Models take float tensors in [-1, 1], [N, C, H, W]; shards, PNGs and the FID Inception hold uint8.
The conversions, PSNR and the PNG encoder live here once, so a training log, a mask picture, a
sample grid and an evaluation measure images after exactly the same rounding. Grids enlarge
small images by an integer factor (nearest neighbour, so no detail is invented) until a cell is
at least ``min_cell`` pixels; labels use PIL's built-in bitmap font, so nothing is downloaded.
"""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, C] (as shards decode) -> float32 [N, C, H, W] in [-1, 1], on its device."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [N, C, H, W] in [-1, 1] -> uint8 [N, C, H, W] on the CPU (what a saved PNG holds)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Float in [-1, 1] -> float in [0, 1] (what TensorBoard's image panels show)."""
    return (images.float().clamp(-1, 1) + 1) / 2


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, per_image: bool = False) -> torch.Tensor:
    """PSNR of ``b`` against ``a`` in dB: one value over the batch, or [N] (``per_image``); inf
    where they are equal. ``data_range`` is 2 for images in [-1, 1] and 255 for uint8."""
    if a.shape != b.shape:
        raise ValueError(f"PSNR of images of two shapes, {tuple(a.shape)} and {tuple(b.shape)}")
    diff = (a.double() - b.double()).pow(2)
    mse = diff.flatten(1).mean(1) if per_image else diff.mean()
    return 10 * torch.log10(data_range ** 2 / mse)


def tile(images: torch.Tensor, cols: int) -> torch.Tensor:
    """[N, C, H, W] -> one [C, rows * H, cols * W] picture, row by row (N a multiple of cols)."""
    n, c, h, w = images.shape
    return images.view(n // cols, cols, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, n // cols * h, cols * w)


def heat_map(scores: torch.Tensor, size: int) -> torch.Tensor:
    """[n, g, g] scores -> [n, 3, size, size] in [0, 1], blue (low) to red (high), each map
    min-max scaled on its own."""
    s = scores.float()
    lo = s.flatten(1).min(1).values[:, None, None]
    hi = s.flatten(1).max(1).values[:, None, None]
    s = ((s - lo) / (hi - lo).clamp_min(1e-6))[:, None]
    s = F.interpolate(s, size=(size, size), mode="nearest")
    return torch.cat([s, 0.25 * torch.ones_like(s) * (1 - (2 * s - 1).abs()), 1 - s], dim=1)


def _encode(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes(image: torch.Tensor) -> bytes:
    """PNG of one image [C, H, W]: uint8 as it is, or float in [0, 1], rounded."""
    if image.dtype != torch.uint8:
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return _encode(Image.fromarray(image.permute(1, 2, 0).cpu().numpy()))


def grid_png(images: torch.Tensor, cols: int, row_labels: list[str] | None = None,
             min_cell: int = 64, pad: int = 2, col_labels: list[str] | None = None) -> bytes:
    """One PNG of float [-1, 1] images [N, 3, H, W], ``cols`` per row, rows and columns optionally
    labelled (row labels on the left, column labels above)."""
    arr = to_uint8(images).permute(0, 2, 3, 1).numpy()
    n, h, w, _ = arr.shape
    scale = max(1, -(-min_cell // max(h, w)))
    h, w = h * scale, w * scale
    rows = -(-n // cols)
    font = ImageFont.load_default()
    labels = [str(s) for s in (row_labels or [])][:rows]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max((int(draw_probe.textlength(s, font=font)) for s in labels), default=0)
    margin = margin + 3 * pad if margin else 0
    top = 14 + pad if col_labels else 0
    canvas = Image.new("RGB", (margin + cols * (w + pad) + pad, top + rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        cell = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
        canvas.paste(cell, (margin + pad + c * (w + pad), top + pad + r * (h + pad)))
    for r, s in enumerate(labels):
        draw.text((pad, top + pad + r * (h + pad) + h // 2 - 5), s, fill="black", font=font)
    for c, s in enumerate((col_labels or [])[:cols]):
        x = margin + pad + c * (w + pad) + (w - int(draw_probe.textlength(str(s), font=font))) // 2
        draw.text((max(x, 0), pad), str(s), fill="black", font=font)
    return _encode(canvas)
