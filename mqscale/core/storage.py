"""Storage through fsspec: one opener for every URL, atomic commits, checksums, safe names, no shell URLs.

Why: webdataset's own opener knows no ``s3://`` and runs ``pipe:`` URLs through a shell (an
injection path for anyone who controls a shard list). Everything here goes through fsspec with
the config's ``storage_options``; ``pipe:`` is refused, and webdataset is taught to use fsspec
too, so a plain ``webdataset.WebDataset("s3://...")`` works on our shards.

Errors: s3fs retries transient failures itself, and what still fails arrives as whatever the
stack below raised (botocore's EndpointConnectionError, an aiohttp payload error mid-read, a
timeout), none of them an OSError. ``open_read`` and every read on the file it returns turn those
into ``StorageError`` (an OSError whose one-line message names the URL), so a reader has one
exception to count, skip or fail on.

Atomic commits: on a filesystem, write a hidden temporary name, then rename. On an object store
(s3, gcs, azure) a PUT or a completed multipart upload is itself atomic: the key appears only
whole, and an interrupted upload leaves nothing under the final name.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import importlib
import os
import posixpath
import uuid
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.exceptions import FSTimeoutError
from fsspec.registry import known_implementations

from mqscale.core.errors import StorageError

OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
# Schemes for which webdataset's own opener runs a command (``pipe:`` a shell, the others curl or
# ais) and that no fsspec filesystem serves: refused everywhere. The fsspec-served ones (http, s3,
# gs, sftp, hf, ...) are rerouted through fsspec by ``register_webdataset_opener`` instead.
SHELL_SCHEMES = {"pipe", "scp", "ftps", "ais", "htgs"}


def check_url(url: str) -> str:
    """Refuse command URLs, with the scheme parsed as webdataset's opener parses it (urlsplit:
    case-folded, leading blanks and embedded tabs or newlines dropped), so no spelling (``PIPE:``,
    `` pipe:``, a tab inside ``pipe``) slips past this check and into a shell."""
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        scheme = ""
    raw = url.lstrip().split(":", 1)[0].lower() if ":" in url else ""
    for s in (scheme, raw):
        if s in SHELL_SCHEMES:
            raise ValueError(f"{url[:60]!r}: {s}: URLs are refused (webdataset would run a command for them)")
    return url


@functools.lru_cache(maxsize=1)
def _transport_errors() -> tuple[type[BaseException], ...]:
    """What the object-store stack raises that is not an OSError (botocore, aiohttp, timeouts).
    botocore and aiohttp come with s3fs and http filesystems: optional, hence imported here."""
    errors: list[type[BaseException]] = [asyncio.TimeoutError, TimeoutError, FSTimeoutError]
    with contextlib.suppress(ImportError):
        from botocore.exceptions import BotoCoreError, ClientError  # optional: comes with s3fs
        errors += [BotoCoreError, ClientError]
    with contextlib.suppress(ImportError):
        from aiohttp import ClientError as HTTPClientError  # optional: comes with http filesystems
        errors.append(HTTPClientError)
    return tuple(errors)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


@contextlib.contextmanager
def _storage_errors(url: str, what: str) -> Iterator[None]:
    """Turn a failed storage call into ``StorageError`` naming the URL (FileNotFoundError and
    StorageError pass unchanged: "not there" is its own answer)."""
    try:
        yield
    except (FileNotFoundError, StorageError):
        raise
    except PermissionError as e:
        raise StorageError(f"{url}: access denied ({_one_line(e)})") from None
    except OSError as e:
        raise StorageError(f"{url}: cannot {what} ({_one_line(e)})") from None
    except _transport_errors() as e:
        raise StorageError(f"{url}: cannot {what} ({_one_line(e)})") from None


class GuardedFile:
    """A read-only file whose reads raise ``StorageError`` (naming the URL) for any storage
    failure; other attributes pass through to the filesystem's file."""

    def __init__(self, f: IO[bytes], url: str):
        self._f, self.url = f, url

    def read(self, n: int = -1) -> bytes:
        with _storage_errors(self.url, "read"):
            return self._f.read(n)

    def readinto(self, b) -> int:
        with _storage_errors(self.url, "read"):
            return self._f.readinto(b)

    def seek(self, *a) -> int:
        with _storage_errors(self.url, "seek in"):
            return self._f.seek(*a)

    def close(self) -> None:
        # Closing a file opened for reading loses nothing: a failure here (the connection is
        # gone, which is why a read already failed) must not replace the error being handled.
        with contextlib.suppress(OSError, *_transport_errors()):
            self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> "GuardedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers run in directories of their own); URLs and "" as given."""
    return path if not path or "://" in path else str(Path(path).resolve())


def unsafe_name(name: str) -> str | None:
    """Why a member, shard or file name could reach outside its directory if someone extracted or
    joined it (absolute, a ``..`` segment, a backslash, a URL or a NUL), or None when it is safe.
    A name that is unsafe anywhere is refused everywhere: shards, manifests, checkpoint markers and
    exports never carry one, and a reader counts it instead of passing it on."""
    if not name or name.startswith(("/", "~")) or "\\" in name or "\0" in name or "://" in name:
        return "absolute, a URL, or holds a backslash or NUL"
    if any(part == ".." for part in name.split("/")):
        return "climbs out with '..'"
    return None


def get_fs(url: str, storage_options: dict | None = None) -> tuple[Any, str]:
    """(filesystem, path) for a URL. Filesystem instances are cached by fsspec per process."""
    return url_to_fs(check_url(url), **(storage_options or {}))


def protocol(filesystem) -> str:
    p = filesystem.protocol
    return p[0] if isinstance(p, (tuple, list)) else p


def join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def open_read(url: str, storage_options: dict | None = None, **kw) -> GuardedFile:
    """Open for reading; a storage failure here or in any later read is a ``StorageError``."""
    with _storage_errors(url, "open"):
        filesystem, path = get_fs(url, storage_options)
        return GuardedFile(filesystem.open(path, "rb", **kw), url)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    with open_read(url, storage_options) as f:
        return f.read()


def exists(url: str, storage_options: dict | None = None) -> bool:
    filesystem, path = get_fs(url, storage_options)
    with _storage_errors(url, "stat"):
        return filesystem.exists(path)


def makedirs(url: str, storage_options: dict | None = None) -> None:
    filesystem, path = get_fs(url, storage_options)
    if protocol(filesystem) not in OBJECT_STORES:
        filesystem.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def atomic_writer(url: str, storage_options: dict | None = None) -> Iterator[IO[bytes]]:
    """A binary file that appears under ``url`` only if the block completes."""
    filesystem, path = get_fs(url, storage_options)
    if protocol(filesystem) in OBJECT_STORES:
        f = filesystem.open(path, "wb")
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
        filesystem.makedirs(parent, exist_ok=True)
    tmp = posixpath.join(parent, f".{posixpath.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    f = filesystem.open(tmp, "wb")
    try:
        yield f
        f.close()
        filesystem.mv(tmp, path)
    finally:
        if not f.closed:
            f.close()
        with contextlib.suppress(Exception):
            if filesystem.exists(tmp):
                filesystem.rm(tmp)


def write_bytes(url: str, data: bytes, storage_options: dict | None = None) -> None:
    with atomic_writer(url, storage_options) as f:
        f.write(data)


def put_files(local: Path, url: str, files: list[str], storage_options: dict | None = None) -> None:
    """Copy ``files`` (paths relative to the local directory ``local``) under ``url``."""
    filesystem, root = get_fs(url, storage_options)
    for rel in files:
        remote = posixpath.join(root, rel)
        filesystem.makedirs(posixpath.dirname(remote), exist_ok=True)
        filesystem.put_file(str(local / rel), remote)


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary local path beside ``path`` for a writer that wants a file name (safetensors),
    renamed onto ``path`` only if the block completes."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(f: IO[bytes]) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def sha256_url(url: str, storage_options: dict | None = None) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of what ``url`` holds, read in 1 MiB chunks."""
    with open_read(url, storage_options) as f:
        return _sha256(f)


def sha256_file(path: str | Path) -> str:
    """The sha256 of a local file."""
    with open(path, "rb") as f:
        return _sha256(f)[0]


def register_webdataset_opener(storage_options: dict | None = None) -> None:
    """Make webdataset open every scheme it knows through fsspec (with these storage options),
    and refuse the ones no fsspec filesystem serves (``pipe:``, and the curl/ais command lines).
    Every entry of webdataset's table is replaced, so no scheme is left to run a subprocess."""
    wds_gopen = importlib.import_module("webdataset.gopen")  # the module; the package re-exports a function

    def _fsspec_open(url, mode="rb", bufsize=8192, **kw):
        if mode == "rb":
            return open_read(url, storage_options)
        return fsspec.open(check_url(url), mode, **(storage_options or {})).open()

    def _refuse(url, *a, **kw):
        check_url(url)
        raise ValueError(f"{url[:60]!r}: this URL scheme is refused (webdataset would run a command for it)")

    ours = OBJECT_STORES | {"memory", "http", "https"}
    for proto in (set(wds_gopen.gopen_schemes) | ours | SHELL_SCHEMES) - {"__default__"}:
        served = proto in ours or (proto in known_implementations and proto not in SHELL_SCHEMES)
        wds_gopen.gopen_schemes[proto] = _fsspec_open if served else _refuse
