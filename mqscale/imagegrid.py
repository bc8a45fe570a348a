"""PNG pictures of image batches: a grid with optional row labels (class names, prompts).

Images come as float [-1, 1] tensors [N, 3, H, W]. Small images are enlarged by an integer
factor (nearest neighbour, so no detail is invented) until a cell is at least ``min_cell``
pixels; labels use PIL's built-in bitmap font, so nothing is downloaded.
"""
from __future__ import annotations

import io

import numpy as np
import torch


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 (the rounding every saved PNG gets)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def png_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: torch.Tensor, cols: int, row_labels: list[str] | None = None,
             min_cell: int = 64, pad: int = 2) -> bytes:
    """One PNG: images laid out row by row, ``cols`` per row, each row optionally labelled."""
    from PIL import Image, ImageDraw, ImageFont

    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    scale = max(1, -(-min_cell // max(h, w)))
    h, w = h * scale, w * scale
    rows = -(-n // cols)
    font = ImageFont.load_default()
    labels = [str(s) for s in (row_labels or [])][:rows]
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    margin = max((int(draw_probe.textlength(s, font=font)) for s in labels), default=0)
    margin = margin + 3 * pad if margin else 0
    canvas = Image.new("RGB", (margin + cols * (w + pad) + pad, rows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, c = divmod(i, cols)
        tile = Image.fromarray(arr[i]).resize((w, h), Image.NEAREST)
        canvas.paste(tile, (margin + pad + c * (w + pad), pad + r * (h + pad)))
    for r, s in enumerate(labels):
        draw.text((pad, pad + r * (h + pad) + h // 2 - 5), s, fill="black", font=font)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()
