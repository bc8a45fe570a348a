"""Storage access through fsspec: one opener for every URL, atomic commits, no shell URLs.

Why: webdataset's own opener knows no ``s3://`` and runs ``pipe:`` URLs through a shell (an
injection path for anyone who controls a shard list). Everything here goes through fsspec with
the config's ``storage_options``; ``pipe:`` is refused, and webdataset is taught to use fsspec
too, so a plain ``webdataset.WebDataset("s3://...")`` works on our shards.

Atomic commits: on a filesystem, write a hidden temporary name, then rename. On an object store
(s3, gcs, azure) a PUT or a completed multipart upload is itself atomic: the key appears only
whole, and an interrupted upload leaves nothing under the final name.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from typing import IO, Any, Iterator

import fsspec
from fsspec.core import url_to_fs

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}


class StorageError(OSError):
    """A storage operation that failed after the filesystem's own retries; message names the URL."""


def check_url(url: str) -> str:
    if url.startswith("pipe:"):
        raise ValueError(f"{url[:60]!r}: pipe: URLs are refused (they run a shell command)")
    return url


def get_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(filesystem, path) for a URL. Filesystem instances are cached by fsspec per process."""
    return url_to_fs(check_url(url), **(storage_options or {}))


def protocol(fs) -> str:
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def open_read(url: str, storage_options: dict | None = None, **kw) -> IO[bytes]:
    fs, path = get_fs(url, storage_options)
    try:
        return fs.open(path, "rb", **kw)
    except FileNotFoundError:
        raise
    except PermissionError as e:
        raise StorageError(f"{url}: access denied ({e})") from None
    except OSError as e:
        raise StorageError(f"{url}: cannot open ({e})") from None


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with open_read(url, storage_options) as f:
        return f.read()


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def makedirs(url: str, storage_options: dict | None = None) -> None:
    fs, path = get_fs(url, storage_options)
    if protocol(fs) not in OBJECT_STORES:
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_writer(url: str, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears under ``url`` only if the block completes."""
    fs, path = get_fs(url, storage_options)
    if protocol(fs) in OBJECT_STORES:
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            with contextlib.suppress(Exception):
                f.discard()          # abort the (multipart) upload: nothing appears
            f.closed = True          # and never flush the discarded buffer later
            raise
        f.close()  # completes the upload: the object appears whole
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = fs.open(tmp, "wb")
    try:
        yield f
        f.close()
        fs.mv(tmp, path)
    finally:
        if not f.closed:
            f.close()
        with contextlib.suppress(Exception):
            if fs.exists(tmp):
                fs.rm(tmp)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    with atomic_writer(url, storage_options) as f:
        f.write(data)


def register_webdataset_opener(storage_options: dict | None = None) -> None:
    """Make webdataset open every fsspec protocol through fsspec (with these storage options),
    and refuse pipe: URLs."""
    import importlib

    wds_gopen = importlib.import_module("webdataset.gopen")  # the module; the package re-exports a function

    def _fsspec_open(url, mode="rb", bufsize=8192, **kw):
        return fsspec.open(check_url(url), mode, **(storage_options or {})).open()

    def _refuse(url, *a, **kw):
        check_url(url)

    for proto in ("s3", "s3a", "gs", "gcs", "az", "abfs", "memory", "http", "https"):
        wds_gopen.gopen_schemes[proto] = _fsspec_open
    wds_gopen.gopen_schemes["pipe"] = _refuse
