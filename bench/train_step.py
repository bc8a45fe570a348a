"""Training-step throughput (forward + backward + AdamW) of a Stackformer config.

Prints one JSON object: tokens/s (image tokens), ms/step and achieved model FLOP/s from the
counted FLOPs per token, for fp32 and bf16 autocast, with and without activation checkpointing.

    python bench/train_step.py [--config configs/stackformer/debug.yaml] [--batch 32] [--steps 10]

``--compiled`` measures instead the eager step (torch AdamW as before) against the compiled one
(``torch.compile(dynamic=False)`` of the model, what ``model.compile`` does inside the DeepSpeed
engine, plus the fused AdamW the engine now builds), fp32 and bf16, steps alternating between
the two so load drift hits both; compile time apart. The issue-14 config at B = 16, L = 64:

    python bench/train_step.py --compiled --config configs/stackformer/small.yaml --batch 16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, load_average, median_seconds, spread  # noqa: E402

from mqscale.models.stackformer.counting import param_count, train_flops_per_token  # noqa: E402
from mqscale.models.stackformer.model import Stackformer  # noqa: E402
from mqscale.train.config import load_train_config  # noqa: E402
from mqscale.train.metrics import device_peak_tflops  # noqa: E402
from mqscale.train.optim import param_groups  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/stackformer/debug.yaml")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compiled", action="store_true", help="eager vs compiled + fused AdamW, paired")
    p.add_argument("--precisions", default="fp32,bf16", help="with --compiled: fp32, bf16 or both")
    ns = p.parse_args()
    cfg = load_train_config(ns.config).model
    if ns.compiled:
        return compiled_vs_eager(ns, cfg)
    flops_tok = train_flops_per_token(cfg)
    results = []
    for precision in ("fp32", "bf16"):
        for ckpt in (False, True):
            torch.manual_seed(0)
            model = Stackformer(cfg).to(ns.device).train()
            model.set_activation_checkpointing(ckpt)
            opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95))
            g = torch.Generator().manual_seed(0)
            pos = torch.sort(torch.rand(ns.batch, cfg.n_positions, generator=g).argsort(-1)[:, :cfg.seq_len], -1).values
            codes = torch.randint(0, cfg.codebook_size, pos.shape, generator=g)
            cond = torch.randint(0, cfg.n_classes, (ns.batch,), generator=g)
            codes, pos, cond = codes.to(ns.device), pos.to(ns.device), cond.to(ns.device)
            amp = (torch.autocast(ns.device, dtype=torch.bfloat16) if precision == "bf16"
                   else contextlib.nullcontext())

            def step():
                with amp:
                    loss = model(codes, pos, cond=cond).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ns.device == "cuda":
                    torch.cuda.synchronize()
            sec, _ = median_seconds(step, ns.steps, warmup=2)
            tok_s = ns.batch * cfg.seq_len / sec
            results.append({"precision": precision, "activation_checkpointing": ckpt,
                            "ms_per_step": round(sec * 1e3, 2), "tokens_per_s": round(tok_s, 1),
                            "model_tflops": round(tok_s * flops_tok / 1e12, 4)})
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"bench": "train_step", "config": ns.config, "params": param_count(cfg),
                      "batch": ns.batch, "seq_len": cfg.seq_len, "flops_per_token": flops_tok,
                      "env": environment(), "results": results}, indent=2))


def _batch(cfg, batch: int, device: str):
    g = torch.Generator().manual_seed(0)
    pos = torch.sort(torch.rand(batch, cfg.n_positions, generator=g).argsort(-1)[:, :cfg.seq_len], -1).values
    codes = torch.randint(0, cfg.codebook_size, pos.shape, generator=g)
    cond = torch.randint(0, cfg.n_classes, (batch,), generator=g)
    return codes.to(device), pos.to(device), cond.to(device)


def compiled_vs_eager(ns, cfg) -> None:
    flops_tok = train_flops_per_token(cfg)
    codes, pos, cond = _batch(cfg, ns.batch, ns.device)
    results, load_before = [], load_average()
    peak = device_peak_tflops()  # a GPU's dense bf16 datasheet peak; None on a CPU
    for precision in ns.precisions.split(","):
        amp = (torch.autocast(ns.device, dtype=torch.bfloat16) if precision == "bf16"
               else contextlib.nullcontext())
        steps = {}
        for kind in ("eager", "compiled"):
            torch.manual_seed(0)
            model = Stackformer(cfg).to(ns.device).train()
            fused = {"fused": True} if kind == "compiled" else {}
            opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, betas=(0.9, 0.95), **fused)
            fwd = torch.compile(model, dynamic=False) if kind == "compiled" else model

            def step(fwd=fwd, opt=opt):
                with amp:
                    loss = fwd(codes, pos, cond=cond).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if ns.device == "cuda":
                    torch.cuda.synchronize()
                return loss.item()
            t = time.perf_counter()
            first = [step(), step()]  # the compile (forward, backward) happens in the first
            steps[kind] = (step, time.perf_counter() - t, first)
        runs = {k: [] for k in steps}
        for _ in range(ns.steps):
            for k, (fn, _, _) in steps.items():
                t = time.perf_counter()
                fn()
                runs[k].append(time.perf_counter() - t)
        row = {"precision": precision, "batch": ns.batch, "seq_len": cfg.seq_len}
        for k, r in runs.items():
            med = statistics.median(r)
            row[f"{k}_ms"] = round(med * 1e3, 1)
            row[f"{k}_spread_ms"] = [round(x * 1e3, 1) for x in spread(r)]
            row[f"{k}_model_tflops"] = round(ns.batch * cfg.seq_len / med * flops_tok / 1e12, 4)
            if peak and precision == "bf16":
                row[f"{k}_mfu"] = round(row[f"{k}_model_tflops"] / peak, 4)
        row["speedup"] = round(row["eager_ms"] / row["compiled_ms"], 2)
        row["compile_and_first_two_steps_s"] = round(steps["compiled"][1], 1)
        row["first_losses"] = {k: [round(x, 5) for x in v[2]] for k, v in steps.items()}
        row["runs_ms"] = {k: [round(x * 1e3, 1) for x in r] for k, r in runs.items()}
        results.append(row)
        print(json.dumps(row), file=sys.stderr)
    print(json.dumps({"bench": "train_step_compiled", "config": ns.config, "params": param_count(cfg),
                      "flops_per_token": flops_tok, "env": environment(),
                      "load_average": {"before": load_before, "after": load_average()}, "results": results,
                      "peak_bf16_tflops": peak, "target_ms_fp32": 295, "before_ms_fp32_issue": 384}, indent=2))


if __name__ == "__main__":
    main()
