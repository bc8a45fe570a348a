"""train_tokenizer under real Ray Train: 2 workers (gloo), checkpoints, automatic resume.

17 images over 2 ranks at batch 4: rank 0 gets 8 (two full batches, then one of padding only),
rank 1 gets 9, so every third step one rank, the first, holds no real image. Its collectives
must still match the other rank's (the EMA codebook's sums and restart broadcast, the gradient
all-reduce): before per-row weights that step aborted gloo."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from data_tools.make_shapes import write_shapes
from mqscale.tokenizer.config import TOKENIZER
from mqscale.train.verify import verify_url

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path, steps):
    args = [sys.executable, "-m", "mqscale.train_tokenizer", "--config", "configs/mqvae/debug.yaml",
            f"data.train_url={tmp_path / 'shapes'}", "data.num_workers=0", "data.resolution=32",
            "model.resolution=32", "data.batch_size=4", "ray.num_workers=2",
            f"checkpoint.dir={tmp_path / 'storage'}", f"logging.tensorboard_dir={tmp_path / 'tb'}",
            f"train.max_steps={steps}", "checkpoint.every_steps=2", "logging.log_every=1", "logging.image_every=0"]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_two_workers_train_checkpoint_and_resume(tmp_path):
    write_shapes(str(tmp_path / "shapes"), 17, resolution=32, shard_size=16, progress=False)
    first = run(tmp_path, 4)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ckpt = re.search(r"tokenizer checkpoint: (\S+)", first.stdout).group(1)
    assert [r["world"] for r in verify_url(str(Path(ckpt).parent))] == [2, 2]   # both saves by 2 workers
    tok, cfg = TOKENIZER.load(ckpt)
    assert cfg.model.resolution == 32
    second = run(tmp_path, 6)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "at step 4" in out and "resumed from" in out
    tok, _ = TOKENIZER.load(re.search(r"tokenizer checkpoint: (\S+)", second.stdout).group(1))
    assert all(torch.isfinite(v).all() for v in tok.state_dict().values())   # padding steps added no NaN
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    steps = sorted({e.step for e in ea.Scalars("psnr")})
    assert steps == [1, 2, 3, 4, 5, 6]
    # rank 0's third batch of each epoch was all padding (4 holes), and training went on past it
    padding = {e.step: e.value for e in ea.Scalars("data/padding")}
    assert padding == {1: 0, 2: 0, 3: 4, 4: 4, 5: 4, 6: 8}
