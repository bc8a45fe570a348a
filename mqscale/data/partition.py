"""Which sample each (rank, worker) reads, in which order: pure functions of the shard list.

Why a partition instead of webdataset's shard splitting: splitting whole shards across ranks
leaves ranks with unequal counts, and the rank that runs dry first hangs the others at the next
collective (webdataset issues #188, #225). Here an epoch's samples (shards in a seeded order,
concatenated) are cut into equal contiguous ranges, one per rank, then one per DataLoader worker
("slot"). Every slot yields the same number of fixed-size batches; the few trailing entries a
short slot lacks are masked holes. So every sample is delivered exactly once per epoch, and all
ranks end together.

Within a slot, rows are shuffled by windows: window j (rows [jS, (j+1)S)) gets its own seeded
permutation. Batch k is rows [kB, (k+1)B) of the shuffled stream, so resuming at batch k needs
only window floor(kB/S) onward: no replay of the epoch.

Resharding an epoch (a run continued on another number of ranks): the rows every rank has not
yet handed out are exactly known from the ranks' batch counts. They are kept as *pieces*, runs
``(slot, lo, hi)`` of the stream rows of the slots the epoch began with, and the new ranks split
the pieces' concatenation the way a fresh epoch splits the epoch's rows: equal contiguous ranges
per rank, then per worker, equal batch counts, holes at the ends. Once that rest is done, the
next epoch is a plain one of the new world. A second change of world mid-way cuts the pieces
again, so the rows still refer to the slots the epoch began with.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np


@dataclass(frozen=True)
class Shard:
    url: str
    n: int        # samples the manifest promises
    offset: int   # global id of its first sample (manifest order)


def rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) & 0xFFFFFFFF for k in key])


def shard_order(n_shards: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    return rng(seed, epoch, 0xA5).permutation(n_shards) if shuffle else np.arange(n_shards)


def split(total: int, parts: int, i: int) -> tuple[int, int]:
    """The i-th of ``parts`` contiguous ranges of [0, total), sizes differing by at most one."""
    return total * i // parts, total * (i + 1) // parts


def slot_range(total: int, world: int, rank: int, workers: int, worker: int) -> tuple[int, int]:
    a, b = split(total, world, rank)
    wa, wb = split(b - a, workers, worker)
    return a + wa, a + wb


def batches_per_slot(total: int, world: int, workers: int, batch: int) -> int:
    """The same for every slot: enough batches for the largest slot."""
    largest = math.ceil(math.ceil(total / world) / workers)
    return math.ceil(largest / batch)


def segments(shards: list[Shard], order: np.ndarray, start: int, end: int) -> Iterator[tuple[Shard, int, int]]:
    """(shard, first, last) pieces covering rows [start, end) of the ordered concatenation."""
    pos = 0
    for i in order:
        s = shards[int(i)]
        lo, hi = max(start, pos), min(end, pos + s.n)
        if lo < hi:
            yield s, lo - pos, hi - pos
        pos += s.n
        if pos >= end:
            return


def resampled_segments(shards: list[Shard], seed: int, slot: int, start: int) -> Iterator[tuple[Shard, int, int]]:
    """An endless stream of whole shards drawn with replacement, from stream row ``start``."""
    g = rng(seed, slot, 0x5A)
    pos = 0
    while True:
        s = shards[int(g.integers(len(shards)))]
        if pos + s.n > start:
            yield s, max(0, start - pos), s.n
        pos += s.n


def window_permutation(seed: int, epoch: int, slot: int, window: int, size: int, shuffle: bool) -> np.ndarray:
    return rng(seed, epoch, slot, window).permutation(size) if shuffle else np.arange(size)


Piece = tuple[int, int, int]   # (slot of the epoch's first partition, first stream row, end stream row)


def slot_batches_done(batches: int, workers: int, worker: int) -> int:
    """Batches slot ``worker`` of a rank has given once the rank has handed out ``batches``
    (DataLoader takes them from the workers round-robin)."""
    return batches // workers + (1 if worker < batches % workers else 0)


def epoch_pieces(total: int, world: int, workers: int) -> list[Piece]:
    """A whole epoch of ``total`` rows on ``world`` ranks x ``workers`` slots, as pieces: each
    slot's stream from its first row to its last, in slot order (the order of their ranges)."""
    out = []
    for r in range(world):
        for w in range(workers):
            a, b = slot_range(total, world, r, workers, w)
            if b > a:
                out.append((r * workers + w, 0, b - a))
    return out


def pieces_rows(pieces: list[Piece]) -> int:
    return sum(hi - lo for _, lo, hi in pieces)


def cut(pieces: list[Piece], start: int, end: int) -> list[Piece]:
    """Rows [start, end) of the pieces' concatenation, as pieces."""
    out, pos = [], 0
    for slot, lo, hi in pieces:
        n = hi - lo
        a, b = max(start, pos), min(end, pos + n)
        if a < b:
            out.append((slot, lo + a - pos, lo + b - pos))
        pos += n
        if pos >= end:
            break
    return out


def _merged(pieces: list[Piece]) -> list[Piece]:
    out: list[Piece] = []
    for p in pieces:
        if out and out[-1][0] == p[0] and out[-1][2] == p[1]:
            out[-1] = (p[0], out[-1][1], p[2])
        else:
            out.append(p)
    return out


def left_after(pieces: list[Piece], world: int, workers: int, batch: int, batches: int) -> list[Piece]:
    """What is left of an epoch whose rows are ``pieces`` (split over ``world`` ranks x
    ``workers`` slots, ``batch`` rows a batch) once every rank has handed out ``batches``
    batches: the rows no rank has yet given, as pieces, in slot order."""
    total = pieces_rows(pieces)
    out: list[Piece] = []
    for r in range(world):
        for w in range(workers):
            a, b = slot_range(total, world, r, workers, w)
            start = min(b, a + slot_batches_done(batches, workers, w) * batch)
            out += cut(pieces, start, b)
    return _merged(out)
