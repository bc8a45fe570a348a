"""python -m mqscale.demo [--config C] [overrides]: the pipeline so far, end to end on a CPU.

1. Data: builds the embedded shapes dataset as image shards (``data_tools.make_shapes``),
   verifies every shard's sha256 and sample, and streams an epoch through the loader.
2. Tokenizer: trains the demo MQ-VAE on those shards under Ray Train
   (``mqscale.train_tokenizer``, configs/mqvae/demo.yaml), pictures what its masks keep
   (``mqscale.visualize_masks`` -> masks.png) and measures it.
3. Pre-tokenization: turns the image shards into token shards once (``mqscale.tokenize``).
4. Stackformer: trains a tiny class-conditional Stackformer on those token shards through the
   streaming loader, samples every class with the KV-cached Algorithm 1 sampler, and decodes the
   samples with the tokenizer (-> samples.png). Until the distributed trainer lands (issue #6)
   this step uses a plain AdamW loop.

Every number it prints comes from the run.
"""
from __future__ import annotations

import argparse
import re
import time
from contextlib import redirect_stdout
from io import StringIO

import torch
import torch.nn.functional as F

from mqscale.cli import add_config_args, config_from_args, guarded
from mqscale.config import DataConfig, from_dict, to_dict
from mqscale.models import Stackformer, param_count
from mqscale.sampling import SamplingParams, sample, sample_recompute
from mqscale.train.optim import lr_at, param_groups


def quiet(fn, *args) -> tuple[int, str]:
    buf = StringIO()
    with redirect_stdout(buf):
        rc = fn(*args)
    return rc, buf.getvalue()


def data_step(out: str, count: int, resolution: int) -> None:
    from data_tools.make_shapes import KINDS, write_shapes
    from data_tools.scan import scan
    from mqscale.data.loader import StreamingLoader

    res = write_shapes(out, count, resolution=resolution, shard_size=250, progress=False)
    rep, _ = scan(out, check_sha=True)
    print(f"[data] {res.samples} shapes images in {rep.shards} shards at {out} (written {res.written}, "
          f"kept {res.kept}); verify: {'OK' if rep.ok else 'FAILED'}, {rep.samples} decoded, {len(rep.bad)} bad")
    loader = StreamingLoader(out, DataConfig(batch_size=50, num_workers=0, resolution=resolution))
    t, seen, labels = time.perf_counter(), 0, torch.zeros(len(KINDS), dtype=torch.long)
    for b in loader:
        seen += int(b["mask"].sum())
        labels += torch.bincount(b["labels"][b["mask"]], minlength=len(KINDS))
    rate = seen / (time.perf_counter() - t)
    print(f"[data] streamed one epoch: {seen} images exactly once, {rate:,.0f} images/s; classes "
          + " ".join(f"{k}={n}" for k, n in zip(KINDS, labels.tolist())))


def tokenizer_step(shapes: str, workdir: str, steps: int) -> str:
    """Train the demo tokenizer under Ray Train; picture and measure its masks. Returns its export."""
    from mqscale import train_tokenizer, visualize_masks

    t = time.perf_counter()
    rc, out = quiet(train_tokenizer.main, ["--config", "configs/mqvae/demo.yaml", f"data.train_url={shapes}",
                                           f"train.max_steps={steps}", f"checkpoint.dir={workdir}/ray",
                                           f"logging.tensorboard_dir={workdir}/tb_tokenizer"])
    found = re.search(r"tokenizer checkpoint: (\S+)", out)
    if rc != 0 or not found:
        raise RuntimeError(f"tokenizer training failed:\n{out[-2000:]}")
    ckpt = found.group(1)
    print(f"[tokenizer] trained {steps} steps under Ray Train in {time.perf_counter() - t:.0f}s -> {ckpt}")
    _, out = quiet(visualize_masks.main, ["--tokenizer", ckpt, "--input", shapes, "-n", "8",
                                          "--out", f"{workdir}/masks.png"])
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


def tokenize_step(ckpt: str, shapes: str, out: str) -> None:
    from mqscale import tokenize

    t = time.perf_counter()
    rc, text = quiet(tokenize.main, ["--tokenizer", ckpt, "--input", shapes, "--output", out, "--workers", "1",
                                     "--no-progress"])
    if rc != 0:
        raise RuntimeError(f"tokenize failed:\n{text[-2000:]}")
    lines = text.strip().splitlines()
    print(f"[tokenize] {lines[0]} in {time.perf_counter() - t:.0f}s")
    print(f"[tokenize] {lines[1]}")
    if len(lines) > 2:
        print(f"[tokenize] {lines[2]}")


def stackformer_step(cfg, tokens: str, ckpt: str, workdir: str, steps: int) -> None:
    from mqscale.convert.export import load_exported
    from mqscale.data.loader import StreamingLoader
    from mqscale.data.manifest import read_manifest
    from mqscale.data.tokens import TokenMeta
    from mqscale.train.tokenizer_visuals import to_png

    meta = TokenMeta.from_dict(read_manifest(tokens).meta)
    d = to_dict(cfg)
    d["model"].update(grid=meta.grid, codebook_size=meta.codebook_size, seq_len=meta.seq_len, cond="class",
                      n_classes=meta.n_classes, block_size=0)
    cfg = from_dict(d, "demo (model sized to the token shards)")
    m = cfg.model
    model = Stackformer(m)
    print(f"[stackformer] {m.n_code_layer}+{m.n_pos_layer} layers, width {m.n_embd}, {param_count(m):,} params; "
          f"grid {m.grid}x{m.grid}, L={m.seq_len}, K={m.codebook_size}, {m.n_classes} classes")
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    loader = StreamingLoader(tokens, DataConfig(batch_size=cfg.data.batch_size * 4, num_workers=0,
                                                seed=cfg.data.seed))
    t0, tokens_seen, step = time.perf_counter(), 0, 0
    while step < steps:
        for batch in loader:
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.optim, steps)
            keep = batch["mask"]
            out = model(batch["codes"][keep], batch["positions"][keep], cond=batch["cond"][keep])
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or 1e9)
            opt.step()
            tokens_seen += int(keep.sum()) * m.seq_len
            if step % max(1, steps // 6) == 0 or step == steps - 1:
                print(f"[stackformer] step {step:4d}  loss {out.loss.item():.3f}  code {out.code_loss.item():.3f}  "
                      f"pos {out.pos_loss.item():.3f}  {tokens_seen / (time.perf_counter() - t0):,.0f} tok/s "
                      f"(epoch {loader.epoch})")
            step += 1
            if step >= steps:
                break
    classes = torch.arange(m.n_classes).repeat_interleave(4)
    params = SamplingParams(temperature=1.0, top_k=50)
    t = time.perf_counter()
    codes, pos = sample(model, classes, code=params, pos=params, generator=torch.Generator().manual_seed(0))
    cached = time.perf_counter() - t
    t = time.perf_counter()
    sample_recompute(model, classes, code=params, pos=params, generator=torch.Generator().manual_seed(0))
    recompute = time.perf_counter() - t
    print(f"[sample] {len(classes)} sequences ({m.n_classes} classes x 4): KV-cached {cached:.2f}s, "
          f"full-prefix recompute {recompute:.2f}s ({recompute / cached:.1f}x); raster order held: "
          f"{bool((pos.diff(dim=1) > 0).all())}")
    tok, _ = load_exported(ckpt, expect="mqvae")
    images = tok.decode(codes, pos)                                     # [n, 3, r, r]
    n, r = m.n_classes, images.shape[-1]
    grid = ((images.clamp(-1, 1) + 1) / 2).view(n, 4, 3, r, r).permute(2, 0, 3, 1, 4).reshape(3, n * r, 4 * r)
    from mqscale.data import fs
    fs.write_bytes(f"{workdir}/samples.png", to_png(grid))
    print(f"[sample] decoded with the tokenizer -> {workdir}/samples.png (one row per class)")


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="configs/stackformer/debug.yaml")
    p.add_argument("--steps", type=int, default=None, help="Stackformer steps (default: train.max_steps)")
    p.add_argument("--tokenizer-steps", type=int, default=300, help="demo tokenizer steps")
    p.add_argument("--images", type=int, default=2000, help="shapes images to build")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes")
    ns = p.parse_args(argv)
    cfg = config_from_args(ns)
    torch.manual_seed(cfg.train.seed)
    shapes, tokens = f"{ns.workdir}/shapes", f"{ns.workdir}/tokens"
    import shutil
    for stale in ("ray", "tokens", "tb_tokenizer"):  # a demo starts fresh (the shapes shards are kept)
        shutil.rmtree(f"{ns.workdir}/{stale}", ignore_errors=True)
    data_step(shapes, ns.images, resolution=32)
    ckpt = tokenizer_step(shapes, ns.workdir, ns.tokenizer_steps)
    tokenize_step(ckpt, shapes, tokens)
    stackformer_step(cfg, tokens, ckpt, ns.workdir, ns.steps or cfg.train.max_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
