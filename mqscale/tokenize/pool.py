"""Pre-tokenization: image shard i -> token shard i, encoded once by a frozen MQ-VAE.

Why shard-per-task on a pool of Ray actors (not Ray Data): the unit of atomic commit, of rerun
skipping and of determinism is the shard, so the work is scheduled in shards. Each actor loads
the tokenizer once and takes the next shard when it finishes one; a shard's bytes depend only on
the shard and the options (batches restart at every shard), so 1 worker, 8 workers or a rerun
after a kill all write identical files. Ray Data would add a detour through Arrow blocks and
repartitioning for no gain here. The manifest is written last; its ``meta`` and the summary add
up every shard's own statistics (see ``jobs.py``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
from ray.util import ActorPool

from mqscale.core import storage
from mqscale.core.console import Progress
from mqscale.core.errors import InputError
from mqscale.core.ray import start_ray
from mqscale.core.storage import sha256_url
from mqscale.data.loader import resolve_source
from mqscale.data.manifest import TOKENS_FORMAT, Manifest, manifest_url, write_manifest
from mqscale.data.tokens import TokenMeta, mask_map
from mqscale.data.writer import clean_stale_temporaries
from mqscale.tokenize.jobs import (
    Job,
    Options,
    ShardResult,
    build_meta,
    plan_jobs,
    refuse_foreign_output,
    tokenizer_identity,
)
from mqscale.tokenize.shard import ShardTokenizer

log = logging.getLogger("mqscale.tokenize")


@dataclass
class Summary:
    manifest: str
    shards: int
    written: int
    kept: int
    images_in: int
    sequences_out: int
    skipped: dict[str, int]
    codebook_used: int
    codebook_size: int
    mask_mean: list[float]
    images_per_s: float


def run(opts: Options, workers: int = 1, address: str | None = None, progress: bool = True) -> Summary:
    """``workers`` Ray actors (0: in this process, no Ray). Writes the manifest last."""
    if address and workers == 0:
        raise InputError(f"--address {address} needs Ray actors, but --workers 0 runs in this process "
                         "without Ray; give --workers N (N >= 1)")
    tok_sha, tok_cfg = tokenizer_identity(opts.tokenizer)
    src = resolve_source(opts.input, "images", opts.storage_options)
    meta = build_meta(opts, src, tok_sha, tok_cfg)
    refuse_foreign_output(opts, meta)
    storage.makedirs(opts.output, opts.storage_options)
    clean_stale_temporaries(opts.output, opts.storage_options)
    jobs = plan_jobs(opts, src)
    bar = Progress(src.total, f"tokenize -> {opts.output}", "img", progress)
    t0 = time.perf_counter()
    results: list[ShardResult] = []
    for r in _execute(opts, meta, jobs, workers, address):
        results.append(r)
        bar.update(src.shards[r.index].n)
    bar.close()
    results.sort(key=lambda r: r.index)
    totals = aggregate(results, meta)
    in_meta = {"input": opts.input, "input_manifest_sha256": _manifest_sha(opts),
               "tokenizer": str(Path(opts.tokenizer)) if "://" not in opts.tokenizer else opts.tokenizer,
               "tokenizer_config": tok_cfg, "options": asdict(opts) | {"storage_options": {}},
               "options_fingerprint": opts.fingerprint(), "images_in": totals["images_in"],
               "skipped": totals["skipped"], "codebook_used": totals["codebook_used"]}
    manifest = Manifest(format=TOKENS_FORMAT, shards=[r.info for r in results], classes=src.classes,
                        meta={**meta.to_dict(), **in_meta}, created_by="mqscale.tokenize")
    url = write_manifest(opts.output, manifest, opts.storage_options)
    fresh = [r for r in results if not r.kept]
    dt = time.perf_counter() - t0
    return Summary(url, len(results), len(fresh), len(results) - len(fresh), **totals,
                   images_per_s=sum(r.stats["images_in"] for r in fresh) / dt if dt > 0 else 0.0)


def aggregate(results: list[ShardResult], meta: TokenMeta) -> dict:
    """The summary's numbers over all shards of the output (each shard's header stats added up)."""
    skipped: dict[str, int] = {}
    codes = np.zeros(meta.codebook_size, np.int64)
    masks = np.zeros(meta.n_positions, np.int64)
    for r in results:
        for k, v in r.stats["skipped"].items():
            skipped[k] = skipped.get(k, 0) + v
        codes += np.asarray(r.stats["code_counts"], np.int64)
        masks += np.asarray(r.stats["position_counts"], np.int64)
    seqs = sum(r.info.n for r in results)
    return {"images_in": sum(r.stats["images_in"] for r in results), "sequences_out": seqs * (2 if meta.flip else 1),
            "skipped": dict(sorted(skipped.items())), "codebook_used": int((codes > 0).sum()),
            "codebook_size": meta.codebook_size, "mask_mean": (masks / max(1, seqs)).tolist()}


def _manifest_sha(opts: Options) -> str:
    if "{" in opts.input:
        return ""
    try:
        return sha256_url(manifest_url(opts.input), opts.storage_options)[0]
    except OSError:
        return ""


def _execute(opts: Options, meta: TokenMeta, jobs: list[Job], workers: int, address: str | None):
    if workers == 0:
        worker = ShardTokenizer(opts, meta)
        for job in jobs:
            yield worker.run(job)
        return
    start_ray(address)
    n, cpus, gpus = actor_sizes([node["Resources"] for node in ray.nodes() if node.get("Alive")], workers)
    if n < workers:
        log.warning("--workers %d: the Ray cluster can place only %d tokenizer actors (%d CPU%s each); "
                    "using %d", workers, n, cpus, f", {gpus} GPU" if gpus else "", n)
    actor = ray.remote(num_gpus=gpus, num_cpus=cpus)(ShardTokenizer)
    pool = ActorPool([actor.remote(opts, meta, None, cpus) for _ in range(n)])
    yield from pool.map_unordered(lambda a, j: a.run.remote(j), jobs)


def actor_sizes(nodes: list[dict], workers: int) -> tuple[int, int, int]:
    """(actors, CPUs each, GPUs each) for ``workers`` tokenizer actors on nodes with these Ray
    resources (``{"CPU": 16, "GPU": 2, ...}`` each), such that every actor can be placed at once.

    Why: the pool hands a shard to every actor up front, so one actor Ray can never place (asking
    more CPUs than any node has, or a GPU beyond the cluster's) hangs the run instead of failing.
    With GPUs there is one actor per GPU (and a CPU beside it); otherwise the cluster's CPUs are
    shared out, no actor asking more than its node holds, and actors that do not fit are dropped.
    """
    gpu_nodes = [(int(r.get("GPU", 0)), int(r.get("CPU", 0))) for r in nodes if int(r.get("GPU", 0)) >= 1]
    if gpu_nodes:
        slots = sum(min(g, c) for g, c in gpu_nodes)
        if not slots:
            raise InputError("the Ray cluster's GPU nodes have no CPU to run a tokenizer actor beside a GPU")
        return min(workers, slots), 1, 1
    cpus = [int(r.get("CPU", 0)) for r in nodes]
    if not any(cpus):
        raise InputError("the Ray cluster has no CPU to run a tokenizer actor on")
    each = max(1, min(sum(cpus) // workers, max(cpus)))
    while each > 1 and sum(c // each for c in cpus) < workers:
        each -= 1
    return min(workers, sum(c // each for c in cpus)), each, 0


def summary_lines(s: Summary) -> list[str]:
    """What a run reports: shards, images in and sequences out, skips, codebook use, the mask map."""
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(s.skipped.items())) or "none"
    lines = [f"{s.shards} token shards -> {s.manifest} (written {s.written}, kept {s.kept})",
             f"images in: {s.images_in}, sequences out: {s.sequences_out}, skipped: {skipped}; "
             f"{s.images_per_s:.1f} images/s"]
    if s.sequences_out:
        g = int(len(s.mask_mean) ** 0.5)
        lines.append(f"codebook usage: {s.codebook_used}/{s.codebook_size} "
                     f"({100 * s.codebook_used / s.codebook_size:.1f}%)")
        lines.append("mean kept-position map:")
        lines += ["  " + line for line in mask_map(np.array(s.mask_mean).reshape(g, g))]
    return lines
