"""TensorBoard for both trainers: rank 0 writes, other ranks log nothing; events live with the run.

Events go to ``logging.tensorboard_dir`` when it is set, else to the run's ``tb`` folder
(``<checkpoint.dir>/<name>/tb``) beside its checkpoints, never to a worker's working directory.
When the run lives in an object store they are written to a local scratch directory and copied
to ``<run>/tb`` at every checkpoint and once more after the writer is closed (so the final image
grid and the hparams reach the bucket).
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from mqscale.core import storage
from mqscale.core.config import setting


@dataclass
class LoggingConfig:
    """Where TensorBoard events go, and how often scalars and image grids are logged."""
    tensorboard_dir: str = setting("", doc="TensorBoard event dir; empty = <run>/tb (written locally, "
                                   "synced when the run's storage is remote)")
    log_every: int = setting(10, ge=1, doc="steps between scalar logs")
    image_every: int = setting(0, ge=0, doc="steps between image grids; 0 = only at the end")


def tensorboard_location(run_url: str, tensorboard_dir: str) -> str:
    """Where a run's events end up: the directory to point ``tensorboard --logdir`` at."""
    return tensorboard_dir or storage.join(run_url.removeprefix("file://"), "tb")


def safe_hparams(hp: dict) -> dict:
    """Hparams TensorBoard accepts: numbers, strings and booleans as they are, anything else as text."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hp.items()}


class RunWriter:
    """A run's TensorBoard writer: real on rank 0, a no-op on other ranks."""

    def __init__(self, run_url: str, tensorboard_dir: str, storage_options: dict | None, rank: int):
        self.remote: str | None = None     # where the scratch events are synced to
        self.dir, self.writer = "", None
        self.storage_options = storage_options or {}
        if rank != 0:
            return
        if tensorboard_dir:
            self.dir = tensorboard_dir
        elif storage.is_local(run_url):
            self.dir = tensorboard_location(run_url, "")
        else:
            self.dir, self.remote = tempfile.mkdtemp(prefix="mqscale-tb-"), storage.join(run_url, "tb")
        self.writer = SummaryWriter(self.dir)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def image(self, step: int, tag: str, image: torch.Tensor) -> None:
        """``image``: [3, H, W] in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)
            self.writer.flush()

    def hparams(self, hp: dict, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.add_hparams(safe_hparams(hp), {f"hparam/{k.replace('/', '_')}": v for k, v in metrics.items()},
                                    run_name=".")

    def sync(self) -> None:
        """Copy the scratch events to ``<run>/tb`` (a no-op unless the run is remote)."""
        if self.writer is None or self.remote is None:
            return
        self.writer.flush()
        local = Path(self.dir)
        storage.put_files(local, self.remote, [p.relative_to(local).as_posix() for p in local.rglob("*")
                                               if p.is_file()], self.storage_options)

    def close(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self.sync()
        if self.remote is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
        self.writer = None
