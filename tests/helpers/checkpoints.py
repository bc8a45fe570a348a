"""Checkpoints laid out as training writes them, without training."""
from __future__ import annotations

from pathlib import Path

from mqscale.core.checkpoint import checkpoint_name, local_files, write_marker


def make_checkpoint(run: Path, step: int, world: int = 2) -> Path:
    """A checkpoint laid out as training writes one: DeepSpeed-like files, then the marker last."""
    d = run / checkpoint_name(step)
    (d / "ds").mkdir(parents=True)
    for r in range(world):
        (d / "ds" / f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt").write_bytes(bytes([r, step % 256]) * 500)
    (d / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"model" * 300)
    (d / "run_config.json").write_text("{}")
    write_marker(d, local_files(d), step, world)
    return d
