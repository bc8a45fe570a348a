"""The Ray Train side of a Session: rank and device from the worker context, reports and
checkpoints through ``ray.train.report``, resume through ``ray.train.get_checkpoint``."""
from __future__ import annotations

import contextlib
from typing import Iterator

import ray.train
import ray.train.torch


class RaySession:
    def __init__(self):
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    @contextlib.contextmanager
    def restore(self) -> Iterator[str | None]:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield d
