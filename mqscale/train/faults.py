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
- ``MQSCALE_FAULT_SLOW=<seconds>``: every rank sleeps that long after each optimizer step (a
  run slow enough for a test to take a node away, and give it back, mid-run).
- ``MQSCALE_TRACE_SAMPLES=<dir>``: every rank appends one JSON line per optimizer step to
  ``<dir>/rank<r>.jsonl`` with the step, the process id, the time, the world size, the worker
  group (``gen``: one id per start of the group, so a step re-done after a restart or a resize
  can be told from the attempt it replaces) and the sample ids it trained on.
- ``MQSCALE_DUMP_OPTIMIZER=<dir>``: after each restore and save, rank 0 writes the fp32
  masters and Adam moments of every parameter, gathered whole from all ranks, to
  ``<dir>/<event>-step<k>-world<n>.safetensors`` (for the check that a resize keeps them).
"""
from __future__ import annotations

import json
import logging
import os
import time
import uuid
from pathlib import Path

import torch

from mqscale.core import dist

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
    """After optimizer step ``step`` (``MQSCALE_FAULT_EXIT``, ``MQSCALE_FAULT_SLOW``)."""
    _die_once("MQSCALE_FAULT_EXIT", step, rank, "after the step")
    slow = os.environ.get("MQSCALE_FAULT_SLOW")
    if slow:
        time.sleep(float(slow))


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
    exactly-once checks across kills, restarts and resizes. Every rank makes one (the group id
    is rank 0's, broadcast)."""

    def __init__(self, rank: int, world: int = 1, start_step: int = 0):
        d = os.environ.get("MQSCALE_TRACE_SAMPLES")
        self.path = Path(d) / f"rank{rank}.jsonl" if d else None
        self.world, self.start = world, start_step
        self.gen = dist.broadcast(uuid.uuid4().hex) if d else ""
        self.ids: list[int] = []

    def add(self, batch: dict) -> None:
        if self.path is not None and "sample_id" in batch:
            self.ids += batch["sample_id"][batch["mask"]].tolist()

    def step(self, step: int) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "pid": os.getpid(), "time": time.time(), "world": self.world,
                                "gen": self.gen, "resumed_at": self.start, "ids": self.ids}) + "\n")
        self.ids = []


def full_optimizer_state(engine) -> dict[str, torch.Tensor]:
    """{"<param>/fp32|exp_avg|exp_avg_sq": whole fp32 tensor} of a DeepSpeed engine, gathered
    from every rank's partition (a collective under ZeRO 1-3: every rank calls it). ZeRO-0 keeps
    whole copies: the optimizer's fp32 groups and their Adam state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state  # heavy: workers only
    out = {}
    named = list(engine.module.named_parameters())
    if engine.zero_optimization_stage() == 0:
        opt = engine.optimizer
        masters = {id(p): m for lows, highs in zip(opt.fp16_groups, opt.fp32_groups) for p, m in zip(lows, highs)}
        for name, p in named:
            m = masters[id(p)]
            state = opt.optimizer.state.get(m, {})
            out[f"{name}/fp32"] = m.detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    out[f"{name}/{key}"] = state[key].detach().float().cpu().clone()
        return out
    opt = engine.optimizer
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 link each parameter to its Adam-state fragment once, lazily, and can do it
        # before the state exists (the links stay empty): link them again now that it does
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for name, p in named:
        out[f"{name}/fp32"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            t = safe_get_full_optimizer_state(p, key)
            if t is not None:
                out[f"{name}/{key}"] = t.detach().float().cpu().clone()
    return out


def dump_optimizer(engine, event: str, step: int, world: int, rank: int) -> None:
    """``MQSCALE_DUMP_OPTIMIZER``: see the module doc."""
    d = os.environ.get("MQSCALE_DUMP_OPTIMIZER")
    if not d:
        return
    state = full_optimizer_state(engine)
    if rank == 0:
        from safetensors.torch import save_file  # the fault suite's dump only
        Path(d).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(Path(d) / f"{event}-step{step}-world{world}.safetensors"))
