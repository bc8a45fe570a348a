"""Training a judge: labelled images held in memory, a few epochs of AdamW, then its held-out
accuracy and feature statistics, exported.

Why augment: a judge that calls a slightly soft star "not a star" measures sharpness, not shape,
and sharpness is what FD_judge is for. Training images are flipped, and some are blurred (a
Gaussian of sigma up to 1.2 px) or given a little noise, so the verdict follows the shape a person
sees; heavier blur still changes the features, and FD_judge with them.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mqscale.core import storage
from mqscale.core.errors import InputError
from mqscale.core.frechet import FeatureStats, frechet_distance
from mqscale.core.images import from_uint8
from mqscale.data.config import DataConfig
from mqscale.data.images import decode_image_sample
from mqscale.data.loader import StreamingLoader, resolve_source
from mqscale.data.manifest import manifest_url, read_manifest
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.judge.config import JUDGE, JudgeRecord, JudgeTrainConfig
from mqscale.judge.metrics import LoadedJudge, accuracy
from mqscale.models.judge import Judge, JudgeArgs

@dataclass
class Labelled:
    images: torch.Tensor      # uint8 [N, H, W, C]
    labels: torch.Tensor      # long [N]
    classes: list[str]
    manifest_sha256: str


def read_labelled(url: str, resolution: int, limit: int = 0, storage_options: dict | None = None) -> Labelled:
    """Every decodable image of a class-labelled shard set (or its first ``limit``), in shard order."""
    man = read_manifest(manifest_url(url), storage_options)
    if not man.classes:
        raise InputError(f"{url}: the shard set has no class map; a judge needs class-labelled images")
    loader = StreamingLoader(url, DataConfig(kind="images", batch_size=256, num_workers=0, shuffle=False,
                                             resolution=resolution, storage_options=storage_options or {}))
    xs, ys = [], []
    for batch in loader:
        keep = batch["mask"] & (batch["labels"] >= 0)
        xs.append(batch["images"][keep])
        ys.append(batch["labels"][keep].long())
        if limit and sum(len(y) for y in ys) >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    if limit:
        x, y = x[:limit], y[:limit]
    if len(y) < 2:
        raise InputError(f"{url}: {len(y)} labelled images; a judge needs more")
    sha = storage.sha256_url(manifest_url(url), storage_options)[0]
    return Labelled(x, y, list(man.classes), sha)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Each image [C, H, W] of x blurred by its own sigma [N] (px), separably, edges replicated."""
    k = 2 * math.ceil(2.5 * float(sigma.max())) + 1
    r = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
    g = torch.exp(-r[None] ** 2 / (2 * sigma[:, None].clamp_min(1e-3) ** 2))
    g = g / g.sum(1, keepdim=True)                                   # [N, k]
    n, c, h, w = x.shape
    y = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="replicate")
    kern = g.repeat_interleave(c, 0)                                 # [N*C, k]
    y = F.conv2d(y, kern[:, None, None, :], groups=n * c)
    y = F.conv2d(y, kern[:, None, :, None], groups=n * c)
    return y.view(n, c, h, w)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    u = lambda *s: torch.rand(*s, generator=gen)  # noqa: E731
    x = torch.where(u(n, 1, 1, 1) < 0.5, x.flip(3), x)
    blur = u(n) < 0.5
    if blur.any():
        x = x.clone()
        x[blur] = _gaussian_blur(x[blur], 0.3 + 0.9 * u(int(blur.sum())))
    noise = (u(n, 1, 1, 1) < 0.3) * u(n, 1, 1, 1) * 0.08
    return (x + noise * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


def fit(model: Judge, data: Labelled, cfg: JudgeTrainConfig, device: torch.device) -> float:
    """Trains in place; returns seconds."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n, bs = len(data.labels), min(cfg.batch_size, len(data.labels))
    steps = cfg.epochs * max(1, n // bs)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=steps, pct_start=0.15)
    model.train()
    t0 = time.perf_counter()
    for _ in range(cfg.epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - bs + 1, bs):
            idx = order[i:i + bs]
            x = from_uint8(data.images[idx])
            if cfg.augment:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x.to(device)), data.labels[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    return time.perf_counter() - t0


def train_judge(images: str, out_dir: str | Path, heldout: str = "", resolution: int = 0,
                cfg: JudgeTrainConfig = JudgeTrainConfig(), storage_options: dict | None = None,
                device: str | torch.device = "cpu") -> tuple[LoadedJudge, dict]:
    """Train, measure and export a judge; returns it and a summary (accuracies, FD floor, seconds).
    ``resolution`` 0 takes the images' own size (the first image's side)."""
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    res = resolution or _first_side(images, storage_options)
    train = read_labelled(images, res, cfg.max_images, storage_options)
    if heldout:
        held = read_labelled(heldout, res, cfg.heldout_images, storage_options)
        if held.classes != train.classes:
            raise InputError(f"{heldout}: its classes {held.classes[:3]}... differ from {images}'s {train.classes[:3]}...")
    else:   # every n-th image held out
        pick = torch.arange(len(train.labels)) % cfg.heldout_every == 0
        held = Labelled(train.images[pick], train.labels[pick], train.classes, train.manifest_sha256)
        train = Labelled(train.images[~pick], train.labels[~pick], train.classes, train.manifest_sha256)
    args = JudgeArgs(resolution=res, n_classes=len(train.classes), width=cfg.width, in_channels=train.images.shape[-1])
    model = Judge(args).to(device)
    seconds = fit(model, train, cfg, device)
    lj = LoadedJudge(model, JudgeRecord(), str(out_dir))
    x_held = from_uint8(held.images)
    pred, feats = lj.judge(x_held)
    acc = accuracy(pred, held.labels)
    stats = FeatureStats.of(feats)
    model.reference_mean.copy_(torch.from_numpy(stats.mu))
    model.reference_cov.copy_(torch.from_numpy(stats.sigma))
    model.reference_count.fill_(stats.n)
    half = len(feats) // 2   # FD between two halves of the held-out set: the floor FD_judge can reach
    floor = frechet_distance(FeatureStats.of(feats[:half]), FeatureStats.of(feats[half:])) if half >= 2 else float("nan")
    record = JudgeRecord(model=args, classes=train.classes, train_data=images,
                         train_manifest_sha256=train.manifest_sha256, heldout_data=heldout or f"{images} (every "
                         f"{cfg.heldout_every}th image)", heldout_manifest_sha256=held.manifest_sha256 if heldout else "",
                         heldout_accuracy=acc, train_images=len(train.labels), heldout_images=len(held.labels), train=cfg)
    JUDGE.save(model, record, out_dir, source=f"mqscale.judge:{images}")
    lj.record = record
    per_class = [accuracy(pred[held.labels == c], held.labels[held.labels == c]) for c in range(len(train.classes))
                 if (held.labels == c).any()]
    summary = {"heldout_accuracy": acc, "worst_class_accuracy": min(per_class), "train_images": len(train.labels),
               "heldout_images": len(held.labels), "fd_floor": floor, "seconds": seconds, "resolution": res}
    return lj, summary


def _first_side(url: str, storage_options: dict | None) -> int:
    """The side of the set's first decodable image (a judge takes square images of one size)."""
    src = resolve_source(url, "images", storage_options)
    for shard in src.shards:
        with storage.open_read(shard.url, storage_options) as f:
            for _, sample in iter_samples(f, shard.url, ReadStats()):
                try:
                    return decode_image_sample(sample, 0)["image"].shape[0]
                except (ValueError, OSError):   # an undecodable sample: the next one decides
                    continue
    raise InputError(f"{url}: no decodable image")
