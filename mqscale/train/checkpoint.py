"""Training checkpoints on any storage: a completion marker written last, verified on resume.

A checkpoint is a directory ``<run>/checkpoint_*`` holding DeepSpeed's files (every rank's) and
``mqscale_complete.json``: the step, the world size and every file's size and sha256. The marker
is written after all files, so a checkpoint without it is incomplete; a file whose size or sha256
differs from it is damaged. Resume walks the checkpoints from the newest step down and takes the
first that verifies, so a half-written or corrupted newest checkpoint falls back to the previous.
Under Ray the files arrive through ``ray.train.report`` (each rank reports its own files and Ray
merges them); under the deepspeed launcher each rank uploads its files and rank 0 the marker.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path

from mqscale.data import fs
from mqscale.data.tario import unsafe_name

log = logging.getLogger("mqscale.checkpoint")
MARKER = "mqscale_complete.json"
TAG = "ds"  # DeepSpeed's checkpoint tag inside each checkpoint directory
RUN_CONFIG = "run_config.json"  # the resolved run config, so the checkpoint alone rebuilds its model


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names it and why."""


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def local_files(root: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MARKER:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_path(p)}
    return out


def write_marker(root: Path, files: dict[str, dict], step: int, world: int, extra: dict | None = None) -> None:
    body = {"step": step, "world": world, "files": files, **(extra or {})}
    (root / MARKER).write_text(json.dumps(body, indent=1, sort_keys=True))


def read_marker(fs_, path: str) -> dict:
    """A marker's body, or CheckpointError saying what is wrong with it (missing, not JSON, not ours)."""
    try:
        body = json.loads(fs_.cat_file(path))
    except FileNotFoundError:
        raise CheckpointError(f"no {MARKER}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{MARKER} is not valid JSON") from None
    ok = (isinstance(body, dict) and isinstance(body.get("step"), int) and isinstance(body.get("files"), dict)
          and all(isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in body["files"].values()))
    if not ok:
        raise CheckpointError(f"{MARKER} lacks step or the files' sizes and sha256s")
    for rel in body["files"]:  # names are joined to the checkpoint (read, downloaded): none may climb out
        why = unsafe_name(rel)
        if why:
            raise CheckpointError(f"{MARKER} lists an unsafe file name {rel[:80]!r} ({why})")
    return body


@dataclass
class Found:
    url: str
    step: int
    marker: dict


class CheckpointStore:
    def __init__(self, run_url: str, storage_options: dict | None = None):
        self.run_url, self.so = run_url.rstrip("/"), storage_options or {}
        self.fs, self.path = fs.get_fs(self.run_url, self.so)

    def _url(self, path: str) -> str:
        proto = fs.protocol(self.fs)
        return path if proto in ("file", "local") else f"{proto}://{path}"

    def _entries(self) -> list[tuple[str, str]]:
        """(name, path) of every ``checkpoint_*`` directory of the run."""
        if not self.fs.exists(self.path):
            return []
        self.fs.invalidate_cache(self.path)
        out = []
        for entry in self.fs.ls(self.path, detail=True):
            d = entry["name"]
            name = posixpath.basename(d.rstrip("/"))
            if name.startswith("checkpoint_") and entry.get("type") == "directory":
                out.append((name, d))
        return sorted(out)

    def scan(self) -> tuple[list[Found], dict[str, str]]:
        """One pass over the run: (checkpoints with a readable marker, newest step first, markers
        unverified; {name: why} of the directories without one, which are never resumed)."""
        found, incomplete = [], {}
        for name, d in self._entries():
            try:
                body = read_marker(self.fs, posixpath.join(d, MARKER))
            except CheckpointError as e:
                incomplete[name] = str(e)
                continue
            found.append(Found(self._url(d), int(body["step"]), body))
        return sorted(found, key=lambda f: f.step, reverse=True), incomplete

    def candidates(self) -> list[Found]:
        found, incomplete = self.scan()
        for name, why in incomplete.items():
            log.warning("checkpoint %s: %s: incomplete, skipped", name, why)
        return found

    def incomplete(self) -> list[str]:
        return sorted(self.scan()[1])

    def verify(self, found: Found) -> str | None:
        """None when every file matches the marker, else why not."""
        fs_, root = fs.get_fs(found.url, self.so)
        for rel, want in found.marker["files"].items():
            p = posixpath.join(root, rel)
            try:
                size = fs_.size(p)
            except FileNotFoundError:
                return f"{rel} is missing"
            if size != want["size"]:
                return f"{rel} is {size} bytes, the marker says {want['size']}"
            h = hashlib.sha256()
            with fs_.open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            if h.hexdigest() != want["sha256"]:
                return f"{rel} has another sha256 than the marker"
        return None

    def latest_valid(self) -> Found | None:
        for f in self.candidates():
            why = self.verify(f)
            if why is None:
                return f
            log.warning("checkpoint %s (step %d) is damaged (%s): falling back", f.url, f.step, why)
        return None

    def open_url(self, url: str) -> Found:
        """A checkpoint named by the user (--resume-from): verified, or one clear error."""
        fs_, root = fs.get_fs(url, self.so)
        try:
            body = read_marker(fs_, posixpath.join(root, MARKER))
        except CheckpointError as e:
            raise CheckpointError(f"{url}: {e}; not a complete mqscale checkpoint") from None
        found = Found(url.rstrip("/"), int(body["step"]), body)
        why = self.verify(found)
        if why:
            raise CheckpointError(f"{url}: damaged checkpoint ({why})")
        return found

    def download(self, found: Found, dest: Path, rank: int | None = None) -> Path:
        """Copy the checkpoint's files to ``dest`` (only this rank's ZeRO shards when ``rank`` is set)."""
        fs_, root = fs.get_fs(found.url, self.so)
        for rel in found.marker["files"]:
            base = posixpath.basename(rel)
            if rank is not None and "zero_pp_rank_" in base and f"zero_pp_rank_{rank}_" not in base:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            fs_.get_file(posixpath.join(root, rel), str(target))
        return dest

    def upload(self, local: Path, name: str, files: list[str]) -> str:
        """Copy ``files`` (relative to ``local``) into ``<run>/<name>/``; returns its URL."""
        url = fs.join(self.run_url, name)
        fs_, root = fs.get_fs(url, self.so)
        for rel in files:
            remote = posixpath.join(root, rel)
            fs_.makedirs(posixpath.dirname(remote), exist_ok=True)
            fs_.put_file(str(local / rel), remote)
        return url

    def remove_partial(self, keep: str) -> list[str]:
        """Delete the checkpoint directories a dead save left behind (no marker, or a marker
        whose files are not all there), except ``keep``: they are never resumed, and nothing else
        would ever delete them (Ray only prunes what it registered). Returns their names."""
        found, incomplete = self.scan()
        partial = [posixpath.join(self.path, name) for name in incomplete if name != keep]
        for f in found:
            d = fs.get_fs(f.url, self.so)[1]
            if posixpath.basename(d) == keep:
                continue
            try:
                present = {posixpath.relpath(p, d) for p in self.fs.find(d)}
            except FileNotFoundError:
                continue
            if not all(rel in present for rel in f.marker["files"]):
                partial.append(d)
        gone = []
        for d in partial:
            name = posixpath.basename(d)
            try:
                self.fs.rm(d, recursive=True)
            except FileNotFoundError:  # pruned meanwhile (Ray's own num_to_keep)
                continue
            except Exception as e:  # housekeeping after a good save: never fails the run
                log.warning("could not remove the partial checkpoint %s (%s); it is never resumed", name, e)
                continue
            log.warning("removed %s: a partial checkpoint (a save that did not finish)", name)
            gone.append(name)
        return gone

    def prune(self, keep: int) -> None:
        for f in self.candidates()[keep:]:
            fs_, root = fs.get_fs(f.url, self.so)
            fs_.rm(root, recursive=True)


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:09d}"

