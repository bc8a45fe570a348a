"""Tokenizer metrics: how well the MQ-VAE rebuilds images from the codes it keeps.

Over the first N images of an image shard set (in shard order, so two tokenizers see the same
images): PSNR and SSIM on the uint8 images, LPIPS when its weights are given, rFID (FID of the
reconstructions against the originals) when the Inception weights are given, codebook usage
(share of codes used) and perplexity (exp of the code distribution's entropy), and the mean map
of kept cells. ``keep`` overrides how many cells the mask keeps, for the mask-ratio sweep. With a
quality judge (and labelled images): its accuracy on the reconstructions next to its accuracy on
the originals, and FD_judge of the reconstructions against its held-out real images.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from mqscale.core.frechet import FeatureStats, frechet_distance
from mqscale.core.images import psnr, to_uint8
from mqscale.evaluate.fid import extract
from mqscale.evaluate.image_metrics import ssim
from mqscale.judge.metrics import LoadedJudge, accuracy


@contextmanager
def keeping(tokenizer, keep: int | None):
    """The tokenizer's mask keeps ``keep`` cells inside the block (None: as configured)."""
    old = tokenizer.masker.keep
    if keep is not None:
        grid = tokenizer.cfg.grid
        if not 1 <= keep <= grid * grid:
            raise ValueError(f"cannot keep {keep} of {grid * grid} cells")
        tokenizer.masker.keep = keep
    try:
        yield
    finally:
        tokenizer.masker.keep = old


@dataclass
class ReconstructionResult:
    metrics: dict[str, float]
    mask_map: np.ndarray                      # [grid, grid]: share of images keeping each cell
    code_counts: np.ndarray = field(repr=False)


def codebook_stats(counts: np.ndarray) -> dict[str, float]:
    p = counts / max(1, counts.sum())
    nz = p[p > 0]
    return {"codebook_usage": float((counts > 0).mean()),
            "codebook_perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


@torch.no_grad()
def evaluate_tokenizer(tokenizer, images: Iterator, *, inception=None, lpips=None, keep: int | None = None,
                       judge: LoadedJudge | None = None) -> ReconstructionResult:
    """``images`` yields float [-1, 1] batches, or (batch, labels) pairs (needed with ``judge``)."""
    cfg = tokenizer.cfg
    device = next(tokenizer.parameters()).device
    counts = np.zeros(cfg.codebook_size, dtype=np.int64)
    mask_sum = torch.zeros(cfg.grid * cfg.grid, dtype=torch.float64)
    psnrs, ssims, lp, originals, recons = [], [], [], [], []
    with keeping(tokenizer, keep):
        for x in images:
            enc = tokenizer.encode(x.to(device))
            rec = tokenizer.decode(enc.codes, enc.positions).float().clamp(-1, 1).cpu()
            a, b = to_uint8(x), to_uint8(rec)
            psnrs.append(psnr(a, b, data_range=255.0, per_image=True))
            ssims.append(ssim(a, b))
            if lpips is not None:
                lp.append(lpips(x.to(device), rec.to(device)).float().cpu())
            if inception is not None:  # features batch by batch: the images themselves are not kept
                originals.append(extract(inception, [a])[0])
                recons.append(extract(inception, [b])[0])
            if judge is not None:
                if y is None:
                    raise ValueError("reconstruction accuracy needs labelled images")
                judged["labels"].append(y)
                judged["orig"].append(judge.judge(x)[0])
                pred, feats = judge.judge(rec)
                judged["rec"].append(pred)
                judged["feats"].append(feats)
            counts += np.bincount(enc.codes.flatten().cpu().numpy(), minlength=cfg.codebook_size)
            mask_sum += torch.zeros_like(mask_sum).scatter_add_(
                0, enc.positions.flatten().cpu(), torch.ones(enc.positions.numel(), dtype=torch.float64))
            L = enc.positions.shape[1]
    n = sum(len(p) for p in psnrs)
    if not n:
        raise ValueError("no images to evaluate")
    p = torch.cat(psnrs)
    metrics = {"images": float(n), "seq_len": float(L), "mask_ratio": L / cfg.grid ** 2,
               "psnr": float(p[torch.isfinite(p)].mean()) if torch.isfinite(p).any() else float("inf"),
               "ssim": float(torch.cat(ssims).mean()), **codebook_stats(counts)}
    if lp:
        metrics["lpips"] = float(torch.cat(lp).mean())
    if inception is not None:
        metrics["rfid"] = frechet_distance(FeatureStats.of(np.concatenate(originals)),
                                           FeatureStats.of(np.concatenate(recons)))
    if judge is not None:
        labels = torch.cat(judged["labels"])
        if (labels < 0).any():
            raise ValueError("reconstruction accuracy needs class-labelled images; some have no class")
        metrics["recon_accuracy"] = accuracy(torch.cat(judged["rec"]), labels)
        metrics["original_accuracy"] = accuracy(torch.cat(judged["orig"]), labels)
        metrics["fd_judge"] = judge.fd(np.concatenate(judged["feats"]))
    return ReconstructionResult(metrics, (mask_sum / n).view(cfg.grid, cfg.grid).numpy(), counts)
