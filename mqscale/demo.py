"""python -m mqscale.demo [--config C] [overrides]: what exists so far, end to end on a CPU.

1. Data: builds the embedded shapes dataset as image shards (``data_tools.make_shapes``),
   verifies every shard's sha256 and sample, and streams an epoch through the loader.
2. Tokenizer: trains the demo MQ-VAE on those shards under Ray Train
   (``mqscale.train_tokenizer``, configs/mqvae/demo.yaml) and draws what its masks keep
   (``mqscale.visualize_masks`` -> runs/demo/masks.png).
3. Stackformer: until pre-tokenization and the distributed trainer land (issues #5-#6), trains
   the debug Stackformer on synthetic masked sequences whose kept positions form a class-specific
   blob, then samples each class with the KV-cached Algorithm 1 sampler and draws the masks.

Every number it prints comes from the run; it grows into the full pipeline as issues land.
"""
from __future__ import annotations

import argparse
import time

import torch

from mqscale.cli import add_config_args, config_from_args, guarded
from mqscale.models import Stackformer, param_count
from mqscale.sampling import SamplingParams, sample, sample_recompute
from mqscale.train.optim import lr_at, param_groups


def class_centres(n_classes: int, grid: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    margin = grid // 4
    return torch.randint(margin, grid - margin, (n_classes, 2), generator=g).float()


def synthetic_batch(cfg, centres: torch.Tensor, batch: int, g: torch.Generator):
    """Kept positions = the L cells nearest a jittered class centre; codes depend on class+cell."""
    m = cfg.model
    cls = torch.randint(0, m.n_classes, (batch,), generator=g)
    centre = centres[cls] + torch.randint(-2, 3, (batch, 2), generator=g)
    yy, xx = torch.meshgrid(torch.arange(m.grid), torch.arange(m.grid), indexing="ij")
    cells = torch.stack([yy.flatten(), xx.flatten()], dim=1).float()            # [G, 2]
    dist = torch.cdist(centre, cells) + 1e-3 * torch.rand(batch, m.n_positions, generator=g)
    pos = torch.sort(dist.topk(m.seq_len, largest=False).indices, dim=1).values
    codes = (cls[:, None] * 131 + pos * 7) % m.codebook_size
    noise = torch.rand(codes.shape, generator=g) < 0.1
    codes = torch.where(noise, torch.randint_like(codes, m.codebook_size), codes)
    return codes, pos, cls


def draw_mask(pos: torch.Tensor, grid: int) -> list[str]:
    rows = [["."] * grid for _ in range(grid)]
    for p in pos.tolist():
        rows[p // grid][p % grid] = "#"
    return ["".join(r) for r in rows]


def near_centre(pos: torch.Tensor, centre: torch.Tensor, grid: int, radius: float) -> float:
    yx = torch.stack([pos // grid, pos % grid], dim=-1).float()
    return ((yx - centre).norm(dim=-1) <= radius).float().mean().item()


def data_step(out: str, count: int = 1000, resolution: int = 32) -> None:
    from data_tools.make_shapes import KINDS, write_shapes
    from data_tools.scan import scan
    from mqscale.config import DataConfig
    from mqscale.data.loader import StreamingLoader

    res = write_shapes(out, count, resolution=resolution, shard_size=250, progress=False)
    rep, _ = scan(out, check_sha=True)
    print(f"[data] {res.samples} shapes images in {rep.shards} shards at {out} "
          f"(written {res.written}, kept {res.kept}); verify: "
          f"{'OK' if rep.ok else 'FAILED'}, {rep.samples} decoded, {len(rep.bad)} bad")
    loader = StreamingLoader(out, DataConfig(batch_size=50, num_workers=0, resolution=resolution))
    t, seen, labels = time.perf_counter(), 0, torch.zeros(len(KINDS), dtype=torch.long)
    for b in loader:
        seen += int(b["mask"].sum())
        labels += torch.bincount(b["labels"][b["mask"]], minlength=len(KINDS))
    rate = seen / (time.perf_counter() - t)
    print(f"[data] streamed one epoch: {seen} images exactly once, {rate:,.0f} images/s; classes "
          + " ".join(f"{k}={n}" for k, n in zip(KINDS, labels.tolist())))


def tokenizer_step(shapes: str, workdir: str, steps: int) -> None:
    """Train the demo tokenizer under Ray Train, picture its masks, and measure what they keep."""
    import re
    from contextlib import redirect_stdout
    from io import StringIO

    from mqscale import train_tokenizer, visualize_masks

    buf = StringIO()
    t = time.perf_counter()
    with redirect_stdout(buf):
        rc = train_tokenizer.main(["--config", "configs/mqvae/demo.yaml", f"data.train_url={shapes}",
                                   f"train.max_steps={steps}", f"ray.storage_path={workdir}/ray",
                                   f"logging.tensorboard_dir={workdir}/tb_tokenizer"])
    out = buf.getvalue()
    found = re.search(r"tokenizer checkpoint: (\S+)", out)
    if rc != 0 or not found:
        raise RuntimeError(f"tokenizer training failed:\n{out[-2000:]}")
    ckpt = found.group(1)
    print(f"[tokenizer] trained {steps} steps under Ray Train in {time.perf_counter() - t:.0f}s -> {ckpt}")
    with redirect_stdout(buf):
        visualize_masks.main(["--tokenizer", ckpt, "--input", shapes, "-n", "8", "--out", f"{workdir}/masks.png"])
    print(f"[tokenizer] {buf.getvalue().strip().splitlines()[-1]}")
    share, chance, psnr = kept_object_share(ckpt, shapes)
    print(f"[tokenizer] kept cells covering objects: {100 * share:.0f}% of their area vs {100 * chance:.0f}% "
          f"for random cells; reconstruction PSNR {psnr:.1f} dB over 256 images")


def kept_object_share(ckpt: str, shapes: str) -> tuple[float, float, float]:
    """How much of the kept cells' area is object (pixels far from the image's median colour)."""
    import torch.nn.functional as F

    from mqscale.config import DataConfig
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


@guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mqscale.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p, default="configs/stackformer/debug.yaml")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.max_steps)")
    p.add_argument("--workdir", default="runs/demo", help="where the demo writes its data")
    p.add_argument("--tokenizer-steps", type=int, default=300, help="demo tokenizer steps (0 skips it)")
    ns = p.parse_args(argv)
    cfg = config_from_args(ns)
    m = cfg.model
    if m.cond != "class":
        p.error("the demo draws class-conditional blobs: use model.cond=class")
    data_step(f"{ns.workdir}/shapes", resolution=32)
    if ns.tokenizer_steps:
        tokenizer_step(f"{ns.workdir}/shapes", ns.workdir, ns.tokenizer_steps)
    torch.manual_seed(cfg.train.seed)
    steps = ns.steps or cfg.train.max_steps
    model = Stackformer(m)
    print(f"[demo] Stackformer {m.n_code_layer}+{m.n_pos_layer} layers, width {m.n_embd}, "
          f"{param_count(m):,} params; grid {m.grid}x{m.grid}, L={m.seq_len}, K={m.codebook_size}")
    opt = torch.optim.AdamW(param_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                            betas=cfg.optim.betas, eps=cfg.optim.eps)
    centres = class_centres(m.n_classes, m.grid)
    g = torch.Generator().manual_seed(cfg.data.seed)
    t0, tokens = time.perf_counter(), 0
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.optim, steps)
        codes, pos, cls = synthetic_batch(cfg, centres, cfg.data.batch_size * 4, g)
        out = model(codes, pos, cond=cls)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        tokens += codes.numel()
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            print(f"[train] step {step:4d}  loss {out.loss.item():.3f}  code {out.code_loss.item():.3f}"
                  f"  pos {out.pos_loss.item():.3f}  {tokens / (time.perf_counter() - t0):,.0f} tok/s")
    cls = torch.arange(min(m.n_classes, 4)).repeat_interleave(4)
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=1.0, top_k=50)
    t = time.perf_counter()
    codes, pos = sample(model, cls, code=params, pos=params, generator=gen)
    cached = time.perf_counter() - t
    t = time.perf_counter()
    sample_recompute(model, cls, code=params, pos=params, generator=torch.Generator().manual_seed(0))
    recompute = time.perf_counter() - t
    print(f"[sample] {len(cls)} sequences of {m.seq_len}: KV-cached {cached:.2f}s, "
          f"full-prefix recompute {recompute:.2f}s ({recompute / cached:.1f}x)")
    hits = [near_centre(pos[i], centres[c], m.grid, radius=(m.seq_len / 3.14) ** 0.5 + 3)
            for i, c in enumerate(cls.tolist())]
    print(f"[sample] sampled positions inside their class blob: {100 * sum(hits) / len(hits):.0f}% "
          f"(raster order held: {bool((pos.diff(dim=1) > 0).all())})")
    left, right = draw_mask(pos[0], m.grid), draw_mask(pos[4], m.grid)
    print(f"[sample] kept-position masks: class {cls[0].item():<{m.grid - 6}} class {cls[4].item()}")
    for a, b in zip(left, right):
        print(f"         {a}   {b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
