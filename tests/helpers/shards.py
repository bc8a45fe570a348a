"""Shards to read back, take apart, damage and poison; image folders to shard."""
from __future__ import annotations

import io
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from mqscale.data.config import DataConfig


def loader_cfg(**kw) -> DataConfig:
    """A small in-process loader config (no workers), seeded."""
    base = dict(batch_size=8, num_workers=0, shuffle_buffer=16, seed=1)
    base.update(kw)
    return DataConfig(**base)


def valid_ids(loader):
    return [i for b in loader for i in b["sample_id"][b["mask"]].tolist()]


def rows_before_cut(data: bytes, cut: int, chunk: int = 16) -> int:
    """Rows of a token shard that survive a cut at byte ``cut``, by the reader's rule: a sample
    (header or chunk) is delivered once the next sample's first member has been read whole; the
    last one needs the end-of-archive marker, which a cut shard lacks."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = tf.getmembers()
    first_end: dict[str, int] = {}
    for m in members:
        first_end.setdefault(m.name.split(".")[0], m.offset_data + m.size)
    keys = list(first_end)
    delivered = [k for k, nxt in zip(keys, keys[1:]) if first_end[nxt] <= cut]
    return len(delivered[1:]) * chunk if delivered else 0   # keys[0] is the header; chunks 0, 1 are full


class Bomb:
    """Unpickling this creates a file: proof that something unpickled a member."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def members_of(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def rewrite(shard: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            add_member(tf, name, data)


def png_claiming(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels, with almost no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(64))) + chunk(b"IEND", b""))


def plant_bomb(shard: Path, w: int = 30000, h: int = 30000) -> str:
    """Replace the shard's first image by a decompression bomb; returns its sample key."""
    members = members_of(shard)
    key = next(n for n, _ in members if n.endswith(".png")).split(".")[0]
    rewrite(shard, [(n, png_claiming(w, h) if n == f"{key}.png" else d) for n, d in members])
    return key


def image_files(folder: Path, n: int, size=(40, 30), start=0) -> list[Path]:
    """``n`` flat-coloured PNG files in ``folder`` (img000.png, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        p = folder / f"img{i:03d}.png"
        Image.fromarray(np.full((size[1], size[0], 3), i * 7 % 255, np.uint8)).save(p)
        out.append(p)
    return out
