"""Checkpoints laid out as training writes them, without training."""
from __future__ import annotations

import json
from pathlib import Path

from mqscale.core.checkpoint import checkpoint_name, local_files, write_marker


def make_checkpoint(run: Path, step: int, world: int = 2, global_batch: int | None = None, micro: int = 8) -> Path:
    """A checkpoint laid out as training writes one: DeepSpeed-like files, then the marker last.
    With ``global_batch``, a ``resize.json`` too (what checkpoints record since elastic resume;
    without it, one from before)."""
    d = run / checkpoint_name(step)
    (d / "ds").mkdir(parents=True)
    for r in range(world):
        (d / "ds" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r, step % 256]) * 500)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 300)
    (d / "run_config.json").write_text("{}")
    if global_batch is not None:
        (d / "resize.json").write_text(json.dumps({
            "version": 1, "step": step, "world": world, "global_batch": global_batch, "micro_batch": micro,
            "grad_accum": global_batch // (micro * world), "zero_stage": 2, "loader": [{}] * world,
            "rng_digest": "0" * 64}))
    write_marker(d, local_files(d), step, world)
    return d
