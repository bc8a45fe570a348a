"""What the main job (``python -m mqscale.train`` with no --config; ``make demo``) needs before
it trains, built once when missing, next to the token shards (runs/main by default):

1. data: the embedded shapes dataset as image shards (``data_tools.make_shapes``), verified
   shard by shard (sha256 and every sample decoded);
2. tokenizer: a short training of the demo MQ-VAE under Ray Train (configs/mqvae/demo.yaml), its
   export, a picture of what its masks keep (masks.png) and how much of the kept area is object;
3. tokens: pre-tokenization of the image shards.

Each step is a library call that returns what it made. A rerun finds the token shards and the
tokenizer and goes straight to training. Every number it prints comes from the run.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from data_tools.make_shapes import write_shapes
from data_tools.scan import scan
from mqscale.core import storage
from mqscale.core.errors import InputError, RunFailed
from mqscale.core.images import psnr
from mqscale.data.loader import iter_images
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.tokenize.pool import summary_lines
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config
from mqscale.tokenizer.launch import train_on_ray
from mqscale.tokenizer.visualize import mask_picture
from mqscale.train.config import Config

TOKENIZER_CONFIG = "configs/mqvae/demo.yaml"


@dataclass
class DemoData:
    images: int = 2000
    tokenizer_steps: int = 600
    resolution: int = 32


def ensure_demo_data(cfg: Config, demo: DemoData = DemoData()) -> None:
    tokens, tok_dir = cfg.data.train_url, cfg.logging.tokenizer
    if storage.exists(storage.join(tokens, "manifest.json")) and Path(tok_dir, "config.json").exists():
        print(f"[main] demo token shards {tokens} and tokenizer {tok_dir} found: straight to training")
        return
    root = Path(tokens).parent
    print(f"[main] building the demo data under {root} (once)")
    shapes = str(root / "shapes")
    data_step(shapes, demo.images, demo.resolution)
    ckpt = tokenizer_step(shapes, str(root), demo.tokenizer_steps)
    Path(tok_dir).mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        shutil.copy(Path(ckpt) / name, Path(tok_dir) / name)
    tokenize_step(tok_dir, shapes, tokens)


def data_step(out: str, count: int, resolution: int) -> None:
    res = write_shapes(out, count, resolution=resolution, shard_size=250, progress=False)
    rep, _ = scan(out, check_sha=True)
    print(f"[data] {res.samples} shapes images in {rep.shards} shards at {out}; verify: "
          f"{'OK' if rep.ok else 'FAILED'}, {rep.samples} decoded, {len(rep.bad)} bad")
    if not rep.ok:
        raise InputError(f"the demo image shards at {out} did not verify: {rep.bad[:3]}")


def tokenizer_step(shapes: str, root: str, steps: int) -> str:
    """Train the demo tokenizer under Ray Train; picture and measure its masks. Returns its export."""
    t = time.perf_counter()
    cfg = load_tokenizer_config(TOKENIZER_CONFIG, [f"data.train_url={shapes}", f"train.max_steps={steps}",
                                                   f"checkpoint.dir={root}/tokenizer_runs",
                                                   f"logging.tensorboard_dir={root}/tokenizer_runs/tb"])
    ckpt = train_on_ray(cfg).checkpoint
    if ckpt is None:
        raise RunFailed(f"the demo tokenizer run under {root}/tokenizer_runs left no verified checkpoint")
    print(f"[tokenizer] trained {steps} steps under Ray Train in {time.perf_counter() - t:.0f}s -> {ckpt}")
    print(f"[tokenizer] {mask_picture(ckpt, shapes, 8, f'{root}/masks.png').describe()}")
    share, chance, rec_psnr = kept_object_share(ckpt, shapes)
    print(f"[tokenizer] kept cells covering objects: {100 * share:.0f}% of their area vs {100 * chance:.0f}% "
          f"for random cells; reconstruction PSNR {rec_psnr:.1f} dB over 256 images")
    return ckpt


@torch.no_grad()
def kept_object_share(ckpt: str, shapes: str) -> tuple[float, float, float]:
    """How much of the kept cells' area is object (pixels far from the image's median colour):
    (kept share, share for random cells, reconstruction PSNR in dB)."""
    tok, cfg = TOKENIZER.load(ckpt)
    x = next(iter_images(shapes, cfg.model.resolution, 256, 256))
    enc = tok.encode(x)
    med = x.flatten(2).median(dim=2).values[:, :, None, None]
    obj = ((x - med).abs().sum(1, keepdim=True) > 0.3).float()
    cell = F.avg_pool2d(obj, cfg.model.factor).flatten(1)
    rec = tok.decode(enc.codes, enc.positions)
    return (cell.gather(1, enc.positions).mean().item(), cell.mean().item(),
            psnr(x, rec.clamp(-1, 1)).item())


def tokenize_step(tokenizer: str, shapes: str, out: str) -> None:
    t = time.perf_counter()
    lines = summary_lines(tokenize_run(Options(tokenizer=tokenizer, input=shapes, output=out), workers=1,
                                       progress=False))
    print(f"[tokenize] {lines[0]} in {time.perf_counter() - t:.0f}s")
    for line in lines[1:3]:
        print(f"[tokenize] {line}")
