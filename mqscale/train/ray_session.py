"""The Ray Train side of a session: rank and device from the worker context, reports and
checkpoints through ``ray.train.report`` (each rank reports its own files; Ray merges them into
one checkpoint directory under the run's storage), resume handled by the loop from that storage."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import ray.train
import ray.train.torch


class RaySession:
    def __init__(self, run_url: str = ""):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_url = run_url

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def commit(self, staging: Path, name: str, metrics: dict) -> None:
        from mqscale.train.faults import during_save
        during_save(int(metrics.get("step", -1)), self.rank)   # (ranks that reported first have uploaded)
        ray.train.report({k: v if isinstance(v, str) else float(v) for k, v in metrics.items()},
                         checkpoint=ray.train.Checkpoint.from_directory(str(staging)), checkpoint_dir_name=name)

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d
