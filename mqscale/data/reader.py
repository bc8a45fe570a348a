"""From shard segments to fixed-size batches of rows: decoding, holes, window shuffle.

Rows travel as column blocks (``dict[str, np.ndarray]``, equal first dimension) so token data is
handled a chunk at a time, never a Python object per sequence. Anything unusable (a corrupt
tail, an undecodable image, an invalid sequence, an unreadable shard under ``skip``) becomes a
*hole*: a zero row with ``valid=False`` that keeps its index, so batch boundaries, the exactly-once
accounting and resume positions never depend on what went wrong.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from mqscale.core import storage
from mqscale.core.errors import ShardReadError, StorageError
from mqscale.data.images import IMAGE_EXTS, TEXT_EXTS, decode_image_sample
from mqscale.data.partition import Shard, window_permutation
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import HEADER_KEY, TokenMeta, decode_chunk

Block = dict[str, np.ndarray]


def concat(blocks: list[Block]) -> Block:
    if len(blocks) == 1:
        return blocks[0]
    return {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}


def rows(block: Block, idx) -> Block:
    return {k: v[idx] for k, v in block.items()}


def size(block: Block) -> int:
    return len(block["valid"])


@dataclass
class ReaderSpec:
    kind: str                       # "tokens" | "images"
    meta: TokenMeta | None = None   # tokens
    resolution: int = 256           # images
    storage_options: dict | None = None
    on_shard_error: str = "fail"    # fail | skip
    block_rows: int = 64            # images decoded per block
    flip_key: tuple[int, int] = (0, 0)  # (seed, epoch): which twin a flip-augmented row yields


class ShardReader:
    def __init__(self, spec: ReaderSpec, stats: ReadStats):
        self.spec, self.stats = spec, stats

    def holes(self, n: int, first_id: int = -1) -> Block:
        s = self.spec
        if s.kind == "tokens":
            m = s.meta
            b = {"codes": np.zeros((n, m.seq_len), np.int16), "positions": np.zeros((n, m.seq_len), np.int16),
                 "labels": np.zeros(n, np.int32)}
            if m.cond == "text":
                b["text"] = np.zeros((n, m.text_len), np.int32)
        else:
            r = s.resolution
            b = {"image": np.zeros((n, r, r, 3), np.uint8), "label": np.full(n, -1, np.int64),
                 "caption": np.full(n, "", dtype=object), "key": np.full(n, "", dtype=object)}
        b["valid"] = np.zeros(n, bool)
        b["sample_id"] = np.full(n, -1, np.int64)
        return b

    def read(self, shard: Shard, start: int, end: int) -> Iterator[Block]:
        """Blocks covering exactly rows [start, end) of ``shard``."""
        done = start
        try:
            f = storage.open_read(shard.url, self.spec.storage_options)
        except (OSError, ValueError) as e:
            self._unreadable(shard, e)
            yield self.holes(end - start)
            return
        with f:
            gen = self._tokens(f, shard, start, end) if self.spec.kind == "tokens" else \
                self._images(f, shard, start, end)
            clipped = False
            try:
                for first, block in gen:
                    # Rows are placed by position: a block may only add rows in [done, end).
                    # Anything else (a block overlapping rows already given) is a corrupt shard,
                    # clipped so no row is given twice and the plan's row count still holds.
                    lo, hi = max(first, done), min(first + size(block), end)
                    if (lo, hi) != (first, first + size(block)):
                        if not clipped:
                            self.stats.corrupt_shards += 1
                            self.stats.warn(f"{shard.url}: rows [{first}, {first + size(block)}) overlap "
                                            f"rows already read or run past {end}; clipped")
                        clipped = True
                        if lo >= hi:
                            continue
                        block, first = rows(block, slice(lo - first, hi - first)), lo
                    if first > done:  # rows the shard skipped over (a bad chunk)
                        yield self.holes(first - done)
                    yield block
                    done = first + size(block)
            except OSError as e:  # a read that failed mid-shard (a StorageError naming the URL)
                self._unreadable(shard, e)
        if done < end:
            self.stats.missing_samples += end - done
            self.stats.warn(f"{shard.url}: {end - done} promised samples missing")
            yield self.holes(end - done)

    def _unreadable(self, shard: Shard, e: Exception) -> None:
        why = str(e).removeprefix(f"{shard.url}: ") if isinstance(e, StorageError) \
            else f"{type(e).__name__}: {e}"
        if self.spec.on_shard_error == "fail":
            raise ShardReadError(f"shard {shard.url}: cannot be read ({why})") from None
        self.stats.unreadable_shards += 1
        self.stats.warn(f"{shard.url}: unreadable, skipped ({why})")

    def _tokens(self, f, shard: Shard, start: int, end: int) -> Iterator[tuple[int, Block]]:
        meta, chunk, expect = self.spec.meta, 0, 0
        for key, members in iter_samples(f, shard.url, self.stats):
            if key == HEADER_KEY:
                chunk = self._header_chunk_size(members, shard)
                if not chunk:
                    return
                continue
            self._count_unknown(members, {"codes.npy", "posbits.npy", "positions.npy", "labels.npy",
                                          "text.npy", "keys.txt", "captions.json", "codes_flip.npy",
                                          "posbits_flip.npy"})
            if not chunk or not key.isdigit():
                self.stats.corrupt_shards += 1
                self.stats.warn(f"{shard.url}: member {key!r} before a header or not a chunk; shard skipped")
                return
            if int(key) != expect:  # a writer numbers chunks 0, 1, 2, ...: a reorder or gap is damage
                self.stats.corrupt_shards += 1
                self.stats.warn(f"{shard.url}: chunk {key!r} where chunk {expect:06d} belongs "
                                "(chunks out of order or missing); rest of shard skipped")
                return
            expect += 1
            pos = int(key) * chunk
            if pos >= end:
                return
            block = decode_chunk(meta, members, self.stats, f"{shard.url}:{key}")
            if block is None:
                continue  # its rows become holes: the next chunk's rows are placed by its own key
            if len(block) > chunk:
                self.stats.undecodable += 1
                self.stats.note(f"{shard.url}:{key}: {len(block)} rows in a chunk of {chunk}")
                continue
            lo, hi = max(start, pos), min(end, pos + len(block))
            if lo < hi:
                sel = slice(lo - pos, hi - pos)
                codes, positions = block.codes[sel], block.positions[sel]
                if meta.flip:  # one twin per row and epoch, a pure function of (seed, epoch, sample)
                    ids = shard.offset + np.arange(lo, hi)
                    use = flip_choice(ids, *self.spec.flip_key)[:, None]
                    codes = np.where(use, block.codes_flip[sel], codes)
                    positions = np.where(use, block.positions_flip[sel], positions)
                b = {"codes": codes, "positions": positions, "labels": block.labels[sel]}
                if meta.cond == "text":
                    b["text"] = block.text[sel]
                b["valid"] = block.valid[sel]
                b["sample_id"] = np.where(b["valid"], shard.offset + np.arange(lo, hi), -1)
                yield lo, b

    def _header_chunk_size(self, members: dict, shard: Shard) -> int:
        """The shard's chunk size, or 0 when its header is bad or from other token settings."""
        why = ""
        try:
            head = json.loads(members.get("json", b"{}"))
            diff = TokenMeta.from_dict(head).agrees_with(self.spec.meta)
            chunk = int(head["chunk_size"])
            if diff:
                why = f"header differs from the manifest in {diff}"
            elif chunk < 1:
                why = f"chunk_size {chunk}"
        except (ValueError, TypeError, KeyError) as e:
            why, chunk = f"bad header ({type(e).__name__}: {e})", 0
        if why:
            self.stats.corrupt_shards += 1
            self.stats.warn(f"{shard.url}: {why}; shard skipped")
            return 0
        return chunk

    def _images(self, f, shard: Shard, start: int, end: int) -> Iterator[tuple[int, Block]]:
        r = self.spec.resolution
        buf: list[dict] = []
        first = start
        for i, (key, members) in enumerate(iter_samples(f, shard.url, self.stats)):
            if i >= end:
                break
            if i < start:
                continue
            self._count_unknown(members, set(IMAGE_EXTS) | TEXT_EXTS)
            try:
                d = decode_image_sample(members, r)
                if d["image"].shape != (r, r, 3):
                    raise ValueError(f"image is {d['image'].shape}, not {r}x{r} RGB")
                d.update(valid=True, sample_id=shard.offset + i, key=key)
            except (ValueError, OSError, SyntaxError) as e:  # PIL raises all three (bombs: ValueError)
                self.stats.undecodable += 1
                self.stats.note(f"{shard.url}:{key}: undecodable ({type(e).__name__}: {e})")
                d = None
            buf.append(d)
            if len(buf) == self.spec.block_rows:
                yield first, self._image_block(buf)
                first, buf = first + len(buf), []
        if buf:
            yield first, self._image_block(buf)

    def _image_block(self, samples: list[dict | None]) -> Block:
        b = self.holes(len(samples))
        for j, d in enumerate(samples):
            if d is not None:
                b["image"][j] = d["image"]
                b["label"][j], b["caption"][j], b["key"][j] = d["label"], d["caption"], d["key"]
                b["valid"][j], b["sample_id"][j] = True, d["sample_id"]
        return b

    def _count_unknown(self, members: dict, known: set[str]) -> None:
        extra = [e for e in members if e not in known]
        if extra:
            self.stats.unknown_members += len(extra)


def flip_choice(sample_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """A fair coin per (seed, epoch, sample id), independent of reading order."""
    salt = ((seed * 1_000_003 + epoch * 7919 + 1) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = sample_ids.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x ^= np.uint64(salt)
    x ^= x >> np.uint64(31)
    x *= np.uint64(0x94D049BB133111EB)
    return ((x >> np.uint64(33)) & np.uint64(1)).astype(bool)


class RowQueue:
    """Blocks waiting to be cut into rows; popping k rows copies only those k rows."""

    def __init__(self):
        self.blocks: collections.deque[Block] = collections.deque()
        self.n = 0

    def push(self, block: Block) -> None:
        if size(block):
            self.blocks.append(block)
            self.n += size(block)

    def pop(self, k: int) -> Block:
        parts = []
        while k:
            b = self.blocks[0]
            if size(b) <= k:
                parts.append(self.blocks.popleft())
                k -= size(b)
            else:
                parts.append(rows(b, slice(0, k)))
                self.blocks[0] = rows(b, slice(k, None))
                k = 0
        self.n -= sum(size(p) for p in parts)
        return concat(parts)


def shuffled_rows(reader: ShardReader, segments: Iterator[tuple[Shard, int, int]], *, count: int | None,
                  window: int, start_row: int, seed: int, epoch: int, slot: int,
                  shuffle: bool) -> Iterator[Block]:
    """The slot's rows from ``start_row`` on, window-shuffled. ``segments`` begin at the start of
    window ``start_row // window``; ``count`` is the slot's real rows (None = endless)."""
    blocks = (b for seg in segments for b in reader.read(*seg))
    queue = RowQueue()
    j = start_row // window
    while count is None or j * window < count:
        lo = j * window
        want = window if count is None else min(window, count - lo)
        while queue.n < want:
            b = next(blocks, None)
            if b is None:
                raise RuntimeError("shard plan ended before the slot's rows did")  # a plan bug
            queue.push(b)
        perm = window_permutation(seed, epoch, slot, j, want, shuffle)
        if j == start_row // window and start_row > lo:
            perm = perm[start_row - lo:]
        yield rows(queue.pop(want), perm)
        j += 1


def batches(stream: Iterator[Block], batch: int, n_batches: int | None, pad: Block,
            stats: ReadStats) -> Iterator[Block]:
    """Cut a row stream into ``n_batches`` batches of ``batch`` rows, padding the end with holes."""
    queue = RowQueue()
    made = 0
    while n_batches is None or made < n_batches:
        while queue.n < batch:
            b = next(stream, None)
            if b is None:
                fill = batch - queue.n
                stats.padding += fill
                queue.push(rows(pad, slice(0, fill)))
                break
            queue.push(b)
        out = queue.pop(batch)
        stats.samples += int(out["valid"].sum())
        made += 1
        yield out
