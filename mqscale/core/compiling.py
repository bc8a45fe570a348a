"""torch.compile's two failure modes, made visible: a platform where inductor cannot compile, and
a compiled function that keeps recompiling.

Why here: the training step (``model.compile``) and the compiled decoder (``models/stackformer/
decode.py``) both compile with inductor and static shapes. Left alone, torch turns either failure
into a slow run: a missing C++ compiler or Triton surfaces deep inside the first step, and a
function whose shapes change is recompiled up to ``recompile_limit`` times, then silently run
eagerly. ``inductor_problem`` names the reason in one line before anything is built;
``CompileWatch`` counts the graphs compiled after the warm-up and names the shapes that caused
them.
"""
from __future__ import annotations

import functools
import logging

import torch

from mqscale.core.errors import CompileError

log = logging.getLogger("mqscale.compile")


def graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (every function, every recompile)."""
    from torch._dynamo.utils import counters  # torch internals: imported where needed, one place
    return int(counters["stats"]["unique_graphs"])


@functools.lru_cache(maxsize=None)
def inductor_problem(device_type: str) -> str | None:
    """None when inductor compiles and runs a small kernel on ``device_type`` here, else the
    reason in a few words (a missing C++ compiler, no Triton for the GPU, ...). Costs a compile of
    one tiny kernel (seconds, once per process; inductor's disk cache makes later ones cheap)."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        fn = torch.compile(lambda x: torch.nn.functional.gelu(x * 2.0 + 1.0).sum(), backend="inductor",
                           dynamic=False, fullgraph=True)
        x = torch.arange(8.0, device=device_type)
        got = fn(x).item()
    except Exception as e:  # noqa: BLE001 (any failure is the answer: inductor cannot compile here)
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[0][:200] if text else 'no message'}"
    want = torch.nn.functional.gelu(torch.arange(8.0) * 2.0 + 1.0).sum().item()
    if abs(got - want) > 1e-3 * abs(want):
        return f"the compiled probe computed {got}, eager {want}"
    return None


class CompileWatch:
    """Counts graphs compiled after a warm-up, for a function that should compile once.

    ``arm()`` after the warm-up; ``check(shapes)`` after each later call (``observe`` does both,
    counting the warm-up calls itself): a new graph since then
    is a recompilation, recorded with the shapes of that call; ``limit`` of them is a storm and
    raises ``CompileError`` naming what changed (the counter is process-wide, so a compile of
    anything else in between counts too: callers check right after their own call)."""

    def __init__(self, what: str, limit: int = 3, warmup: int = 1):
        self.what, self.limit, self.warmup = what, limit, warmup
        self.calls = 0
        self.armed_at: int | None = None
        self.first_shapes: str = ""
        self.recompiles: list[str] = []

    def arm(self, shapes: str = "") -> None:
        self.armed_at, self.first_shapes = graphs_compiled(), shapes

    def observe(self, shapes: str = "") -> int:
        """After each call: the first ``warmup`` calls may compile (ZeRO-3's hooks make the
        second step compile once more), the next one arms, later ones are checked."""
        self.calls += 1
        if self.calls < self.warmup:
            return 0
        if self.armed_at is None:
            self.arm(shapes)
            return 0
        return self.check(shapes)

    def rebase(self) -> None:
        """Leave out graphs compiled since the last check by something else (a sample grid's decoder)."""
        if self.armed_at is not None:
            self.armed_at = graphs_compiled() - len(self.recompiles)

    def check(self, shapes: str = "") -> int:
        """Recompilations since ``arm``; raises at ``limit``."""
        if self.armed_at is None:
            return 0
        now = graphs_compiled()
        if now > self.armed_at + len(self.recompiles):
            self.recompiles.append(shapes)
            log.warning("%s recompiled (%d since its warm-up): inputs %s, at warm-up %s", self.what,
                        len(self.recompiles), shapes or "?", self.first_shapes or "?")
            if len(self.recompiles) >= self.limit:
                raise CompileError(
                    f"{self.what}: recompilation storm, {len(self.recompiles)} recompilations after the warm-up "
                    f"(inputs {', '.join(dict.fromkeys(self.recompiles))}; compiled for {self.first_shapes}): "
                    "shapes change from call to call, so every call pays a compile; keep them fixed or turn "
                    "compilation off")
        return len(self.recompiles)
