"""Distributed training throughput: tokens/s and MFU of `python -m mqscale.train`, end to end.

Runs the real thing (Ray Train workers, DeepSpeed engine, streaming loader over token shards)
on synthetic token shards shaped for the config, once per worker count, and reads tokens/s and
MFU back from the run's TensorBoard events (the first logged window, which holds start-up and
compilation, is dropped; the median of the rest is reported).

MFU needs a peak. On a GPU it comes from the datasheet table (``mqscale.train.metrics``). On a
CPU there is no datasheet figure, so the peak is measured here: the bf16 matmul rate of one
worker's thread count on large square matrices, which is what a worker could reach at best.

    python bench/train.py [--config configs/stackformer/debug.yaml] [--workers 1,2] [--steps 40]
    python bench/train.py --config configs/stackformer/307m.yaml --workers 1 --gpu   # one GPU
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from mqscale.data.synthetic import token_set  # noqa: E402
from mqscale.data.tokens import TokenMeta  # noqa: E402
from mqscale.models.stackformer.counting import param_count, train_flops_per_token  # noqa: E402
from mqscale.train.config import load_train_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def cpu_peak_tflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Measured bf16 matmul TFLOP/s with ``threads`` threads: the best a CPU worker can do."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e12)
    torch.set_num_threads(before)
    return best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return ""


def read_scalars(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ea = EventAccumulator(str(tb_dir))
    ea.Reload()
    return [e.value for e in ea.Scalars(tag)] if tag in ea.Tags()["scalars"] else []


def run(cfg_path: str, tokens: Path, work: Path, workers: int, cpus: float, steps: int, log_every: int,
        peak: float, gpu: bool, extra: list[str]) -> dict:
    args = [sys.executable, "-m", "mqscale.train", "--config", cfg_path, f"data.train_url={tokens}",
            f"checkpoint.dir={work}", "checkpoint.every_steps=0", f"train.max_steps={steps}",
            f"logging.log_every={log_every}", "logging.image_every=0", "logging.tokenizer=",
            f"ray.num_workers={workers}", f"ray.cpus_per_worker={cpus}", f"ray.use_gpu={str(gpu).lower()}",
            "checkpoint.resume=never", "data.num_workers=1"]
    if peak:
        args.append(f"logging.peak_tflops={peak}")
    load_before = os.getloadavg()[0]
    t = time.perf_counter()
    r = subprocess.run(args + extra, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"training failed with {workers} worker(s):\n{(r.stdout + r.stderr)[-20000:]}")
    name = load_train_config(cfg_path).name
    tb = work / name / "tb"
    tok = read_scalars(tb, "perf/tokens_per_s")[1:]
    mfu = read_scalars(tb, "perf/mfu")[1:]
    wait = read_scalars(tb, "perf/data_wait_share")[1:]
    return {"workers": workers, "cpus_per_worker": cpus, "steps": steps, "wall_s": round(wall, 1),
            "tokens_per_s": round(statistics.median(tok), 1) if tok else None,
            "tokens_per_s_per_worker": round(statistics.median(tok) / workers, 1) if tok else None,
            "mfu": round(statistics.median(mfu), 4) if mfu else None,
            "data_wait_share": round(statistics.median(wait), 4) if wait else None,
            "peak_tflops_per_worker": peak or None,
            # a shared machine's other load skews CPU figures badly (threads spin on busy cores)
            "load_avg_1min_before": round(load_before, 2), "load_avg_1min_after": round(os.getloadavg()[0], 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stackformer/debug.yaml")
    p.add_argument("--workers", default="1,2", help="worker counts to run, comma separated")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--sequences", type=int, default=4096, help="synthetic sequences in the token shards")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker; MFU from the datasheet peak")
    p.add_argument("overrides", nargs="*", help="dotted config overrides for every run")
    ns = p.parse_args()
    cfg = load_train_config(ns.config, ns.overrides)
    m = cfg.model
    meta = TokenMeta(grid=m.grid, codebook_size=m.codebook_size, seq_len=m.seq_len, cond=m.cond,
                     n_classes=m.n_classes, tokenizer_sha256="0" * 64)
    cores = os.cpu_count() or 1
    results = []
    with tempfile.TemporaryDirectory(prefix="mqscale-bench-train-") as d:
        tokens = Path(d) / "tokens"
        token_set(str(tokens), [ns.sequences // 8] * 8, meta=meta, chunk=256)
        for w in [int(x) for x in ns.workers.split(",")]:
            cpus = 1.0 if ns.gpu else max(1.0, float(cores // w))
            peak = 0.0 if ns.gpu else cpu_peak_tflops(int(cpus))
            results.append(run(ns.config, tokens, Path(d) / f"w{w}", w, cpus, ns.steps, ns.log_every, peak,
                               ns.gpu, ns.overrides))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"bench": "train", "config": ns.config, "overrides": ns.overrides, "params": param_count(m),
                      "flops_per_token": train_flops_per_token(m), "micro_batch": cfg.data.batch_size,
                      "seq_len": m.seq_len, "zero_stage": cfg.deepspeed.zero_stage,
                      "precision": cfg.train.precision, "env": {**environment(), "cpu_model": cpu_model()},
                      "date": time.strftime("%Y-%m-%d"), "results": results}, indent=2))


if __name__ == "__main__":
    main()
