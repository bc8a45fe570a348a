"""python -m mqscale.visualize_masks --tokenizer CKPT --input SHARDS -n 16 --out masks.png

A PNG grid, one row per image: the image, its importance heat map (blue low, red high), the
cells the tokenizer keeps (dropped ones dark), and its reconstruction from those codes alone.
``--out`` may be any fsspec URL; CKPT is an exported tokenizer (a training checkpoint or the
output of ``mqscale.convert official-mqvae``). Training logs the same grid to TensorBoard.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mqscale.core import storage
from mqscale.core.cli import add_storage_options_arg, guarded
from mqscale.core.errors import InputError
from mqscale.core.images import grid_png, heat_map, psnr, to_unit
from mqscale.data.loader import iter_images
from mqscale.tokenizer.config import TOKENIZER


def kept_map(positions: torch.Tensor, grid: int, size: int) -> torch.Tensor:
    """[n, L] kept cells -> [n, 1, size, size] binary map."""
    n = positions.shape[0]
    m = torch.zeros(n, grid * grid, device=positions.device).scatter(1, positions, 1.0)
    return F.interpolate(m.view(n, 1, grid, grid), size=(size, size), mode="nearest")


def mask_grid(x: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, recon: torch.Tensor,
              grid: int) -> torch.Tensor:
    """One row per image, four panels: input | importance | kept cells | reconstruction;
    returns [3, n*H, 4*W] in [0, 1]."""
    size = x.shape[-1]
    img, rec = to_unit(x), to_unit(recon)
    keep = kept_map(positions, grid, size)
    kept = img * keep + 0.15 * img * (1 - keep)          # dropped cells shown dark
    rows = torch.cat([img, heat_map(scores, size).to(img), kept, rec], dim=3)  # [n, 3, H, 4W]
    return torch.cat(list(rows), dim=1).cpu()


def mask_png(x: torch.Tensor, scores: torch.Tensor, positions: torch.Tensor, recon: torch.Tensor, grid: int,
             row_labels: list[str] | None = None) -> bytes:
    """``mask_grid`` as a PNG a person can read: each panel enlarged to at least 128 px, the four
    columns named, rows optionally labelled."""
    panels = mask_grid(x, scores, positions, recon, grid)            # [3, n*H, 4*W] in [0, 1]
    size = x.shape[-1]
    cells = panels.view(3, len(x), size, 4, size).permute(1, 3, 0, 2, 4).reshape(-1, 3, size, size)
    return grid_png(cells * 2 - 1, cols=4, row_labels=row_labels, min_cell=128,
                    col_labels=["input", "importance", f"kept {positions.shape[1]}/{grid * grid} cells",
                                "reconstruction"])


@dataclass
class MaskPicture:
    url: str            # where the PNG went
    images: int
    keep: int           # cells kept per image, of
    cells: int
    psnr: float         # of the reconstructions shown, dB

    def describe(self) -> str:
        return (f"{self.images} images -> {self.url} (input | importance | kept {self.keep}/{self.cells} "
                f"cells | reconstruction; PSNR {self.psnr:.2f} dB)")


@torch.no_grad()
def mask_picture(tokenizer: str, shards: str, n: int, out: str, storage_options: dict | None = None) -> MaskPicture:
    """Draw the grid of the first ``n`` images of ``shards`` to ``out`` (a path or fsspec URL)."""
    tok, cfg = TOKENIZER.load(tokenizer)
    x = torch.cat(list(iter_images(shards, cfg.model.resolution, n, n, storage_options)) or [torch.empty(0)])
    if not len(x):
        raise InputError(f"{shards}: no decodable images")
    enc = tok.encode(x)
    recon = tok.decode(enc.codes, enc.positions)
    storage.write_bytes(out, mask_png(x, enc.scores, enc.positions, recon, cfg.model.grid), storage_options)
    return MaskPicture(out, len(x), cfg.model.keep, cfg.model.grid ** 2, psnr(x, recon.clamp(-1, 1)).item())


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.visualize_masks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="exported tokenizer directory")
    p.add_argument("--input", required=True, help="image shards: manifest, directory or brace pattern")
    p.add_argument("-n", type=int, default=16, help="images to show")
    p.add_argument("--out", required=True, help="PNG path or fsspec URL")
    add_storage_options_arg(p)
    ns = p.parse_args(argv)
    print(mask_picture(ns.tokenizer, ns.input, ns.n, ns.out, ns.storage_options).describe())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
