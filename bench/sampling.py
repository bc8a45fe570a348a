"""KV-cached Algorithm 1 sampling vs full-prefix recompute (the official sampler's cost model).

Prints one JSON object. Both samplers run the same model, the same masks and the same seeded
draws; the recompute path re-runs the whole prefix every step as the official code does.
``identical_sequences_frac`` is the share of sequences both produce exactly: float rounding
differs between the two attention paths, so a draw that lands within ~1e-7 of a CDF boundary
can differ, and from then on that sequence diverges. Default: the
debug config on CPU, L = 64 and 256, several batch sizes (a step at batch 1 is dispatch-bound,
so the ratio grows with batch until both sides are compute-bound).

    python bench/sampling.py [--lengths 64,256] [--batches 1,16,64,256] [--repeats 3]

``--compiled`` measures the compiled decoder (``models/stackformer/decode.py``) against the eager
KV-cached sampler instead, paired in one process (eager and compiled runs alternate, so load
drift hits both), greedy and seeded top-k; the compile time is reported apart. The issue-14
speed config (6 code + 2 position layers, width 256, 8 heads, K = 1024, class-conditional) at
B = 16, L = 64 (16x16 grid) and B = 8, L = 256 (32x32 grid):

    python bench/sampling.py --compiled --config configs/stackformer/small.yaml --cases 64x16:16,256x32:8
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, load_average, median_seconds, spread  # noqa: E402

from mqscale.models.stackformer.counting import param_count  # noqa: E402
from mqscale.models.stackformer.decode import CompiledDecoder, bf16_matmul  # noqa: E402
from mqscale.models.stackformer.model import Stackformer  # noqa: E402
from mqscale.models.stackformer.sampling import SamplingParams, sample, sample_recompute  # noqa: E402
from mqscale.train.config import load_train_config  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/stackformer/debug.yaml")
    p.add_argument("--lengths", default="64,256")
    p.add_argument("--batches", default="1,16,64,256")
    p.add_argument("--max-recompute-batch-at-256", type=int, default=64,
                   help="recompute at L=256 is slow on CPU; larger batches are skipped there")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiled", action="store_true", help="eager vs compiled decoding, paired")
    p.add_argument("--cases", default="64x16:16,256x32:8", help="with --compiled: LxGRID:BATCH, ...")
    p.add_argument("--samplings", default="greedy,top_k", help="with --compiled: greedy, top_k or both")
    p.add_argument("--dtypes", default="fp32,bf16", help="with --compiled: decoder weights (bf16 where the "
                   "hardware has bf16 matmul); eager runs in the first one (bf16: autocast)")
    ns = p.parse_args()
    if ns.compiled:
        return compiled_vs_eager(ns)
    results = []
    for L in [int(x) for x in ns.lengths.split(",")]:
        cfg = load_train_config(ns.config, [f"model.seq_len={L}"]).model
        torch.manual_seed(0)
        model = Stackformer(cfg).to(ns.device).eval()
        params = SamplingParams(temperature=1.0, top_k=100)
        for B in [int(x) for x in ns.batches.split(",")]:
            if L >= 256 and B > ns.max_recompute_batch_at_256:
                continue
            cond = torch.arange(B, device=ns.device) % cfg.n_classes

            def run(fn):
                g = torch.Generator(ns.device).manual_seed(0)
                out = fn(model, cond, code=params, pos=params, generator=g)
                if ns.device == "cuda":
                    torch.cuda.synchronize()
                return out
            cached, cached_runs = median_seconds(lambda: run(sample), ns.repeats)
            rec_repeats = ns.repeats if cached * 30 * ns.repeats < 60 else 1
            recompute, rec_runs = median_seconds(lambda: run(sample_recompute), rec_repeats, warmup=0)
            (ca, pa), (cb, pb) = run(sample), run(sample_recompute)
            same = ((ca == cb).all(dim=1) & (pa == pb).all(dim=1)).float().mean().item()
            results.append({
                "L": L, "batch": B,
                "cached_s": round(cached, 4), "recompute_s": round(recompute, 4),
                "speedup": round(recompute / cached, 1),
                "cached_tokens_per_s": round(B * L / cached, 1),
                "identical_sequences_frac": round(same, 4),
                "runs": {"cached": [round(x, 4) for x in cached_runs],
                         "recompute": [round(x, 4) for x in rec_runs]},
            })
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({
        "bench": "sampling", "config": ns.config, "params": param_count(cfg),
        "env": environment(), "results": results,
        "target": ">= 20x at L=64",
        "target_met_at_batches_L64": [r["batch"] for r in results if r["L"] == 64 and r["speedup"] >= 20],
    }, indent=2))


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def compiled_vs_eager(ns) -> None:
    """Eager and compiled decoding of the same model, alternating run by run; fp32 and, where
    the hardware has bf16 matmul, bf16 weights; the compile time apart."""
    results = []
    load_before = load_average()
    for case in ns.cases.split(","):
        shape, B = case.split(":")
        L, grid = (int(x) for x in shape.split("x"))
        B = int(B)
        cfg = load_train_config(ns.config, [f"model.seq_len={L}", f"model.grid={grid}"]).model
        torch.manual_seed(0)
        model = Stackformer(cfg).to(ns.device).eval()
        cond = torch.arange(B, device=ns.device) % cfg.n_classes
        dtypes = ns.dtypes.split(",")
        amp = torch.autocast(ns.device, dtype=torch.bfloat16, enabled=dtypes[0] == "bf16")
        for name, params in (("greedy", SamplingParams(temperature=0.0)),
                             ("top_k", SamplingParams(temperature=1.0, top_k=100))):
            if name not in ns.samplings.split(","):
                continue

            def gen():
                return torch.Generator(ns.device).manual_seed(0)

            def eager():
                with amp:
                    out = sample(model, cond, code=params, pos=params, generator=gen())
                _sync(ns.device)
                return out
            decoders = {}
            if "fp32" in dtypes:
                decoders["fp32"] = CompiledDecoder(model, B, L, code=params, pos=params)
            if "bf16" in dtypes and bf16_matmul(torch.device(ns.device)):
                decoders["bf16"] = CompiledDecoder(model, B, L, code=params, pos=params, dtype=torch.bfloat16)
            runs = {"eager": [], **{k: [] for k in decoders}}
            ref = eager()
            for _ in range(ns.repeats + 1):  # the first round is a warm-up, dropped
                for k in runs:
                    t = time.perf_counter()
                    eager() if k == "eager" else decoders[k].sample(cond, gen())
                    _sync(ns.device)
                    runs[k].append(time.perf_counter() - t)
            row = {"L": L, "grid": grid, "batch": B, "sampling": name, "eager_dtype": dtypes[0]}
            for k, r in runs.items():
                row[f"{k}_s"] = round(statistics.median(r[1:]), 4)
                row[f"{k}_spread_s"] = spread(r[1:])
                row[f"{k}_images_per_s"] = round(B / row[f"{k}_s"], 2)
            for k, d in decoders.items():
                codes, pos = d.sample(cond, gen())
                row[f"compile_{k}_s"] = round(d.compile_s, 1)
                row[f"speedup_{k}"] = round(row["eager_s"] / row[f"{k}_s"], 2)
                row[f"identical_sequences_frac_{k}"] = round(
                    ((codes == ref[0]).all(1) & (pos == ref[1]).all(1)).float().mean().item(), 4)
            row["runs"] = {k: [round(x, 4) for x in r[1:]] for k, r in runs.items()}
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    print(json.dumps({
        "bench": "sampling_compiled", "config": ns.config, "params": param_count(cfg), "env": environment(),
        "load_average": {"before": load_before, "after": load_average()}, "results": results,
        "targets_s": {"L=64,B=16": 0.32, "L=256,B=8": 0.67},
        "note": "eager = KV-cached sample(); fp32/bf16 = CompiledDecoder with those weights; compile_* apart",
    }, indent=2))


if __name__ == "__main__":
    main()
