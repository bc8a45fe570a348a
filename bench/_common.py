"""Helpers for bench scripts: timing by median of repeats, environment facts for the JSON, and the
demo-sized data and training runs of the fault benchmark."""
from __future__ import annotations

import io
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

from data_tools.make_shapes import write_shapes
from mqscale.models.mqvae.model import MQVAE
from mqscale.tokenize.jobs import Options
from mqscale.tokenize.pool import run as tokenize_run
from mqscale.tokenizer.config import TOKENIZER, load_tokenizer_config


def median_seconds(fn, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return statistics.median(runs), runs


def spread(runs: list[float]) -> list[float]:
    """[min, max] of the runs, rounded: the spread next to a median."""
    return [round(min(runs), 4), round(max(runs), 4)] if runs else []


def load_average() -> list[float]:
    """The 1/5/15-minute load averages (``uptime``): this machine is shared, so every figure says it."""
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
    }


ROOT = Path(__file__).resolve().parents[1]


def demo_data(d: Path) -> Path:
    """240 shapes images (4 shards), a random demo tokenizer and its token shards under ``d``."""
    write_shapes(str(d / "shapes"), 240, resolution=32, shard_size=60, progress=False)
    cfg = load_tokenizer_config("configs/mqvae/demo.yaml")
    torch.manual_seed(0)
    TOKENIZER.save(MQVAE(cfg.model).eval(), cfg, d / "tokenizer")
    tokenize_run(Options(tokenizer=str(d / "tokenizer"), input=str(d / "shapes"), output=str(d / "tokens")),
                 workers=0, progress=False)
    return d


def train(demo: Path, storage, *overrides, env=None) -> subprocess.CompletedProcess:
    """``python -m mqscale.train`` on the demo config and ``demo``'s data, the way users run it."""
    args = [sys.executable, "-m", "mqscale.train", "--config", "configs/demo.yaml",
            f"data.train_url={demo / 'tokens'}", f"logging.tokenizer={demo / 'tokenizer'}",
            f"checkpoint.dir={storage}", "logging.log_every=2", "data.batch_size=8", *overrides]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0", **(env or {})})


def members_of(shard: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(shard) as tf:
        return [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))
