"""The streaming loader: shards on any fsspec URL -> fixed-size batches, exactly once, resumable.

Each rank builds one ``StreamingLoader``. Its DataLoader workers each own one *slot* of the
partition (``mqscale.data.partition``); torch's DataLoader takes batches from workers round-robin, so
batch k of a rank is batch k // W of worker k % W. The loader counts the batches it has handed
out; that count and the epoch are the whole resume state. A fresh loader given that state
rotates which physical worker plays which slot, so the first batch it yields is exactly the
one the old loader would have yielded next, and each slot skips straight to its window.

Batches are dicts of tensors with a ``mask`` (False for holes: padding and skipped samples) and
``sample_id`` (global index in the manifest, -1 for holes). Token batches: ``codes``,
``positions`` [B, L] int64 and ``cond`` (labels [B] or text [B, T]) when conditioned. Image
batches: ``images`` uint8 [B, H, W, 3], ``labels``, ``captions``, ``keys``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from braceexpand import braceexpand
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mqscale.core import storage
from mqscale.core.errors import ManifestError
from mqscale.core.images import from_uint8
from mqscale.data.config import DataConfig
from mqscale.data.manifest import FORMATS, base_of, manifest_url, read_manifest
from mqscale.data.partition import Shard, batches_per_slot, resampled_segments, segments, shard_order, slot_range
from mqscale.data.reader import ReaderSpec, ShardReader, batches, shuffled_rows
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import HEADER_KEY, TokenMeta

STATE_VERSION = 1


@dataclass
class Source:
    """A resolved shard set: URLs with counts, the kind, and token metadata."""
    shards: list[Shard]
    kind: str
    meta: TokenMeta | None
    classes: list[str] | None = None

    @property
    def total(self) -> int:
        return sum(s.n for s in self.shards)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in self.shards:
            h.update(f"{s.url.rsplit('/', 1)[-1]}:{s.n};".encode())
        return h.hexdigest()[:16]


def expand(pattern: str) -> list[str]:
    return list(braceexpand(pattern))


def resolve_source(url: str, kind: str = "auto", storage_options: dict | None = None) -> Source:
    """A manifest (file or directory) or a brace pattern of shards."""
    storage.check_url(url)
    if "{" not in url:
        m = read_manifest(url, storage_options)
        base = base_of(manifest_url(url))
        if kind != "auto" and kind != m.kind:
            raise ManifestError(f"{url}: holds {m.kind} shards, the config asks for {kind}")
        shards, off = [], 0
        for info in m.shards:
            shards.append(Shard(storage.join(base, info.name), info.n, off))
            off += info.n
        meta = TokenMeta.from_dict(m.meta) if m.kind == "tokens" else None
        return Source(shards, m.kind, meta, m.classes)
    return _scan_pattern(expand(url), kind, storage_options)


def _scan_pattern(urls: list[str], kind: str, storage_options: dict | None) -> Source:
    """Without a manifest, count each shard (token shards: the header; images: a pass)."""
    shards, off, meta = [], 0, None
    for u in urls:
        stats = ReadStats()
        with storage.open_read(u, storage_options) as f:
            samples = iter_samples(f, u, stats)
            first = next(samples, None)
            k = "tokens" if first is not None and first[0] == HEADER_KEY else "images"
            if kind not in ("auto", k):
                raise ManifestError(f"{u}: holds {k} shards, the config asks for {kind}")
            kind = k
            if k == "tokens":
                head = json.loads(first[1]["json"])
                meta, n = TokenMeta.from_dict(head), int(head["n"])
            else:
                n = (first is not None) + sum(1 for _ in samples)
        shards.append(Shard(u, n, off))
        off += n
    return Source(shards, kind, meta)


class _SlotStream(IterableDataset):
    """What one worker yields: its slot's batches from a given point of the epoch."""

    def __init__(self, src: Source, cfg: DataConfig, rank: int, world: int, epoch: int, consumed: int):
        self.src, self.cfg, self.rank, self.world = src, cfg, rank, world
        self.epoch, self.consumed = epoch, consumed
        self.workers = max(1, cfg.num_workers)

    def __iter__(self):
        info = get_worker_info()
        W, B, S = self.workers, self.cfg.batch_size, self.cfg.shuffle_buffer
        logical = ((info.id if info else 0) + self.consumed) % W     # rotation: see module doc
        done = self.consumed // W + (1 if logical < self.consumed % W else 0)
        slot = self.rank * W + logical
        stats = ReadStats()
        reader = ShardReader(ReaderSpec(self.src.kind, self.src.meta, self.cfg.resolution,
                                        self.cfg.storage_options, self.cfg.on_shard_error,
                                        flip_key=(self.cfg.seed, self.epoch)), stats)
        start_row = done * B
        window_start = (start_row // S) * S
        common = dict(window=S, start_row=start_row, seed=self.cfg.seed, slot=slot, shuffle=self.cfg.shuffle)
        shards = self.src.shards
        if self.cfg.mode == "resampled":
            segs = resampled_segments(shards, self.cfg.seed, slot, window_start)
            rows_ = shuffled_rows(reader, segs, count=None, epoch=0, **common)
            n_batches = None
        else:
            total = self.src.total
            a, b = slot_range(total, self.world, self.rank, W, logical)
            order = shard_order(len(shards), self.cfg.seed, self.epoch, self.cfg.shuffle)
            segs = segments(shards, order, a + window_start, b)
            rows_ = shuffled_rows(reader, segs, count=b - a, epoch=self.epoch, **common) \
                if start_row < b - a else iter(())
            n_batches = batches_per_slot(total, self.world, W, B) - done
        pad = reader.holes(B)
        for i, batch in enumerate(batches(rows_, B, n_batches, pad, stats)):
            out = to_torch(batch, self.src)
            out["__worker__"] = logical
            out["__stats__"] = stats.as_dict()
            out["__events__"] = list(stats.events)
            yield out


def to_torch(b: dict[str, np.ndarray], src: Source) -> dict:
    out = {"mask": torch.from_numpy(b["valid"]), "sample_id": torch.from_numpy(b["sample_id"])}
    if src.kind == "tokens":
        out["codes"] = torch.from_numpy(b["codes"].astype(np.int64))
        out["positions"] = torch.from_numpy(b["positions"].astype(np.int64))
        if src.meta.cond == "class":
            out["cond"] = torch.from_numpy(b["labels"].astype(np.int64))
        elif src.meta.cond == "text":
            out["cond"] = torch.from_numpy(b["text"].astype(np.int64))
    else:
        out["images"] = torch.from_numpy(b["image"])
        out["labels"] = torch.from_numpy(b["label"])
        out["captions"] = list(b["caption"])
        out["keys"] = list(b["key"])
    return out


class StreamingLoader:
    """Per-rank iterable of batches with ``state_dict``/``load_state_dict`` for exact resume."""

    def __init__(self, url: str, cfg: DataConfig, rank: int = 0, world: int = 1,
                 pin_memory: bool | None = None, source: Source | None = None):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.cfg, self.rank, self.world = cfg, rank, world
        self.src = source or resolve_source(url, cfg.kind, cfg.storage_options)
        if self.src.total == 0:
            raise ManifestError(f"{url}: the shard set holds no samples")
        self.workers = max(1, cfg.num_workers)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.epoch, self.batches = 0, 0
        self._base = ReadStats().as_dict()
        self._live: dict[int, dict] = {}
        self.events: list[str] = []

    @property
    def kind(self) -> str:
        return self.src.kind

    @property
    def batches_per_epoch(self) -> int | None:
        if self.cfg.mode == "resampled":
            return None
        return self.workers * batches_per_slot(self.src.total, self.world, self.workers, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches = epoch, 0

    def __iter__(self) -> Iterator[dict]:
        per_epoch = self.batches_per_epoch
        if per_epoch is not None and self.batches >= per_epoch:
            self.set_epoch(self.epoch + 1)
        stream = _SlotStream(self.src, self.cfg, self.rank, self.world, self.epoch, self.batches)
        n = self.cfg.num_workers
        # its own generator: a DataLoader iterator otherwise draws from the global RNG, which would
        # make a resumed training run's random stream differ from an uninterrupted one
        dl = DataLoader(stream, batch_size=None, num_workers=n, pin_memory=self.pin_memory,
                        generator=torch.Generator().manual_seed(self.cfg.seed),
                        prefetch_factor=self.cfg.prefetch_factor if n else None,
                        multiprocessing_context=mp.get_context(self.cfg.worker_start) if n else None)
        it = iter(dl)
        try:
            for batch in it:
                worker = batch.pop("__worker__")
                if worker != self.batches % self.workers:
                    raise RuntimeError(f"batch {self.batches} came from worker {worker}, expected "
                                       f"{self.batches % self.workers}: DataLoader order changed")
                self._live[worker] = batch.pop("__stats__")
                self.events = (self.events + batch.pop("__events__"))[-20:]
                self.batches += 1
                yield batch
        finally:
            self._fold()
            shutdown = getattr(it, "_shutdown_workers", None)  # now, not whenever GC runs
            if shutdown is not None:
                try:
                    shutdown()
                except RuntimeError as e:  # a worker dying while being stopped: its batches are not needed
                    logging.getLogger("mqscale.data").debug("loader worker shutdown: %s", e)
        if per_epoch is not None and self.batches >= per_epoch:
            self.set_epoch(self.epoch + 1)

    def _fold(self) -> None:
        for s in self._live.values():
            for k, v in s.items():
                self._base[k] += v
        self._live = {}

    def stats(self) -> dict[str, int]:
        """Counters since the loader (or its restored state) began: for training metrics."""
        out = dict(self._base)
        for s in self._live.values():
            for k, v in s.items():
                out[k] += v
        return out

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batches": self.batches,
                "seed": self.cfg.seed, "mode": self.cfg.mode, "rank": self.rank, "world": self.world,
                "workers": self.workers, "batch_size": self.cfg.batch_size,
                "shuffle_buffer": self.cfg.shuffle_buffer, "shuffle": self.cfg.shuffle,
                "fingerprint": self.src.fingerprint(), "stats": self.stats()}

    def load_state_dict(self, sd: dict) -> None:
        mine = self.state_dict()
        for k in ("version", "seed", "mode", "rank", "world", "workers", "batch_size",
                  "shuffle_buffer", "shuffle", "fingerprint"):
            if sd.get(k) != mine[k]:
                raise ValueError(f"loader state has {k}={sd.get(k)!r}, this loader has {mine[k]!r}: "
                                 "an exact resume needs the same data, seed, world, workers and batch")
        self.epoch, self.batches = int(sd["epoch"]), int(sd["batches"])
        self._base = {k: int(sd.get("stats", {}).get(k, 0)) for k in self._base}
        self._live = {}


def iter_images(url: str, resolution: int, n: int, batch_size: int, storage_options: dict | None = None,
                labelled: bool = False) -> Iterator:
    """The first ``n`` decodable images of an image shard set, in shard order (so two models are
    measured on the same images), as float [-1, 1] batches [b, 3, H, W] on the CPU; with
    ``labelled``, (images, class labels [b]) pairs (-1 where a sample has no class)."""
    loader = StreamingLoader(url, DataConfig(kind="images", batch_size=batch_size, num_workers=0, shuffle=False,
                                             resolution=resolution, storage_options=storage_options or {}))
    left = n
    for batch in loader:
        keep = batch["mask"]
        x, y = from_uint8(batch["images"])[keep][:left], batch["labels"][keep][:left].long()
        if len(x):
            left -= len(x)
            yield (x, y) if labelled else x
        if left <= 0:
            return


__all__ = ["StreamingLoader", "Source", "resolve_source", "iter_images", "FORMATS"]
