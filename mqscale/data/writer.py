"""Writing a shard set: each shard committed atomically, reruns skip verified shards, manifest last.

Used by ``data_tools.shard_images``, ``data_tools.make_shapes`` and synthetic token sets.
A caller describes the set as a plan: shard i holds a known list of items, in a deterministic
order. ``write_shard_set`` then, for each shard:

- if a shard already sits under the final name and holds exactly the planned keys (and, when a
  previous manifest exists, the same sha256), keeps it untouched;
- otherwise writes it through ``storage.atomic_writer`` (temporary name + rename, or one completed
  upload), so a crash leaves no half shard under a final name;

and writes ``manifest.json`` only after every shard is in place.

Keys are indices, so the same keys can hold other content when a content option (seed,
resolution, image format, ...) changes. A shard is therefore kept only when the run that wrote
it had the same *settings* (format, classes, meta): those of the previous manifest, or, when a
run was killed before its manifest, of ``.pending-manifest.json``, which each run writes before
its first shard and removes after its manifest. When the settings differ or are unknown, the
old manifest and the planned shard names are removed first (so no later run can vouch for
them), then every shard is written anew.
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing as mp
import posixpath
import queue
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from mqscale.core import storage
from mqscale.core.console import Progress
from mqscale.core.errors import ManifestError
from mqscale.core.storage import sha256_url
from mqscale.data.manifest import Manifest, ShardInfo, manifest_url, read_manifest, write_manifest
from mqscale.data.tar import ReadStats, iter_samples

PENDING_NAME = ".pending-manifest.json"   # the settings of a run that has not written its manifest

# Progress per item, not per shard: producers call ``progress_tick()`` after each item. In the
# writing process it advances the bar directly; in a pool worker it posts (job, n) to a queue the
# parent drains. A producer that never ticks still moves the bar when its shard completes.
_report: Callable[[int, int], None] | None = None
_job_index = -1


def progress_tick(n: int = 1) -> None:
    """Report ``n`` more items of the shard being written (for the progress bar's items/s)."""
    if _report is not None:
        _report(_job_index, n)


def _worker_init(q) -> None:
    global _report
    # progress ticks only: a worker must never wait at exit for a parent that stopped reading
    # them (it does when a shard fails), or the pool's shutdown would hang with the error unseen
    q.cancel_join_thread()
    _report = lambda index, n: q.put((index, n))  # noqa: E731


class _Ticks:
    """The bar's per-shard accounting: ticks never exceed a shard's items, late ones are ignored."""

    def __init__(self, bar: Progress, jobs: Sequence[ShardJob]):
        self.bar, self.left = bar, {j.index: j.samples for j in jobs}

    def advance(self, index: int, n: int) -> None:
        n = min(n, self.left.get(index, 0))
        if n > 0:
            self.left[index] -= n
            self.bar.update(n)

    def finish(self, job: ShardJob) -> None:
        self.advance(job.index, job.samples)
        self.left[job.index] = 0

    def drain(self, q) -> None:
        while True:
            try:
                self.advance(*q.get_nowait())
            except queue.Empty:
                return


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
    changed: list[str] = field(default_factory=list)  # settings that differ from the last run's

    def note(self) -> str:
        """For a tool's summary line: why nothing was kept, when settings changed."""
        return f"; {', '.join(self.changed)} changed, shards rewritten" if self.changed else ""


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def holds_exactly(url: str, keys: list[str], storage_options: dict | None) -> bool:
    """A complete shard: a readable tar whose sample keys are exactly ``keys``, in order."""
    stats = ReadStats()
    try:
        with storage.open_read(url, storage_options) as f:
            got = [k for k, _ in iter_samples(f, url, stats)]
    except (OSError, ValueError):
        return False
    return stats.corrupt_shards == 0 and got == keys


def clean_stale_temporaries(base: str, storage_options: dict | None) -> int:
    """Remove temporary files a killed writer left (hidden ``.name.tmp-*``); they are never read."""
    filesystem, path = storage.get_fs(base, storage_options)
    if storage.protocol(filesystem) in storage.OBJECT_STORES or not filesystem.exists(path):
        return 0
    stale = [p for p in filesystem.ls(path, detail=False)
             if posixpath.basename(p).startswith(".") and ".tmp-" in posixpath.basename(p)]
    for p in stale:
        filesystem.rm(p)
    return len(stale)


def settings_of(fmt: str, classes: list[str] | None, meta: dict | None) -> dict:
    """What decides a shard's bytes besides its keys, as JSON would give it back."""
    return json.loads(json.dumps({"format": fmt, "classes": classes, "meta": meta or {}}, sort_keys=True))


def settings_diff(old: dict | None, new: dict) -> list[str]:
    """Names of the settings that differ (``["unknown"]`` when the old ones are not recorded)."""
    if old is None:
        return ["unknown"]
    out = [k for k in ("format", "classes") if old.get(k) != new[k]]
    om, nm = old.get("meta") or {}, new["meta"]
    return out + [k for k in sorted(set(om) | set(nm)) if om.get(k) != nm.get(k)]


def _previous(base: str, storage_options: dict | None) -> tuple[dict | None, dict[str, ShardInfo], bool]:
    """(settings the existing shards were written with, the manifest's shards, pending file seen)."""
    try:
        m = read_manifest(base, storage_options)
        shards = {s.name: s for s in m.shards}
        recorded = settings_of(m.format, m.classes, m.meta)
    except ManifestError:
        shards, recorded = {}, None
    try:  # a killed run's settings are newer than any manifest it left
        return json.loads(storage.read_bytes(storage.join(base, PENDING_NAME), storage_options)), shards, True
    except FileNotFoundError:
        return recorded, shards, False
    except ValueError:  # an unreadable record vouches for nothing
        return None, shards, True


def _remove(url: str, storage_options: dict | None) -> None:
    filesystem, path = storage.get_fs(url, storage_options)
    if filesystem.exists(path):
        filesystem.rm(path)


def _run_job(produce: Callable, job: ShardJob, base: str, storage_options: dict | None) -> ShardInfo:
    global _job_index
    _job_index = job.index
    url = storage.join(base, job.name)
    with storage.atomic_writer(url, storage_options) as f:
        n = produce(f, job)
    if n != job.samples:
        raise RuntimeError(f"{url}: wrote {n} samples, planned {job.samples}")
    sha, size = sha256_url(url, storage_options)
    return ShardInfo(job.name, n, size, sha)


def write_shard_set(base: str, jobs: Sequence[ShardJob], produce: Callable, *, fmt: str,
                    classes: list[str] | None = None, meta: dict | None = None, workers: int = 1,
                    storage_options: dict | None = None, progress: bool = True,
                    unit: str = "img", created_by: str = "mqscale") -> SetResult:
    """``produce(stream, job) -> samples written`` must be a picklable top-level function; it
    may call ``progress_tick()`` per item written, so the bar shows items/s as they happen."""
    global _report
    storage.makedirs(base, storage_options)
    clean_stale_temporaries(base, storage_options)
    want = settings_of(fmt, classes, meta)
    recorded, previous, pending = _previous(base, storage_options)
    changed = settings_diff(recorded, want)
    if changed:  # nothing here was written with these settings: remove it before vouching anew
        _remove(manifest_url(base), storage_options)
        for name in sorted(set(previous) | {j.name for j in jobs}):
            _remove(storage.join(base, name), storage_options)
        previous = {}
    if changed or not pending:
        storage.write_bytes(storage.join(base, PENDING_NAME), json.dumps(want, sort_keys=True).encode(), storage_options)
    infos: dict[int, ShardInfo] = {}
    todo: list[ShardJob] = []
    bar = Progress(sum(j.samples for j in jobs), f"shards -> {base}", unit, progress)
    ticks = _Ticks(bar, jobs)
    for job in jobs:
        url = storage.join(base, job.name)
        if not changed and storage.exists(url, storage_options) and holds_exactly(url, job.keys, storage_options):
            sha, size = sha256_url(url, storage_options)
            old = previous.get(job.name)
            if old is None or old.sha256 == sha:
                infos[job.index] = ShardInfo(job.name, job.samples, size, sha)
                ticks.finish(job)
                continue
        todo.append(job)
    in_process = workers <= 1 or len(todo) <= 1 or base.startswith("memory://")
    if in_process:
        _report = ticks.advance
        try:
            for job in todo:
                infos[job.index] = _run_job(produce, job, base, storage_options)
                ticks.finish(job)
        finally:
            _report = None
    else:
        ctx = mp.get_context("spawn")  # no fsspec/s3fs state crosses a fork
        q = ctx.Queue()
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                                    initargs=(q,)) as pool:
            futures = {pool.submit(_run_job, produce, job, base, storage_options): job for job in todo}
            waiting = set(futures)
            try:
                while waiting:
                    done, waiting = cf.wait(waiting, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                    ticks.drain(q)
                    for fut in done:
                        job = futures[fut]
                        infos[job.index] = fut.result()
                        ticks.finish(job)
            except BaseException:  # one shard failed (or Ctrl-C): do not start the others
                pool.shutdown(wait=False, cancel_futures=True)
                raise
        q.close()
    rate = bar.close()
    manifest = Manifest(format=fmt, shards=[infos[j.index] for j in jobs], classes=classes,
                        meta=meta or {}, created_by=created_by)
    url = write_manifest(base, manifest, storage_options)
    _remove(storage.join(base, PENDING_NAME), storage_options)
    return SetResult(url, len(todo), len(jobs) - len(todo), manifest.total, rate,
                     [c for c in changed if c != "unknown"])
