"""Writing a shard set: each shard committed atomically, reruns skip verified shards, manifest last.

Used by ``data_tools.shard_images``, ``data_tools.make_shapes`` and (later) the tokenize stage.
A caller describes the set as a plan: shard i holds a known list of items, in a deterministic
order. ``write_shard_set`` then, for each shard:

- if a shard already sits under the final name and holds exactly the planned keys (and, when a
  previous manifest exists, the same sha256), keeps it untouched;
- otherwise writes it through ``fs.atomic_writer`` (temporary name + rename, or one completed
  upload), so a crash leaves no half shard under a final name;

and writes ``manifest.json`` only after every shard is in place.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import posixpath
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from mqscale.data import fs
from mqscale.data.manifest import (Manifest, ManifestError, ShardInfo, read_manifest, sha256_url,
                                   write_manifest)
from mqscale.data.tario import Progress, ReadStats, iter_samples


@dataclass
class ShardJob:
    index: int
    name: str
    keys: list[str]      # the tar sample keys this shard must hold, in order
    items: Any           # whatever the producer needs to make them
    n: int | None = None  # samples it holds, when not one per key (a token shard's chunks)

    @property
    def samples(self) -> int:
        return len(self.keys) if self.n is None else self.n


@dataclass
class SetResult:
    manifest_url: str
    written: int
    kept: int
    samples: int
    items_per_s: float


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def holds_exactly(url: str, keys: list[str], storage_options: dict | None) -> bool:
    """A complete shard: a readable tar whose sample keys are exactly ``keys``, in order."""
    stats = ReadStats()
    try:
        with fs.open_read(url, storage_options) as f:
            got = [k for k, _ in iter_samples(f, url, stats)]
    except (OSError, ValueError):
        return False
    return stats.corrupt_shards == 0 and got == keys


def clean_stale_temporaries(base: str, storage_options: dict | None) -> int:
    """Remove temporary files a killed writer left (hidden ``.name.tmp-*``); they are never read."""
    filesystem, path = fs.get_fs(base, storage_options)
    if fs.protocol(filesystem) in fs.OBJECT_STORES or not filesystem.exists(path):
        return 0
    stale = [p for p in filesystem.ls(path, detail=False)
             if posixpath.basename(p).startswith(".") and ".tmp-" in posixpath.basename(p)]
    for p in stale:
        filesystem.rm(p)
    return len(stale)


def _run_job(produce: Callable, job: ShardJob, base: str, storage_options: dict | None) -> ShardInfo:
    url = fs.join(base, job.name)
    with fs.atomic_writer(url, storage_options) as f:
        n = produce(f, job)
    if n != job.samples:
        raise RuntimeError(f"{url}: wrote {n} samples, planned {job.samples}")
    sha, size = sha256_url(url, storage_options)
    return ShardInfo(job.name, n, size, sha)


def write_shard_set(base: str, jobs: Sequence[ShardJob], produce: Callable, *, fmt: str,
                    classes: list[str] | None = None, meta: dict | None = None, workers: int = 1,
                    storage_options: dict | None = None, progress: bool = True,
                    unit: str = "img", created_by: str = "mqscale") -> SetResult:
    """``produce(stream, job) -> samples written`` must be a picklable top-level function."""
    fs.makedirs(base, storage_options)
    clean_stale_temporaries(base, storage_options)
    try:
        previous = {s.name: s for s in read_manifest(base, storage_options).shards}
    except ManifestError:
        previous = {}
    infos: dict[int, ShardInfo] = {}
    todo: list[ShardJob] = []
    bar = Progress(sum(j.samples for j in jobs), f"shards -> {base}", unit, progress)
    for job in jobs:
        url = fs.join(base, job.name)
        if fs.exists(url, storage_options) and holds_exactly(url, job.keys, storage_options):
            sha, size = sha256_url(url, storage_options)
            old = previous.get(job.name)
            if old is None or old.sha256 == sha:
                infos[job.index] = ShardInfo(job.name, job.samples, size, sha)
                bar.update(job.samples)
                continue
        todo.append(job)
    in_process = workers <= 1 or len(todo) <= 1 or base.startswith("memory://")
    if in_process:
        for job in todo:
            infos[job.index] = _run_job(produce, job, base, storage_options)
            bar.update(job.samples)
    else:
        ctx = mp.get_context("spawn")  # no fsspec/s3fs state crosses a fork
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = {pool.submit(_run_job, produce, job, base, storage_options): job for job in todo}
            for fut in cf.as_completed(futures):
                job = futures[fut]
                infos[job.index] = fut.result()
                bar.update(job.samples)
    rate = bar.close()
    manifest = Manifest(format=fmt, shards=[infos[j.index] for j in jobs], classes=classes,
                        meta=meta or {}, created_by=created_by)
    url = write_manifest(base, manifest, storage_options)
    return SetResult(url, len(todo), len(jobs) - len(todo), manifest.total, rate)
