"""Token shards: a compact WebDataset layout for masked code/position sequences.

Why this layout: a per-sample WebDataset spends ~7 KB of tar headers and padding on a 1 KB
sequence. Here one tar member holds a chunk of N sequences as an ``.npy`` array, and positions,
which are unique and ascending, are stored as a bitmap of the grid (G/8 bytes: 128 B for a 32x32
grid instead of 512 B of int16), so a shard costs about 0.66 of the raw 4 bytes per token.
It is still a plain tar in the WebDataset layout: ``tar -t`` lists it and ``webdataset`` reads it
(each chunk is one "sample" with members ``codes.npy``, ``posbits.npy``, ...).

    header.json                     format, grid, codebook, L, condition, tokenizer checksum
    000000.codes.npy                int16 [N, L]   (int32 when K > 32767)
    000000.posbits.npy              uint8 [N, ceil(G/8)], bit p set = position p kept
    000000.labels.npy               int32 [N]      (class condition)
    000000.text.npy                 int32 [N, T]   (text condition)
    000000.codes_flip.npy           the mirrored image's codes and positions (flip augmentation)
    000000.posbits_flip.npy
    000000.keys.txt                 N source keys, one per line (optional)
    000000.captions.json            N source captions, a JSON list (optional; carried over)
    000001.codes.npy ...

Readers also accept ``positions.npy`` (int16 [N, L]). npy is always read with
``allow_pickle=False``; a row that fails validation is marked invalid, never trusted.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import asdict, dataclass, fields
from typing import IO

import numpy as np

from mqscale.data.manifest import TOKENS_FORMAT
from mqscale.data.tar import ReadStats, TarWriter

HEADER_KEY = "header"


@dataclass(frozen=True)
class TokenMeta:
    grid: int
    codebook_size: int
    seq_len: int
    cond: str = "none"             # none | class | text
    n_classes: int = 0
    text_len: int = 0
    text_vocab_size: int = 0
    text_tokenizer: str = ""       # identity of the text tokenizer (name + checksum)
    tokenizer_sha256: str = ""     # checksum of the MQ-VAE that produced the codes
    flip: bool = False             # each row also holds its mirrored image's sequence

    @property
    def n_positions(self) -> int:
        return self.grid * self.grid

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenMeta":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def agrees_with(self, other: "TokenMeta") -> list[str]:
        """Names of the fields that differ (what makes two token sets incompatible)."""
        return [f.name for f in fields(self) if getattr(self, f.name) != getattr(other, f.name)]


@dataclass
class TokenBlock:
    """Decoded rows of a chunk. Invalid rows keep their slot (valid=False) so indices stay fixed."""
    codes: np.ndarray        # [n, L] int16/int32
    positions: np.ndarray    # [n, L] int16
    labels: np.ndarray       # [n] int32 (zeros without a class condition)
    text: np.ndarray | None  # [n, T] int32
    valid: np.ndarray        # [n] bool
    codes_flip: np.ndarray | None = None
    positions_flip: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.valid)


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """An integer array from npy bytes, never unpickled. The header is checked against the bytes
    that follow it before anything is allocated: a damaged header can claim any shape (say
    (4e9, 256)), and numpy allocates what it claims first, a MemoryError that kills a worker."""
    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
    except (ValueError, TypeError, SyntaxError) as e:  # read_magic/read_header raise these
        raise ValueError(f"not an npy array ({e})") from None
    if dtype.kind not in "iub":
        raise ValueError(f"npy dtype {dtype} is not an integer array")
    need, have = math.prod(shape) * dtype.itemsize, len(data) - f.tell()
    if need != have:
        raise ValueError(f"npy header claims shape {shape} of {dtype} ({need:,} bytes), "
                         f"the member holds {have:,}")
    return np.load(io.BytesIO(data), allow_pickle=False)


def code_dtype(codebook_size: int) -> np.dtype:
    return np.dtype(np.int16 if codebook_size <= np.iinfo(np.int16).max + 1 else np.int32)


def positions_to_bits(positions: np.ndarray, n_positions: int) -> np.ndarray:
    rows = np.zeros((positions.shape[0], n_positions), dtype=bool)
    np.put_along_axis(rows, positions.astype(np.int64), True, axis=1)
    return np.packbits(rows, axis=1)


def bits_to_positions(bits: np.ndarray, n_positions: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(positions [n, L] int16, ok [n]) from a bitmap; rows without exactly L bits are not ok."""
    grid = np.unpackbits(bits, axis=1, count=n_positions).view(bool)
    ok = grid.sum(axis=1) == seq_len
    out = np.zeros((bits.shape[0], seq_len), dtype=np.int16)
    if ok.any():
        _, cols = np.nonzero(grid[ok])
        out[ok] = cols.reshape(-1, seq_len)
    return out, ok


def check_sequences(meta: TokenMeta, codes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Per-row validity: codes in range; positions in range, unique and ascending; lengths L."""
    L, K, G = meta.seq_len, meta.codebook_size, meta.n_positions
    if codes.ndim != 2 or codes.shape[1] != L or positions.shape != codes.shape:
        return np.zeros(len(codes), dtype=bool)
    ok = ((codes >= 0) & (codes < K)).all(axis=1)
    ok &= ((positions >= 0) & (positions < G)).all(axis=1)
    ok &= (np.diff(positions.astype(np.int32), axis=1) > 0).all(axis=1)
    return ok


def encode_chunk(meta: TokenMeta, codes, positions, labels=None, text=None,
                 keys: list[str] | None = None, codes_flip=None, positions_flip=None,
                 captions: list[str] | None = None) -> list[tuple[str, bytes]]:
    """Members (ext, bytes) of one chunk; refuses sequences that a reader would reject."""
    out = []
    pairs = [("", codes, positions)] + ([("_flip", codes_flip, positions_flip)] if meta.flip else [])
    for suffix, c, p in pairs:
        c, p = np.asarray(c), np.asarray(p)
        bad = ~check_sequences(meta, c, p)
        if bad.any():
            raise ValueError(f"{int(bad.sum())} sequences{suffix} are invalid for {meta} (first row {int(np.argmax(bad))})")
        out += [(f"codes{suffix}.npy", npy_bytes(c.astype(code_dtype(meta.codebook_size)))),
                (f"posbits{suffix}.npy", npy_bytes(positions_to_bits(p, meta.n_positions)))]
    if meta.cond == "class":
        out.append(("labels.npy", npy_bytes(np.asarray(labels, dtype=np.int32))))
    if meta.cond == "text":
        out.append(("text.npy", npy_bytes(np.asarray(text, dtype=np.int32))))
    if keys is not None:
        out.append(("keys.txt", "\n".join(keys).encode()))
    if captions is not None:
        out.append(("captions.json", json.dumps(list(captions), ensure_ascii=False).encode()))
    return out


def decode_chunk(meta: TokenMeta, members: dict[str, bytes], stats: ReadStats, where: str) -> TokenBlock | None:
    """Decode one chunk; None when the chunk itself is unusable (counted by the caller's size)."""
    try:
        codes = npy_load(members["codes.npy"])
        n = len(codes)
        if "posbits.npy" in members:
            positions, ok = bits_to_positions(npy_load(members["posbits.npy"]), meta.n_positions, meta.seq_len)
        else:
            positions = npy_load(members["positions.npy"])
            ok = np.ones(n, dtype=bool)
        labels = (npy_load(members["labels.npy"]).astype(np.int32) if meta.cond == "class"
                  else np.zeros(n, dtype=np.int32))
        text = npy_load(members["text.npy"]).astype(np.int32) if meta.cond == "text" else None
        codes_f = positions_f = None
        if meta.flip:
            codes_f = npy_load(members["codes_flip.npy"])
            positions_f, ok_f = bits_to_positions(npy_load(members["posbits_flip.npy"]), meta.n_positions,
                                                  meta.seq_len)
            if len(codes_f) != n:
                raise ValueError(f"flip arrays hold {len(codes_f)} rows, not {n}")
            ok = ok & ok_f & check_sequences(meta, codes_f, positions_f)
    except (KeyError, ValueError, OSError) as e:
        stats.undecodable += 1
        stats.note(f"{where}: undecodable chunk ({type(e).__name__}: {e})")
        return None
    if len(positions) != n or len(labels) != n or (text is not None and text.shape != (n, meta.text_len)):
        stats.undecodable += 1
        stats.note(f"{where}: chunk arrays disagree in length")
        return None
    ok &= check_sequences(meta, codes, positions)
    if meta.cond == "class" and meta.n_classes:
        ok &= (labels >= 0) & (labels < meta.n_classes)
    if text is not None:
        ok &= (text >= 0).all(axis=1) & ((text < meta.text_vocab_size).all(axis=1) if meta.text_vocab_size else True)
    if not ok.all():
        stats.invalid_samples += int((~ok).sum())
        stats.note(f"{where}: {int((~ok).sum())} invalid sequences skipped")
    return TokenBlock(codes, positions, labels, text, ok, codes_f, positions_f)


def header_bytes(meta: TokenMeta, shard_index: int, n: int, chunk_size: int, extra: dict | None = None) -> bytes:
    """Chunk i holds rows [i * chunk_size, ...): a reader places rows without trusting a chunk.
    ``extra`` records provenance (the input shard and its checksum, the run's options)."""
    return json.dumps({"format": TOKENS_FORMAT, "shard": shard_index, "n": n, "chunk_size": chunk_size,
                       **meta.to_dict(), **(extra or {})}, sort_keys=True).encode()


class TokenShardWriter:
    """Stream sequences into one token shard (a tar), ``chunk_size`` sequences per member."""

    def __init__(self, f: IO[bytes], meta: TokenMeta, shard_index: int, n: int, chunk_size: int = 256,
                 extra_header: dict | None = None):
        self.meta, self.chunk_size, self.expected = meta, chunk_size, n
        self.tar = TarWriter(f)
        self.tar.add(f"{HEADER_KEY}.json", header_bytes(meta, shard_index, n, chunk_size, extra_header))
        self.buf: dict[str, list] = {k: [] for k in ("codes", "positions", "labels", "text", "keys",
                                                    "codes_flip", "positions_flip", "captions")}
        self.written = self.chunks = 0

    def add(self, codes, positions, label=None, text=None, key: str | None = None,
            codes_flip=None, positions_flip=None, caption: str | None = None) -> None:
        for name, v in (("codes", codes), ("positions", positions), ("labels", label), ("text", text), ("keys", key),
                        ("codes_flip", codes_flip), ("positions_flip", positions_flip), ("captions", caption)):
            self.buf[name].append(v)
        if len(self.buf["codes"]) >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        b = self.buf
        if not b["codes"]:
            return
        keys = b["keys"] if all(k is not None for k in b["keys"]) else None
        captions = b["captions"] if any(c for c in b["captions"]) else None
        flip = self.meta.flip
        members = encode_chunk(self.meta, np.stack(b["codes"]), np.stack(b["positions"]),
                               b["labels"] if self.meta.cond == "class" else None,
                               np.stack(b["text"]) if self.meta.cond == "text" else None, keys,
                               np.stack(b["codes_flip"]) if flip else None,
                               np.stack(b["positions_flip"]) if flip else None, captions)
        for ext, data in members:
            self.tar.add(f"{self.chunks:06d}.{ext}", data)
        self.written += len(b["codes"])
        self.chunks += 1
        self.buf = {k: [] for k in b}

    def close(self) -> int:
        self._flush()
        if self.written != self.expected:
            raise ValueError(f"token shard got {self.written} sequences, header says {self.expected}")
        self.tar.close()
        return self.written


def mask_map(mask_mean: np.ndarray) -> list[str]:
    """ASCII heat map of a mean kept-position map [g, g] (denser character = kept more often)."""
    ramp = " .:-=+*#%@"
    hi = float(mask_mean.max()) or 1.0
    return ["".join(ramp[min(9, int(v / hi * 9.999))] for v in row) for row in mask_mean]
