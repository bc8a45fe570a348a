"""Generator metrics: FID and IS of N generated images against a shard set's reference statistics.

Conditions follow the field's protocol: a class-conditional model gets classes in turn (50 per
class for 50,000 images over ImageNet's 1,000), a text model the prompts of a file in turn, an
unconditional model nothing. Images are rounded to uint8 (what a saved PNG holds) before the
Inception sees them, and only their features are kept, so N = 50,000 fits in memory.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from mqscale.core.frechet import FeatureStats, frechet_distance
from mqscale.core.images import to_uint8
from mqscale.data.loader import iter_images
from mqscale.evaluate.fid import (
    extract,
    inception_score,
    load_reference,
    save_reference,
    source_identity,
    stats_location,
)
from mqscale.generate.generator import ImageGenerator, SamplingSettings
from mqscale.judge.metrics import LoadedJudge, accuracy


def evaluation_conditions(gen: ImageGenerator, n: int, prompt_ids: torch.Tensor | None = None
                          ) -> torch.Tensor | None:
    m = gen.run_cfg.model
    if m.cond == "class":
        return torch.arange(n) % m.n_classes
    if m.cond == "text":
        if prompt_ids is None:
            raise ValueError("a text-conditional model needs prompts (--prompts FILE)")
        return prompt_ids[torch.arange(n) % len(prompt_ids)]
    return None


def reference_stats(shards: str, inception, inception_sha: str, resolution: int, n: int, batch_size: int,
                    storage_options: dict | None = None, log=print) -> FeatureStats:
    """The shard set's Inception statistics at ``resolution``: stored ones when they match, else
    computed from its first ``n`` images and stored beside the shards."""
    ident = source_identity(shards, storage_options)
    loc = stats_location(shards, inception_sha, inception.input_size, resolution, n)
    expect = {"inception_sha256": inception_sha, "source_manifest_sha256": ident}
    found = load_reference(loc, expect, storage_options)
    if found is not None:
        log(f"reference statistics: {loc}.npz ({found.n} images, checksum verified)")
        return found
    t = time.perf_counter()
    feats, _ = extract(inception, (to_uint8(x) for x in iter_images(shards, resolution, n, batch_size,
                                                                         storage_options)))
    stats = FeatureStats.of(feats)
    save_reference(loc, stats, {**expect, "images": stats.n, "resolution": resolution,
                                "inception_size": inception.input_size, "source": shards}, storage_options)
    log(f"reference statistics: {stats.n} images in {time.perf_counter() - t:.0f}s -> {loc}.npz")
    return stats


def evaluate_generator(gen: ImageGenerator, settings: SamplingSettings, inception, reference: FeatureStats,
                       n: int, is_splits: int = 10, prompt_ids: torch.Tensor | None = None) -> dict[str, float]:
    cond = evaluation_conditions(gen, n, prompt_ids)
    feats, logits = [], []
    t = time.perf_counter()
    sampling = 0.0
    for images in gen.images(cond, n, settings):
        sampling += time.perf_counter() - t
        f, lg = extract(inception, [to_uint8(images)])
        feats.append(f)
        logits.append(lg)
        t = time.perf_counter()
    feats_all, logits_all = np.concatenate(feats), np.concatenate(logits)
    is_mean, is_std = inception_score(logits_all, is_splits)
    return {"fid": frechet_distance(FeatureStats.of(feats_all), reference), "is": is_mean, "is_std": is_std,
            "images": float(len(feats_all)), "reference_images": float(reference.n),
            "images_per_s": len(feats_all) / max(sampling, 1e-9)}


def judge_generator(gen: ImageGenerator, settings: SamplingSettings, judge: LoadedJudge, n: int,
                    prompt_ids: torch.Tensor | None = None) -> dict[str, float]:
    """Conditional accuracy and FD_judge of ``n`` generated images (classes in turn)."""
    cond = evaluation_conditions(gen, n, prompt_ids)
    if cond is None or gen.cond_kind != "class":
        raise ValueError("conditional accuracy needs a class-conditional generator")
    preds, feats = [], []
    t, sampling = time.perf_counter(), 0.0
    for images in gen.images(cond, n, settings):
        sampling += time.perf_counter() - t
        p, f = judge.judge(images)
        preds.append(p)
        feats.append(f)
        t = time.perf_counter()
    pred, f = torch.cat(preds), np.concatenate(feats)
    per_class = [accuracy(pred[cond == c], cond[cond == c]) for c in cond.unique().tolist()]
    return {"cond_acc": accuracy(pred, cond), "worst_class_cond_acc": min(per_class), "fd_judge": judge.fd(f),
            "images": float(len(pred)), "images_per_s": len(pred) / max(sampling, 1e-9)}
