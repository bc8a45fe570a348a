"""The streaming loader: shards on any fsspec URL -> fixed-size batches, exactly once, resumable.

Each rank builds one ``StreamingLoader``. Its DataLoader workers each own one *slot* of the
partition (``mqscale.data.partition``); torch's DataLoader takes batches from workers round-robin, so
batch k of a rank is batch k // W of worker k % W. The loader counts the batches it has handed
out; that count and the epoch are the whole resume state. A fresh loader given that state
rotates which physical worker plays which slot, so the first batch it yields is exactly the
one the old loader would have yielded next, and each slot skips straight to its window.

A run continued on another number of ranks (``adopt``): every new rank gets, from all the old
ranks' states, the rows of the current epoch no old rank handed out, its share of them
(``partition.left_after``), so across the change each sample of the epoch is delivered exactly
once; the epoch after it is a plain one of the new world.

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
from mqscale.data.partition import (
    Piece,
    Shard,
    batches_per_slot,
    cut,
    epoch_pieces,
    left_after,
    pieces_rows,
    resampled_segments,
    segments,
    shard_order,
    slot_batches_done,
    slot_range,
)
from mqscale.data.reader import Block, ReaderSpec, ShardReader, batches, shuffled_rows, size
from mqscale.data.reader import rows as take_rows
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


@dataclass(frozen=True)
class Carry:
    """The rest of an epoch begun on another number of ranks: ``pieces`` of the stream rows of
    the slots that epoch began with (``world`` ranks x ``workers`` slots, shuffle ``window``)."""
    world: int
    workers: int
    window: int
    pieces: tuple[Piece, ...]

    def as_dict(self) -> dict:
        return {"world": self.world, "workers": self.workers, "window": self.window,
                "pieces": [list(p) for p in self.pieces]}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Carry | None":
        if not d:
            return None
        return cls(int(d["world"]), int(d["workers"]), int(d["window"]),
                   tuple((int(a), int(b), int(c)) for a, b, c in d["pieces"]))

    @property
    def rows(self) -> int:
        return pieces_rows(list(self.pieces))


class _SlotStream(IterableDataset):
    """What one worker yields: its slot's batches from a given point of the epoch."""

    def __init__(self, src: Source, cfg: DataConfig, rank: int, world: int, epoch: int, consumed: int,
                 carry: Carry | None = None):
        self.src, self.cfg, self.rank, self.world = src, cfg, rank, world
        self.epoch, self.consumed, self.carry = epoch, consumed, carry
        self.workers = max(1, cfg.num_workers)

    def __iter__(self):
        info = get_worker_info()
        W, B = self.workers, self.cfg.batch_size
        logical = ((info.id if info else 0) + self.consumed) % W     # rotation: see module doc
        done = slot_batches_done(self.consumed, W, logical)
        stats = ReadStats()
        reader = ShardReader(ReaderSpec(self.src.kind, self.src.meta, self.cfg.resolution,
                                        self.cfg.storage_options, self.cfg.on_shard_error,
                                        flip_key=(self.cfg.seed, self.epoch)), stats)
        if self.cfg.mode == "resampled":
            S = self.cfg.shuffle_buffer
            start_row = done * B
            slot = self.rank * W + logical
            segs = resampled_segments(self.src.shards, self.cfg.seed, slot, (start_row // S) * S)
            rows_ = shuffled_rows(reader, segs, count=None, epoch=0, window=S, start_row=start_row,
                                  seed=self.cfg.seed, slot=slot, shuffle=self.cfg.shuffle)
            n_batches = None
        else:
            # a plain epoch is the rest of itself: one piece per slot, each read whole
            carry = self.carry or Carry(self.world, W, self.cfg.shuffle_buffer,
                                        tuple(epoch_pieces(self.src.total, self.world, W)))
            total = carry.rows
            a, b = slot_range(total, self.world, self.rank, W, logical)
            mine = cut(list(carry.pieces), min(b, a + done * B), b)
            rows_ = (block for piece in mine for block in self._piece(reader, carry, piece))
            n_batches = batches_per_slot(total, self.world, W, B) - done
        pad = reader.holes(B)
        for i, batch in enumerate(batches(rows_, B, n_batches, pad, stats)):
            out = to_torch(batch, self.src)
            out["__worker__"] = logical
            out["__stats__"] = stats.as_dict()
            out["__events__"] = list(stats.events)
            yield out

    def _piece(self, reader: ShardReader, carry: Carry, piece: Piece) -> Iterator[Block]:
        """Stream rows [lo, hi) of slot ``slot`` of the partition ``carry`` describes."""
        slot, lo, hi = piece
        rank, worker = divmod(slot, carry.workers)
        a, b = slot_range(self.src.total, carry.world, rank, carry.workers, worker)
        S = carry.window
        order = shard_order(len(self.src.shards), self.cfg.seed, self.epoch, self.cfg.shuffle)
        segs = segments(self.src.shards, order, a + (lo // S) * S, b)
        stream = shuffled_rows(reader, segs, count=b - a, window=S, start_row=lo, seed=self.cfg.seed,
                               epoch=self.epoch, slot=slot, shuffle=self.cfg.shuffle)
        left = hi - lo
        for block in stream:
            if size(block) >= left:
                yield take_rows(block, slice(0, left))
                return
            left -= size(block)
            yield block


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
        self.carry: Carry | None = None   # the rest of an epoch begun on another world (see adopt)
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
        rows = self.carry.rows if self.carry is not None else self.src.total
        return self.workers * batches_per_slot(rows, self.world, self.workers, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batches, self.carry = epoch, 0, None

    def __iter__(self) -> Iterator[dict]:
        per_epoch = self.batches_per_epoch
        if per_epoch is not None and self.batches >= per_epoch:
            self.set_epoch(self.epoch + 1)
        stream = _SlotStream(self.src, self.cfg, self.rank, self.world, self.epoch, self.batches, self.carry)
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
                "fingerprint": self.src.fingerprint(), "stats": self.stats(),
                "carry": self.carry.as_dict() if self.carry is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        mine = self.state_dict()
        for k in ("version", "seed", "mode", "rank", "world", "workers", "batch_size",
                  "shuffle_buffer", "shuffle", "fingerprint"):
            if sd.get(k) != mine[k]:
                raise ValueError(f"loader state has {k}={sd.get(k)!r}, this loader has {mine[k]!r}: "
                                 "an exact resume needs the same data, seed, world, workers and batch")
        self.epoch, self.batches = int(sd["epoch"]), int(sd["batches"])
        self.carry = Carry.from_dict(sd.get("carry"))
        self._base = {k: int(sd.get("stats", {}).get(k, 0)) for k in self._base}
        self._live = {}

    def adopt(self, states: list[dict]) -> None:
        """Continue from the states of every rank of a run on another number of ranks (or
        workers, or batch size): this rank gets its share of the epoch's rows that none of them
        handed out; ValueError when the states are not one run's, all ranks in step, on this data.

        Counters carry over on rank 0 (they are summed over the ranks when logged). In
        ``resampled`` mode there is no epoch to keep: each new rank continues its own stream at
        the row the old ranks had reached."""
        if not states:
            raise ValueError("no loader states to continue from")
        first, mine = states[0], self.state_dict()
        for k in ("version", "seed", "mode", "shuffle", "fingerprint"):
            if first.get(k) != mine[k]:
                raise ValueError(f"loader state has {k}={first.get(k)!r}, this loader has {mine[k]!r}: a run "
                                 "continues on another world only on the same data, seed, mode and shuffle")
        same = ("version", "seed", "mode", "shuffle", "fingerprint", "epoch", "batches", "world", "workers",
                "batch_size", "shuffle_buffer", "carry")
        for r, sd in enumerate(states):
            if sd.get("rank") != r or sd.get("world") != len(states):
                raise ValueError(f"loader state {r} is rank {sd.get('rank')} of {sd.get('world')}, not {r} of "
                                 f"{len(states)}: every rank's state, in rank order, is needed")
            off = [k for k in same if sd.get(k) != first.get(k)]
            if off:
                raise ValueError(f"loader states of rank 0 and rank {r} differ in {', '.join(off)}: the ranks were "
                                 "not in step")
        totals = {k: sum(int(sd.get("stats", {}).get(k, 0)) for sd in states) for k in self._base}
        self._base = totals if self.rank == 0 else {k: 0 for k in self._base}
        self._live = {}
        epoch, done = int(first["epoch"]), int(first["batches"])
        old_batch, old_workers = int(first["batch_size"]), int(first["workers"])
        if self.cfg.mode == "resampled":
            self.epoch, self.carry = epoch, None
            self.batches = done * old_batch // self.cfg.batch_size
            return
        carry = Carry.from_dict(first.get("carry"))
        if carry is None and done == 0:    # nothing of the epoch given yet: a plain epoch of this world
            self.epoch, self.batches, self.carry = epoch, 0, None
            return
        if carry is None:
            carry = Carry(len(states), old_workers, int(first["shuffle_buffer"]),
                          tuple(epoch_pieces(self.src.total, len(states), old_workers)))
        left = left_after(list(carry.pieces), len(states), old_workers, old_batch, done)
        self.epoch, self.batches = (epoch, 0) if left else (epoch + 1, 0)
        self.carry = Carry(carry.world, carry.workers, carry.window, tuple(left)) if left else None


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
