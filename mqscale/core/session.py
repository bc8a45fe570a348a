"""Where a training loop runs and how its checkpoints reach the run's storage.

Both trainers talk to a ``Session`` and never import Ray. A session gives the rank, the world,
the device, the run's storage URL and the launch id, and commits a checkpoint staged in a local
directory: ``RaySession`` (``core/ray.py``) hands it to ``ray.train.report`` (each rank reports
its own files; Ray merges them under the run's storage); ``StorageSession`` copies it there itself,
for ranks started by the deepspeed launcher (or torchrun) and for a single local process. Either
way the marker is written last (see ``checkpoint.py``) and the run's checkpoints are found,
verified and resumed through the same ``CheckpointStore``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch

from mqscale.core import dist
from mqscale.core.checkpoint import MARKER, CheckpointStore, checkpoint_name, local_files, write_marker


def default_device() -> torch.device:
    """The device a single process uses: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Session(Protocol):
    rank: int
    world: int
    device: torch.device
    run_url: str
    launch_id: str   # names this launch: restarts after a failure share it, a relaunch gets a new one

    def commit(self, staging: Path | None, name: str, metrics: dict) -> None:
        """Called by every rank with its staged files (None: it has none) and the step's metrics."""


class StorageSession:
    """Ranks that copy their checkpoint files to the run's storage themselves: each its own, then
    rank 0 the marker, then rank 0 prunes old checkpoints. One process alone is a world of one.
    ``between_files(step, rank)`` runs after a rank's first file is stored (the fault suite's
    hook for a save killed half-way)."""

    def __init__(self, run_url: str, storage_options: dict | None = None, keep_last: int = 3,
                 device: str | torch.device | None = None, launch_id: str = "",
                 between_files: Callable[[int, int], None] | None = None):
        self.rank, self.world = dist.rank(), dist.world()
        if device is None:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.run_url, self.keep_last = run_url, keep_last
        self.launch_id = launch_id or dist.broadcast(uuid.uuid4().hex)
        self.store = CheckpointStore(run_url, storage_options)
        self.between_files = between_files

    def commit(self, staging: Path | None, name: str, metrics: dict) -> None:
        mine = [] if staging is None else [p.relative_to(staging).as_posix() for p in staging.rglob("*")
                                           if p.is_file() and p.name != MARKER]
        self.store.upload(staging, name, mine[:1])
        if self.between_files is not None:
            self.between_files(int(metrics.get("step", -1)), self.rank)
        self.store.upload(staging, name, mine[1:])
        dist.barrier()
        if self.rank == 0:
            self.store.upload(staging, name, [MARKER])
            self.store.prune(self.keep_last)
        dist.barrier()


def commit_checkpoint(session: Session, store: CheckpointStore, staging: Path | None, step: int,
                      metrics: dict, extra: dict | None = None) -> str:
    """Mark the staged checkpoint of ``step`` (every rank's files, gathered: rank 0 writes the
    marker) and commit it through the session; rank 0 then deletes what dead saves left behind.
    Returns the checkpoint's name. Every rank calls it."""
    files: dict = {}
    for part in dist.gather(local_files(staging) if staging is not None else {}):
        files.update(part)
    name = checkpoint_name(step)
    if session.rank == 0:
        write_marker(staging, files, step, session.world, {"launch": session.launch_id, **(extra or {})})
    session.commit(staging, name, metrics)
    if session.rank == 0:
        store.remove_partial(keep=name)
    return name


@contextlib.contextmanager
def scratch_dir(prefix: str = "mqscale-") -> Iterator[Path]:
    """A local directory removed afterwards (a checkpoint being staged or restored)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
