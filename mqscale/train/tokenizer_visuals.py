"""Pictures of what the tokenizer keeps: input | importance map | kept cells | reconstruction."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def heat(scores: torch.Tensor, size: int) -> torch.Tensor:
    """[n, g, g] scores -> [n, 3, size, size] blue (low) to red (high), per image min-max scaled."""
    s = scores.float()
    lo = s.flatten(1).min(1).values[:, None, None]
    hi = s.flatten(1).max(1).values[:, None, None]
    s = ((s - lo) / (hi - lo).clamp_min(1e-6))[:, None]
    s = F.interpolate(s, size=(size, size), mode="nearest")
    return torch.cat([s, 0.25 * torch.ones_like(s) * (1 - (2 * s - 1).abs()), 1 - s], dim=1)


def kept_map(positions: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """[n, L] kept cells -> [n, 1, size, size] binary map."""
    n = positions.shape[0]
    m = torch.zeros(n, grid * grid, device=positions.device).scatter(1, positions, 1.0)
    return F.interpolate(m.view(n, 1, grid, grid), size=(size, size), mode="nearest")


def sample_grid(x: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, recon: torch.Tensor,
                grid: int) -> torch.Tensor:
    """One row per image, four panels; returns [3, n*H, 4*W] in [0, 1]."""
    size = x.shape[-1]
    img = (x.float().clamp(-1, 1) + 1) / 2
    rec = (recon.float().clamp(-1, 1) + 1) / 2
    keep = kept_map(positions, grid, size)
    kept = img * keep + 0.15 * img * (1 - keep)          # dropped cells shown dark
    rows = torch.cat([img, heat(scores, size).to(img), kept, rec], dim=3)  # [n, 3, H, 4W]
    return torch.cat(list(rows), dim=1).cpu()


def to_png(grid: torch.Tensor) -> bytes:
    import io

    from PIL import Image
    arr = (grid.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
