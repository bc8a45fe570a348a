"""Where a training loop reports to: metrics, checkpoints, and the checkpoint to resume from.

Loops talk to a ``Session`` and never import Ray: ``RaySession`` (``ray_session.py``) forwards to
``ray.train.report``/``get_checkpoint``; ``LocalSession`` keeps checkpoints in a local directory
with the same contract (a checkpoint is a directory; it becomes visible only when complete; the
newest complete one is resumed), for single-process runs and tests.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Protocol

import torch


class Session(Protocol):
    rank: int
    world: int
    device: torch.device

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None: ...

    def restore(self) -> contextlib.AbstractContextManager[str | None]: ...


class LocalSession:
    def __init__(self, root: str, keep_last: int = 3, device: str | torch.device = "cpu"):
        self.root, self.keep_last = Path(root), keep_last
        self.rank, self.world, self.device = 0, 1, torch.device(device)
        self.metrics: list[dict] = []

    def _complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.name.startswith("checkpoint_") and (p / ".complete").exists())

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        self.metrics.append(dict(metrics))
        if checkpoint_dir is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"checkpoint_{int(metrics.get('step', len(self.metrics))):09d}"
        tmp = self.root / f".{final.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(checkpoint_dir, tmp)
        (tmp / ".complete").write_text(json.dumps(metrics, default=float))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self._complete()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        done = self._complete()
        yield str(done[-1]) if done else None


class LauncherSession:
    """Ranks started by the deepspeed launcher (or torchrun): each uploads its own checkpoint files
    to the run's storage, then rank 0 the completion marker, then rank 0 prunes old checkpoints."""

    def __init__(self, run_url: str, storage_options: dict | None, keep_last: int):
        import torch.distributed as dist

        from mqscale.train.checkpoint import CheckpointStore
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
        self.run_url, self.keep_last = run_url, keep_last
        self.store = CheckpointStore(run_url, storage_options)

    def commit(self, staging: Path, name: str, metrics: dict) -> None:
        import torch.distributed as dist

        from mqscale.train.checkpoint import MARKER
        from mqscale.train.faults import during_save
        mine = [p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file() and p.name != MARKER]
        self.store.upload(staging, name, mine[:1])
        during_save(int(metrics.get("step", -1)), self.rank)
        self.store.upload(staging, name, mine[1:])
        dist.barrier()
        if self.rank == 0:
            self.store.upload(staging, name, [MARKER])
            self.store.prune(self.keep_last)
        dist.barrier()


@contextlib.contextmanager
def scratch_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="mqscale-ckpt-")
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
