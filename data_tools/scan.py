"""Shared by ``inspect`` and ``verify``: read every shard of a set, decode every sample, tally.

For token shards the tally adds the length histogram, codebook usage, the class histogram and
the mean kept-position (mask) map; for image shards the class histogram and image sizes. The
length histogram is measured from the stored rows (kept bits in each row's position bitmap), not
taken from the header, so rows whose length is not L show up there and in ``length_mismatches``.
"""
from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field

import numpy as np

from mqscale.core import storage
from mqscale.core.storage import sha256_url
from mqscale.data.images import decode_image_sample
from mqscale.data.loader import Source, resolve_source
from mqscale.data.manifest import read_manifest
from mqscale.data.tar import ReadStats, iter_samples
from mqscale.data.tokens import HEADER_KEY, decode_chunk, mask_map, npy_load


@dataclass
class Report:
    kind: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    bad: list[str] = field(default_factory=list)            # "shard[:key]: why"
    sha_mismatch: list[str] = field(default_factory=list)
    classes: collections.Counter = field(default_factory=collections.Counter)
    lengths: collections.Counter = field(default_factory=collections.Counter)   # every stored row
    length_mismatches: int = 0                                                  # rows of length != L
    sizes: collections.Counter = field(default_factory=collections.Counter)
    code_counts: np.ndarray | None = None
    mask_sum: np.ndarray | None = None
    grid: int = 0
    stats: ReadStats = field(default_factory=ReadStats)

    def mean_mask(self) -> np.ndarray:
        """[grid, grid]: how often each position is kept, over the valid sequences."""
        return (self.mask_sum / max(1, self.samples)).reshape(self.grid, self.grid)

    @property
    def ok(self) -> bool:
        return not self.bad and not self.sha_mismatch

    def summary(self, class_names: list[str] | None = None) -> dict:
        out = {"kind": self.kind, "shards": self.shards, "samples": self.samples, "bytes": self.bytes,
               "bytes_per_sample": round(self.bytes / max(1, self.samples), 1),
               "bad_samples": len(self.bad), "sha256_mismatches": len(self.sha_mismatch),
               "counters": self.stats.as_dict()}
        names = class_names or []
        out["class_histogram"] = {(names[k] if 0 <= k < len(names) else str(k)): v
                                  for k, v in sorted(self.classes.items())}
        if self.kind == "tokens":
            used = int((self.code_counts > 0).sum())
            out["length_histogram"] = {str(k): v for k, v in sorted(self.lengths.items())}
            out["length_mismatches"] = self.length_mismatches
            out["codebook_usage"] = {"used": used, "of": len(self.code_counts),
                                     "fraction": round(used / len(self.code_counts), 4),
                                     "top5": [int(i) for i in np.argsort(-self.code_counts)[:5]]}
            out["mean_mask_map"] = self.mean_mask().round(4).tolist()
        else:
            out["image_sizes"] = {f"{w}x{h}": n for (w, h), n in self.sizes.most_common(5)}
        return out


def scan(url: str, storage_options: dict | None = None, check_sha: bool = False) -> tuple[Report, Source]:
    src = resolve_source(url, "auto", storage_options)
    rep = Report(src.kind)
    shas = {}
    if check_sha and "{" not in url:
        shas = {s.name: s.sha256 for s in read_manifest(url, storage_options).shards}
    meta = src.meta
    if meta is not None:
        rep.code_counts = np.zeros(meta.codebook_size, np.int64)
        rep.mask_sum = np.zeros(meta.n_positions, np.int64)
        rep.grid = meta.grid
    for shard in src.shards:
        rep.shards += 1
        name = shard.url.rsplit("/", 1)[-1]
        try:
            if name in shas:
                sha, size = sha256_url(shard.url, storage_options)
                if sha != shas[name]:
                    rep.sha_mismatch.append(f"{name}: sha256 {sha[:12]}… != manifest {shas[name][:12]}…")
            with storage.open_read(shard.url, storage_options) as f:
                data_bytes = _scan_shard(f, shard, rep, meta)
        except OSError as e:
            rep.bad.append(f"{name}: unreadable ({e})")
            continue
        rep.bytes += data_bytes
    return rep, src


class _Counting:
    def __init__(self, f):
        self.f, self.n = f, 0

    def read(self, *a):
        b = self.f.read(*a)
        self.n += len(b)
        return b


def _scan_shard(f, shard, rep: Report, meta) -> int:
    name = shard.url.rsplit("/", 1)[-1]
    counting = _Counting(f)
    seen = 0
    corrupt_before = rep.stats.corrupt_shards
    for key, members in iter_samples(counting, name, rep.stats):
        if meta is not None:
            if key == HEADER_KEY or "codes.npy" not in members:
                continue
            block = decode_chunk(meta, members, rep.stats, f"{name}:{key}")
            if block is None:
                rep.bad.append(f"{name}:{key}: undecodable chunk")
                continue
            seen += len(block)
            for i in np.flatnonzero(~block.valid):
                rep.bad.append(f"{name}:{key}[{i}]: invalid sequence")
            ok = block.valid
            rep.samples += int(ok.sum())
            _count_lengths(rep, meta, members, block)
            rep.code_counts += np.bincount(block.codes[ok].ravel().astype(np.int64), minlength=meta.codebook_size)
            rep.mask_sum += np.bincount(block.positions[ok].ravel().astype(np.int64), minlength=meta.n_positions)
            if meta.cond == "class":
                rep.classes.update(block.labels[ok].tolist())
        else:
            seen += 1
            try:
                d = decode_image_sample(members, 0)
            except (ValueError, OSError, SyntaxError) as e:
                rep.bad.append(f"{name}:{key}: {type(e).__name__}: {e}")
                continue
            rep.samples += 1
            rep.classes[d["label"]] += 1
            h, w = d["image"].shape[:2]
            rep.sizes[(w, h)] += 1
    if rep.stats.corrupt_shards > corrupt_before:
        rep.bad.append(f"{name}: corrupt or truncated after {seen} samples")
    elif seen != shard.n:
        rep.bad.append(f"{name}: holds {seen} samples, manifest says {shard.n}")
    return counting.n


def row_lengths(meta, members: dict[str, bytes], block) -> np.ndarray:
    """Each stored row's length: its kept positions (bitmap bits, or int16 columns), or the width
    of its codes when that is not L (then the row is that long, whatever its positions say)."""
    n = len(block)
    codes, positions = block.codes, block.positions
    if codes.ndim != 2 or positions.ndim != 2:
        return np.zeros(n, np.int64)
    if codes.shape[1] != meta.seq_len:
        return np.full(n, codes.shape[1], np.int64)
    if "posbits.npy" in members:
        bits = npy_load(members["posbits.npy"])
        return np.unpackbits(bits, axis=1, count=meta.n_positions).sum(axis=1).astype(np.int64)
    return np.full(n, positions.shape[1], np.int64)


def _count_lengths(rep: Report, meta, members: dict[str, bytes], block) -> None:
    lengths = row_lengths(meta, members, block)
    values, counts = np.unique(lengths, return_counts=True)
    rep.lengths.update({int(v): int(c) for v, c in zip(values, counts)})
    rep.length_mismatches += int((lengths != meta.seq_len).sum())


def print_report(rep: Report, src: Source, as_json: bool, show_bad: int = 20) -> None:
    s = rep.summary(src.classes)
    if as_json:
        print(json.dumps(s, indent=1))
        return
    print(f"{s['kind']} shards: {s['shards']}, samples: {s['samples']:,}, bytes: {s['bytes']:,} "
          f"({s['bytes_per_sample']} per sample)")
    if s["class_histogram"]:
        print("classes: " + ", ".join(f"{k}={v}" for k, v in s["class_histogram"].items()))
    if rep.kind == "tokens":
        cu = s["codebook_usage"]
        mismatch = f" ({s['length_mismatches']} rows not of length {src.meta.seq_len})" \
            if s["length_mismatches"] else ""
        print(f"lengths: {s['length_histogram']}{mismatch}; codebook usage: {cu['used']}/{cu['of']} "
              f"({100 * cu['fraction']:.1f}%), most used {cu['top5']}")
        if rep.samples:
            print("mean kept-position map:")
            for line in mask_map(rep.mean_mask()):
                print("  " + line)
    else:
        print(f"image sizes: {s['image_sizes']}")
    c = {k: v for k, v in s["counters"].items() if v and k != "samples"}
    if c:
        print(f"counters: {c}")
    for line in rep.sha_mismatch + rep.bad[:show_bad]:
        print(f"BAD {line}")
    if len(rep.bad) > show_bad:
        print(f"... and {len(rep.bad) - show_bad} more bad samples")
