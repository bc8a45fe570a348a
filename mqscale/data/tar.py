"""Tar streams in the WebDataset layout, read and written without ever unpickling.

Members ``dir/key.ext1.ext2`` group into samples by key, in order. Reading refuses pickle-like
members (counted, their bytes dropped unread by any decoder) and turns a truncated or corrupt
archive into a counted event that ends the shard, instead of an exception that ends the run.
Shard-level events (corrupt, unreadable, refused members) are also logged as warnings on the
``mqscale.data`` logger, once per shard and event, so an operator sees which shard is bad.
Shards may be gzip, bzip2 or xz compressed (``.tar.gz`` ...): they are decompressed here, so the
end-of-archive check sees the tar's own bytes.
"""
from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO, Iterator

from mqscale.core.errors import StorageError
from mqscale.core.storage import unsafe_name

# Extensions whose usual decoders unpickle: never decoded, always refused and counted.
REFUSED_EXTS = {"pyd", "pkl", "pickle", "pth", "pt", "ckpt", "joblib"}

log = logging.getLogger("mqscale.data")


@dataclass
class ReadStats:
    """Counters a reader keeps; summed across workers and ranks for the training metrics."""
    samples: int = 0             # samples delivered valid
    invalid_samples: int = 0     # decoded but failed validation (token ranges, lengths, ...)
    undecodable: int = 0         # a member that would not decode (bad image, bad npy)
    refused_members: int = 0     # pickle-like members, never decoded
    unknown_members: int = 0     # members with an extension the decoder does not use
    corrupt_shards: int = 0      # truncated or damaged archives (remaining samples skipped)
    unreadable_shards: int = 0   # could not be opened/read after the filesystem's retries
    missing_samples: int = 0     # samples the manifest promised but the shard did not hold
    padding: int = 0             # batch slots filled with masked holes to keep ranks in step
    events: list[str] = field(default_factory=list)  # last few "shard: what happened" lines

    def note(self, msg: str) -> None:
        self.events = (self.events + [msg])[-20:]

    def warn(self, msg: str) -> None:
        """A shard-level event: kept like ``note`` and logged (callers warn once per shard)."""
        self.note(msg)
        log.warning("%s", msg)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "events"}


def split_name(name: str) -> tuple[str, str]:
    """``a/b/key.x.y`` -> (``a/b/key``, ``x.y``), the WebDataset key/extension rule."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


class _TailReader:
    """Passes reads through, remembering where the last nonzero byte was.

    Why: Python's tarfile ends an archive quietly at an invalid header, so a header damaged in
    the middle of a shard looks like a clean end (and its trailing zero blocks are intact). A
    whole tar holds nothing but zero bytes (the end-of-archive blocks and record padding) from
    the end of its last member to EOF; anything else after it means members were lost."""

    def __init__(self, f: IO[bytes]):
        self.f, self.n, self.data_end = f, 0, 0

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        if b:
            nonzero = len(b) if b[-1] else len(b.rstrip(b"\0"))  # copies only a zero-ended chunk
            if nonzero:
                self.data_end = self.n + nonzero
            self.n += len(b)
        return b

    def end_problem(self, members_end: int) -> str | None:
        """Why the archive did not end cleanly at ``members_end`` (the byte after its last
        member), or None: after it come only zeros, at least the two 512-byte end blocks."""
        while self.read(1 << 16):
            pass
        if self.data_end > members_end:
            return (f"{self.data_end - members_end} bytes after the last readable member are not "
                    "end-of-archive zeros (a damaged member header)")
        if self.n - members_end < 1024:
            return "no end-of-archive marker (truncated)"
        return None


# Compressed shards: tarfile's own "r|*" would decompress inside, where the end check cannot see
# the tar's bytes; here the stream is decompressed first and the check runs on the tar itself.
_COMPRESSED = (
    (b"\x1f\x8b", "gzip", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
    (b"BZh", "bzip2", lambda f: bz2.BZ2File(f, mode="rb")),
    (b"\xfd7zXZ\x00", "xz", lambda f: lzma.LZMAFile(f, mode="rb")),
)


class _Head:
    """A stream whose first bytes have been looked at (for the compression magic)."""

    def __init__(self, f: IO[bytes], n: int = 6):
        self.f, self.head = f, f.read(n)

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        if n is None or n < 0:
            out, self.head = self.head + self.f.read(), b""
            return out
        out, self.head = self.head[:n], self.head[n:]
        return out if len(out) == n else out + self.f.read(n - len(out))


class _Decompressed:
    """Reads of a decompressor; its data errors (bad or cut stream) become tarfile.ReadError
    (a corrupt shard), while storage errors of the stream below pass unchanged."""

    def __init__(self, src: _Head, kind: str, make):
        self.src, self.kind, self.d = src, kind, make(src)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.d.read(n)
        except StorageError:
            raise
        except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:  # BadGzipFile is an OSError
            raise tarfile.ReadError(f"{self.kind} stream: {e}") from None


def _tar_stream(f: IO[bytes]):
    """The tar bytes of ``f``: as is, or decompressed when it starts with gzip/bzip2/xz magic."""
    head = _Head(f)
    for magic, kind, make in _COMPRESSED:
        if head.head.startswith(magic):
            return _Decompressed(head, kind, make)
    return head


def iter_samples(f: IO[bytes], shard: str, stats: ReadStats) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) per sample. A corrupt tail ends the shard, counted once.

    A tar cut at a member boundary, or with a damaged header, parses without error, so the last
    sample is held back until the archive is seen to end cleanly (only zeros after the last
    member, including the end-of-archive marker): otherwise the sample may be missing members
    and is dropped with the shard counted corrupt. gzip/bzip2/xz shards are decompressed first."""
    key, sample = None, {}
    refused = 0
    try:
        src = _TailReader(_tar_stream(f))
        with tarfile.open(fileobj=src, mode="r|") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = split_name(member.name)
                bad_name = unsafe_name(member.name)
                if bad_name or ext.rsplit(".", 1)[-1].lower() in REFUSED_EXTS:
                    stats.refused_members += 1
                    why = f"unsafe name: {bad_name}" if bad_name else "pickle-like member, not decoded"
                    msg = f"{shard}: refused {member.name!r} ({why})"
                    if refused:
                        stats.note(msg)
                    else:  # logged once per shard: a shard full of pickles must not flood the log
                        stats.warn(msg + "; further refusals in this shard are counted, not logged")
                    refused += 1
                    continue
                data = tf.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError("unexpected end of data")
                if k != key:
                    if key is not None:
                        yield key, sample
                    key, sample = k, {}
                sample[ext] = data
            members_end = tf.offset  # where tarfile stopped: the byte after the last member
        problem = src.end_problem(members_end)
        if problem:
            raise tarfile.ReadError(problem)
    except (tarfile.TarError, EOFError, ValueError) as e:  # OSError (storage) propagates
        stats.corrupt_shards += 1
        stats.warn(f"{shard}: corrupt or truncated after key {key!r} ({e}); rest of shard skipped")
        return  # the partly read sample is dropped: its members may be incomplete
    if key is not None:
        yield key, sample


class TarWriter:
    """Write members to a binary stream as a POSIX tar with fixed metadata (reproducible bytes)."""

    def __init__(self, f: IO[bytes]):
        self.tf = tarfile.open(fileobj=f, mode="w|", format=tarfile.GNU_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        why = unsafe_name(name)
        if why:
            raise ValueError(f"tar member {name!r}: {why}; shards never hold such names")
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o444
        info.uname = info.gname = ""
        self.tf.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self.tf.close()

    def abandon(self) -> None:
        """Drop the unfinished archive: a failed shard must not be flushed later (tarfile does so
        when collected) into a file its atomic writer has already closed and removed."""
        self.tf.closed = self.tf.fileobj.closed = True

    def __enter__(self) -> "TarWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()
