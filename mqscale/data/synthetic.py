"""Synthetic token shards with known contents: random raster-ordered sequences whose first codes
encode their own sample id, so any row names the sample it came from. The tests use them to
check exactly-once delivery; the benchmarks use them to train without a tokenizer."""
from __future__ import annotations

import numpy as np

from mqscale.data.manifest import TOKENS_FORMAT
from mqscale.data.tokens import TokenMeta, TokenShardWriter
from mqscale.data.writer import ShardJob, shard_name, write_shard_set

META = TokenMeta(grid=8, codebook_size=50, seq_len=12, cond="class", n_classes=7, tokenizer_sha256="ab" * 32)


def sequence(meta: TokenMeta, gid: int):
    """Sequence number ``gid``: its codes encode the id, so any row names its own sample."""
    g = np.random.default_rng(gid)
    pos = np.sort(g.permutation(meta.n_positions)[: meta.seq_len])
    codes = g.integers(0, meta.codebook_size, meta.seq_len)
    codes[0], codes[1] = gid % meta.codebook_size, (gid // meta.codebook_size) % meta.codebook_size
    return codes, pos, int(gid % meta.n_classes)


def produce_tokens(f, job: ShardJob) -> int:
    meta, chunk, ids = job.items
    w = TokenShardWriter(f, meta, job.index, len(ids), chunk_size=chunk)
    for gid in ids:
        codes, pos, label = sequence(meta, gid)
        w.add(codes, pos, label, key=f"seq{gid}")
    return w.close()


def token_set(base: str, counts: list[int], meta: TokenMeta = META, chunk: int = 16,
              storage_options: dict | None = None):
    """Write ``len(counts)`` token shards (with ``counts[i]`` sequences each) and their manifest."""
    jobs, off = [], 0
    for i, n in enumerate(counts):
        ids = list(range(off, off + n))
        # a token shard's tar "samples" are its header and chunks
        keys = ["header"] + [f"{c:06d}" for c in range((n + chunk - 1) // chunk)]
        jobs.append(ShardJob(i, shard_name("tokens", i), keys, (meta, chunk, ids), n=n))
        off += n
    return write_shard_set(base, jobs, produce_tokens, fmt=TOKENS_FORMAT, meta=meta.to_dict(),
                           storage_options=storage_options, progress=False, unit="seq")
