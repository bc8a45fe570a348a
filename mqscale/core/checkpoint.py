"""Checkpoints of both trainers on any storage: a completion marker written last, verified on resume.

A checkpoint is a directory ``<run>/checkpoint_<step>`` holding the trainer's files (every rank's)
and ``mqscale_complete.json``: the step, the world size, the launch that wrote it, and every file's
size and sha256. The marker is written after all files, so a checkpoint without it is incomplete;
a file whose size or sha256 differs from it is damaged. Resume walks the checkpoints from the
newest step down and takes the first that verifies, so a half-written or corrupted newest
checkpoint falls back to the previous one. Rank 0 alone lists and verifies (storage reads every
file once, not once per rank) and tells the other ranks which checkpoint to load, so all ranks
load the same step. How the files reach the storage is the session's business (``session.py``).

The Stackformer trainer stores DeepSpeed's files and ``run_config.json``; the tokenizer trainer a
complete tokenizer export (``model.safetensors`` + ``config.json``) and ``train_state.pt``.
``python -m mqscale.checkpoint verify`` runs the same check from the command line.
"""
from __future__ import annotations

import json
import logging
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mqscale.core import dist, storage
from mqscale.core.config import setting
from mqscale.core.errors import CheckpointError, ConfigError

log = logging.getLogger("mqscale.checkpoint")
MARKER = "mqscale_complete.json"
RESHARD = ("a tokenizer run resumes only on as many workers as saved it (each rank's data position "
           "belongs to that world size; Stackformer runs continue on any number)")


@dataclass
class CheckpointConfig:
    """Where a run keeps its checkpoints, how often, how many, and which one it resumes."""
    dir: str = setting("runs", doc="run storage root (local dir or s3://...): runs live in <dir>/<name>")
    every_steps: int = setting(0, ge=0, doc="steps between checkpoints; 0 = only at the end")
    keep_last: int = setting(3, ge=2, doc="checkpoints kept (at least 2, so a damaged newest has a fallback)")
    resume: Literal["auto", "never"] = setting(
        "auto", doc="auto resumes from the run's newest verified checkpoint; never starts at step 0 "
        "(a restart after a worker failure still resumes this launch's own checkpoints)")
    resume_from: str = setting("", doc="a checkpoint URL to start from when the run has none of its own")
    storage_options: dict[str, Any] = setting({}, doc="fsspec options for the storage root (endpoint, keys)")

    def run_url(self, name: str) -> str:
        """Where the run ``name`` lives: its checkpoints, and by default its TensorBoard events."""
        return f"{self.dir.rstrip('/')}/{name}"


def checkpoint_name(step: int) -> str:
    return f"checkpoint_{step:09d}"


OURS = re.compile(r"checkpoint_\d{9}")   # what checkpoint_name makes; Ray's own names (older tokenizer runs) differ


def local_files(root: Path) -> dict[str, dict]:
    """{relative path: {size, sha256}} of the files under ``root`` (the marker aside)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != MARKER:
            out[p.relative_to(root).as_posix()] = {"size": p.stat().st_size, "sha256": storage.sha256_file(p)}
    return out


def write_marker(root: Path, files: dict[str, dict], step: int, world: int, extra: dict | None = None) -> None:
    body = {"step": step, "world": world, "files": files, **(extra or {})}
    (root / MARKER).write_text(json.dumps(body, indent=1, sort_keys=True))


def read_marker(filesystem, path: str) -> dict:
    """A marker's body, or CheckpointError saying what is wrong with it (missing, not JSON, not ours)."""
    try:
        body = json.loads(filesystem.cat_file(path))
    except FileNotFoundError:
        raise CheckpointError(f"no {MARKER}") from None
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"{MARKER} is not valid JSON") from None
    ok = (isinstance(body, dict) and isinstance(body.get("step"), int) and isinstance(body.get("files"), dict)
          and all(isinstance(v, dict) and {"size", "sha256"} <= v.keys() for v in body["files"].values()))
    if not ok:
        raise CheckpointError(f"{MARKER} lacks step or the files' sizes and sha256s")
    for rel in body["files"]:  # names are joined to the checkpoint (read, downloaded): none may climb out
        why = storage.unsafe_name(rel)
        if why:
            raise CheckpointError(f"{MARKER} lists an unsafe file name {rel[:80]!r} ({why})")
    return body


@dataclass
class Checkpoint:
    """A checkpoint directory whose marker was read (its files not yet verified)."""
    url: str
    step: int
    marker: dict

    @property
    def world(self) -> int | None:
        return self.marker.get("world")


class CheckpointStore:
    """The checkpoints of one run (``<checkpoint.dir>/<name>``) on any fsspec storage."""

    def __init__(self, run_url: str, storage_options: dict | None = None):
        self.run_url, self.storage_options = run_url.rstrip("/"), storage_options or {}
        self.fs, self.path = storage.get_fs(self.run_url, self.storage_options)

    def _url(self, path: str) -> str:
        proto = storage.protocol(self.fs)
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

    def scan(self) -> tuple[list[Checkpoint], dict[str, str]]:
        """One pass over the run: (checkpoints with a readable marker, newest step first, files
        unverified; {name: why} of the directories without one, which are never resumed)."""
        found, incomplete = [], {}
        for name, d in self._entries():
            try:
                body = read_marker(self.fs, posixpath.join(d, MARKER))
            except CheckpointError as e:
                incomplete[name] = str(e) if OURS.fullmatch(name) else f"{e} (written before completion markers)"
                continue
            found.append(Checkpoint(self._url(d), int(body["step"]), body))
        return sorted(found, key=lambda c: c.step, reverse=True), incomplete

    def candidates(self) -> list[Checkpoint]:
        found, incomplete = self.scan()
        for name, why in incomplete.items():
            log.warning("checkpoint %s: %s: incomplete, skipped", name, why)
        return found

    def verify(self, ckpt: Checkpoint) -> str | None:
        """None when every file matches the marker, else why not."""
        filesystem, root = storage.get_fs(ckpt.url, self.storage_options)
        for rel, want in ckpt.marker["files"].items():
            url = storage.join(ckpt.url, rel)
            try:
                size = filesystem.size(posixpath.join(root, rel))
            except FileNotFoundError:
                return f"{rel} is missing"
            if size != want["size"]:
                return f"{rel} is {size} bytes, the marker says {want['size']}"
            if storage.sha256_url(url, self.storage_options)[0] != want["sha256"]:
                return f"{rel} has another sha256 than the marker"
        return None

    def latest_valid(self, launch: str | None = None) -> Checkpoint | None:
        """The newest checkpoint that verifies (of launch ``launch`` only, when given)."""
        for c in self.candidates():
            if launch is not None and c.marker.get("launch") != launch:
                continue
            why = self.verify(c)
            if why is None:
                return c
            log.warning("checkpoint %s (step %d) is damaged (%s): falling back", c.url, c.step, why)
        return None

    def open_url(self, url: str) -> Checkpoint:
        """A checkpoint named by the user (``resume_from``, export, verify): verified, or one clear error."""
        filesystem, root = storage.get_fs(url, self.storage_options)
        try:
            body = read_marker(filesystem, posixpath.join(root, MARKER))
        except CheckpointError as e:
            raise CheckpointError(f"{url}: {e}; not a complete mqscale checkpoint") from None
        ckpt = Checkpoint(url.rstrip("/"), int(body["step"]), body)
        why = self.verify(ckpt)
        if why:
            raise CheckpointError(f"{url}: damaged checkpoint ({why})")
        return ckpt

    def download(self, ckpt: Checkpoint, dest: Path, rank: int | None = None) -> Path:
        """Copy the checkpoint's files to ``dest`` (only this rank's ZeRO shards when ``rank`` is set)."""
        filesystem, root = storage.get_fs(ckpt.url, self.storage_options)
        for rel in ckpt.marker["files"]:
            base = posixpath.basename(rel)
            if rank is not None and "zero_pp_rank_" in base and f"zero_pp_rank_{rank}_" not in base:
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            filesystem.get_file(posixpath.join(root, rel), str(target))
        return dest

    def upload(self, local: Path, name: str, files: list[str]) -> str:
        """Copy ``files`` (relative to ``local``) into ``<run>/<name>/``; returns its URL."""
        url = storage.join(self.run_url, name)
        storage.put_files(local, url, files, self.storage_options)
        return url

    def remove_partial(self, keep: str) -> list[str]:
        """Delete the checkpoint directories a dead save left behind (no marker, or a marker
        whose files are not all there), except ``keep``: they are never resumed, and nothing else
        would ever delete them (Ray only prunes what it registered). Returns their names."""
        found, incomplete = self.scan()
        # only our own dead saves: a directory Ray named (an older tokenizer run's) is left alone
        partial = [posixpath.join(self.path, name) for name in incomplete if name != keep and OURS.fullmatch(name)]
        for c in found:
            d = storage.get_fs(c.url, self.storage_options)[1]
            if posixpath.basename(d) == keep:
                continue
            try:
                present = {posixpath.relpath(p, d) for p in self.fs.find(d)}
            except FileNotFoundError:
                continue
            if not all(rel in present for rel in c.marker["files"]):
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
        for c in self.candidates()[keep:]:
            self.fs.rm(storage.get_fs(c.url, self.storage_options)[1], recursive=True)


def check_world(ckpt: Checkpoint, world: int | None, what: str = "checkpoint") -> None:
    """A tokenizer checkpoint resumes only on as many workers as saved it (see ``RESHARD``);
    ``world`` None: any (the Stackformer trainer continues on another, ``train/elastic.py``)."""
    if world is not None and ckpt.world != world:
        raise CheckpointError(f"{what}: {ckpt.url} was saved by {ckpt.world} workers, this run has {world}: "
                              f"{RESHARD}")


def resume_candidate(cfg: CheckpointConfig, run_url: str | None) -> tuple[Checkpoint | None, str]:
    """Before any worker starts, markers only: (the checkpoint a launch would resume, the key
    that named it): the run's newest, else ``resume_from``; one ConfigError line when that
    cannot be read. The workers verify every file's sha256 before they load it."""
    if cfg.resume == "auto" and run_url:
        try:
            found = CheckpointStore(run_url, cfg.storage_options).candidates()
        except (OSError, ValueError) as e:
            raise ConfigError(f"checkpoint.dir: cannot list the run's checkpoints at {run_url} ({e})") from None
        if found:  # a run with checkpoints of its own never reads its seed again
            return found[0], "checkpoint"
    if not cfg.resume_from:
        return None, ""
    url = cfg.resume_from
    try:
        filesystem, root = storage.get_fs(url, cfg.storage_options)
        marker = read_marker(filesystem, posixpath.join(root, MARKER))
    except (CheckpointError, OSError, ValueError) as e:
        raise ConfigError(f"checkpoint.resume_from: {url}: {e}; not a complete mqscale checkpoint") from None
    return Checkpoint(url.rstrip("/"), int(marker["step"]), marker), "checkpoint.resume_from"


def check_resumable(cfg: CheckpointConfig, run_url: str | None, world: int) -> None:
    """Before any worker starts (tokenizer runs): the checkpoint a launch would resume must be
    one, from as many workers; one ConfigError line otherwise."""
    found, what = resume_candidate(cfg, run_url)
    if found is None:
        return
    try:
        check_world(found, world, what)
    except CheckpointError as e:
        raise ConfigError(f"{e}; relaunch with {found.world} workers, or start a new run (another name)") from None


def choose_resume(store: CheckpointStore, cfg: CheckpointConfig, launch_id: str,
                  world: int | None) -> Checkpoint | None:
    """The checkpoint every rank resumes from, or None; chosen by rank 0, the same on all ranks
    (saved by ``world`` workers; None: by any number).

    The run's own newest verified checkpoint comes first: a worker restarted after a failure, or
    a relaunch, continues where this run got to (``resume: never``: only this launch's own, so a
    restart still resumes). ``resume_from`` only seeds a run that has none yet."""
    def decide() -> Checkpoint | None:
        found = store.latest_valid(launch=None if cfg.resume == "auto" else launch_id)
        if found is None and cfg.resume_from:
            found = store.open_url(cfg.resume_from)
        if found is not None:
            check_world(found, world)
        return found
    return dist.decided_on_rank0(decide, CheckpointError, "choose a checkpoint to resume from")
