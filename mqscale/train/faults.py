"""Fault injection and tracing for the fault suite (``tests/fault``) and ``bench/faults.py``.

Every hook is off unless its environment variable is set, and then costs one dict lookup. They
live in the real code path on purpose: a fault injected here goes through exactly what a real
preemption, a dying upload or a NaN would meet.

- ``MQSCALE_FAULT_EXIT=<step>:<rank>:<flag>[,...]``: that rank dies (``os._exit``) right after
  optimizer step ``step``, once per entry (its flag file records that it happened, so a
  restarted worker does not die again).
- ``MQSCALE_FAULT_SAVE=<step>:<rank>:<flag>``: that rank dies in the middle of committing the
  step-``step`` checkpoint, after its first file reached the storage and before the others.
- ``MQSCALE_FAULT_NAN=kind:step:times[,...]``: see ``inject_nan``.
- ``MQSCALE_TRACE_SAMPLES=<dir>``: every rank appends one JSON line per optimizer step to
  ``<dir>/rank<r>.jsonl`` with the step, the process id, the time and the sample ids it trained on.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("mqscale.train")
EXIT_CODE = 17


def _entries(var: str) -> list[tuple[int, int, str]]:
    spec = os.environ.get(var)
    if not spec:
        return []
    out = []
    for item in spec.split(","):
        at, who, flag = item.split(":", 2)
        out.append((int(at), int(who), flag))
    return out


def _die_once(var: str, step: int, rank: int, what: str) -> None:
    for at, who, flag in _entries(var):
        if step == at and rank == who and not os.path.exists(flag):
            Path(flag).write_text(f"{what}: rank {rank} at step {step}\n")
            log.warning("fault injection: rank %d exits %s at step %d", rank, what, step)
            logging.shutdown()
            os._exit(EXIT_CODE)


def fault_point(step: int, rank: int) -> None:
    """After optimizer step ``step`` (``MQSCALE_FAULT_EXIT``)."""
    _die_once("MQSCALE_FAULT_EXIT", step, rank, "after the step")


def during_save(step: int, rank: int) -> None:
    """Between two files of a checkpoint commit (``MQSCALE_FAULT_SAVE``)."""
    _die_once("MQSCALE_FAULT_SAVE", step, rank, "mid-checkpoint")


class _NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


_injected: dict[tuple[str, int], int] = {}


def inject_nan(loss: torch.Tensor, step: int, rank: int) -> torch.Tensor:
    """``MQSCALE_FAULT_NAN=kind:step:times[,...]`` with kind ``loss`` (the loss becomes NaN) or
    ``grad`` (the loss stays finite, its gradient is NaN), for the first ``times`` micro-batches
    working towards optimizer step ``step``, on rank 0."""
    spec = os.environ.get("MQSCALE_FAULT_NAN")
    if not spec or rank != 0:
        return loss
    for item in spec.split(","):
        kind, at, times = item.split(":")
        key = (kind, int(at))
        if step == int(at) and _injected.get(key, 0) < int(times):
            _injected[key] = _injected.get(key, 0) + 1
            log.warning("fault injection: non-finite %s at step %d", kind, step)
            return loss * float("nan") if kind == "loss" else _NaNGradient.apply(loss)
    return loss


class SampleTrace:
    """The sample ids each optimizer step trained on (``MQSCALE_TRACE_SAMPLES``), for the suite's
    exactly-once checks across kills and restarts."""

    def __init__(self, rank: int):
        d = os.environ.get("MQSCALE_TRACE_SAMPLES")
        self.path = Path(d) / f"rank{rank}.jsonl" if d else None
        self.ids: list[int] = []

    def add(self, batch: dict) -> None:
        if self.path is not None and "sample_id" in batch:
            self.ids += batch["sample_id"][batch["mask"]].tolist()

    def step(self, step: int) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "pid": os.getpid(), "time": time.time(), "ids": self.ids}) + "\n")
        self.ids = []
