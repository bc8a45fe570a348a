"""KV-cached Algorithm 1 sampling vs full-prefix recompute (the official sampler's cost model).

Prints one JSON object. Both samplers run the same model, the same masks and the same seeded
draws; the recompute path re-runs the whole prefix every step as the official code does.
``identical_sequences_frac`` is the share of sequences both produce exactly: float rounding
differs between the two attention paths, so a draw that lands within ~1e-7 of a CDF boundary
can differ, and from then on that sequence diverges. Default: the
debug config on CPU, L = 64 and 256, several batch sizes (a step at batch 1 is dispatch-bound,
so the ratio grows with batch until both sides are compute-bound).

    python bench/sampling.py [--lengths 64,256] [--batches 1,16,64,256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds  # noqa: E402

from mqscale.models.stackformer.counting import param_count
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
    ns = p.parse_args()
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


if __name__ == "__main__":
    main()
