"""What the main job (``python -m mqscale.train`` with no --config; ``make demo``) needs before
it trains, built once when missing, next to the token shards (runs/main by default):

1. data: the embedded shapes dataset as image shards (``data_tools.make_shapes``), verified
   shard by shard (sha256 and every sample decoded);
2. tokenizer: a short training of the demo MQ-VAE under Ray Train (configs/mqvae/demo.yaml), its
   export, a picture of what its masks keep (masks.png) and how much of the kept area is object;
3. tokens: pre-tokenization of the image shards (``mqscale.tokenize``).

A rerun finds the token shards and the tokenizer and goes straight to training. Every number it
prints comes from the run.
"""
from __future__ import annotations

import re
import shutil
import time
from contextlib import redirect_stdout
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import torch
import torch.nn.functional as F

from mqscale.cli import UserError
from mqscale.config import Config, DataConfig
from mqscale.data import fs


@dataclass
class DemoData:
    images: int = 2000
    tokenizer_steps: int = 600
    resolution: int = 32


def quiet(fn, args: list[str], what: str) -> str:
    """Run an entry point with its stdout captured; a failure is one UserError with its tail."""
    buf = StringIO()
    with redirect_stdout(buf):
        rc = fn(args)
    if rc:
        raise UserError(f"{what} failed:\n{buf.getvalue()[-1500:]}")
    return buf.getvalue()


def ensure_demo_data(cfg: Config, demo: DemoData = DemoData()) -> None:
    tokens, tok_dir = cfg.data.train_url, cfg.logging.tokenizer
    if fs.exists(fs.join(tokens, "manifest.json")) and Path(tok_dir, "config.json").exists():
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
    from data_tools.make_shapes import write_shapes
    from data_tools.scan import scan

    res = write_shapes(out, count, resolution=resolution, shard_size=250, progress=False)
    rep, _ = scan(out, check_sha=True)
    print(f"[data] {res.samples} shapes images in {rep.shards} shards at {out}; verify: "
          f"{'OK' if rep.ok else 'FAILED'}, {rep.samples} decoded, {len(rep.bad)} bad")
    if not rep.ok:
        raise UserError(f"the demo image shards at {out} did not verify: {rep.bad[:3]}")


def tokenizer_step(shapes: str, root: str, steps: int) -> str:
    """Train the demo tokenizer under Ray Train; picture and measure its masks. Returns its export."""
    from mqscale import train_tokenizer, visualize_masks

    t = time.perf_counter()
    out = quiet(train_tokenizer.main, ["--config", "configs/mqvae/demo.yaml", f"data.train_url={shapes}",
                                       f"train.max_steps={steps}", f"checkpoint.dir={root}/tokenizer_runs",
                                       f"logging.tensorboard_dir={root}/tokenizer_runs/tb"], "tokenizer training")
    found = re.search(r"tokenizer checkpoint: (\S+)", out)
    if not found:
        raise UserError(f"tokenizer training printed no checkpoint:\n{out[-1500:]}")
    ckpt = found.group(1)
    print(f"[tokenizer] trained {steps} steps under Ray Train in {time.perf_counter() - t:.0f}s -> {ckpt}")
    out = quiet(visualize_masks.main, ["--tokenizer", ckpt, "--input", shapes, "-n", "8",
                                       "--out", f"{root}/masks.png"], "visualize_masks")
    print(f"[tokenizer] {out.strip().splitlines()[-1]}")
    share, chance, psnr = kept_object_share(ckpt, shapes)
    print(f"[tokenizer] kept cells covering objects: {100 * share:.0f}% of their area vs {100 * chance:.0f}% "
          f"for random cells; reconstruction PSNR {psnr:.1f} dB over 256 images")
    return ckpt


def kept_object_share(ckpt: str, shapes: str) -> tuple[float, float, float]:
    """How much of the kept cells' area is object (pixels far from the image's median colour)."""
    from mqscale.convert.export import load_exported
    from mqscale.data.loader import StreamingLoader
    from mqscale.train.tokenizer_trainer import to_images

    tok, cfg = load_exported(ckpt, expect="mqvae")
    loader = StreamingLoader(shapes, DataConfig(kind="images", batch_size=256, num_workers=0, shuffle=False,
                                                resolution=cfg.model.resolution))
    x, _ = to_images(next(iter(loader)), "cpu")
    enc = tok.encode(x)
    med = x.flatten(2).median(dim=2).values[:, :, None, None]
    obj = ((x - med).abs().sum(1, keepdim=True) > 0.3).float()
    cell = F.avg_pool2d(obj, cfg.model.factor).flatten(1)
    rec = tok.decode(enc.codes, enc.positions)
    psnr = (10 * torch.log10(4.0 / ((rec.clamp(-1, 1) - x) ** 2).mean())).item()
    return cell.gather(1, enc.positions).mean().item(), cell.mean().item(), psnr


def tokenize_step(tokenizer: str, shapes: str, out: str) -> None:
    from mqscale import tokenize

    t = time.perf_counter()
    lines = quiet(tokenize.main, ["--tokenizer", tokenizer, "--input", shapes, "--output", out, "--workers", "1",
                                  "--no-progress"], "tokenize").strip().splitlines()
    print(f"[tokenize] {lines[0]} in {time.perf_counter() - t:.0f}s")
    for line in lines[1:3]:
        print(f"[tokenize] {line}")
