"""python -m mqscale.visualize_masks --tokenizer CKPT --input SHARDS -n 16 --out masks.png

A PNG grid, one row per image: the image, its importance heat map (blue low, red high), the
cells the tokenizer keeps (dropped ones dark), and its reconstruction from those codes alone.
``--out`` may be any fsspec URL; CKPT is an exported tokenizer (a training checkpoint or the
output of ``mqscale.convert official-mqvae``).
"""
from __future__ import annotations

import argparse

import torch

from mqscale.cli import UserError, add_storage_options_arg, guarded


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
    from mqscale.config import DataConfig
    from mqscale.convert.export import load_exported
    from mqscale.data import fs
    from mqscale.data.loader import StreamingLoader
    from mqscale.train.tokenizer_trainer import to_images
    from mqscale.train.tokenizer_visuals import sample_grid, to_png

    so = ns.storage_options
    tok, cfg = load_exported(ns.tokenizer, expect="mqvae")
    loader = StreamingLoader(ns.input, DataConfig(kind="images", batch_size=ns.n, num_workers=0, shuffle=False,
                                                  resolution=cfg.model.resolution, storage_options=so))
    batch = next(iter(loader))
    x, mask = to_images(batch, "cpu")
    x = x[mask]
    if not len(x):
        raise UserError(f"{ns.input}: no decodable images")
    with torch.no_grad():
        enc = tok.encode(x)
        recon = tok.decode(enc.codes, enc.positions)
    grid = sample_grid(x, enc.scores, enc.positions, recon, cfg.model.grid)
    fs.write_bytes(ns.out, to_png(grid), so)
    psnr = (10 * torch.log10(4.0 / ((recon.clamp(-1, 1) - x) ** 2).mean())).item()
    print(f"{len(x)} images -> {ns.out} (input | importance | kept {cfg.model.keep}/{cfg.model.grid ** 2} "
          f"cells | reconstruction; PSNR {psnr:.2f} dB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
