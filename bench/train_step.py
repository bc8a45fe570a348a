"""Training-step throughput (forward + backward + AdamW) of a Stackformer config.

Prints one JSON object: tokens/s (image tokens), ms/step and achieved model FLOP/s from the
counted FLOPs per token, for fp32 and bf16 autocast, with and without activation checkpointing.

    python bench/train_step.py [--config configs/stackformer/debug.yaml] [--batch 32] [--steps 10]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds  # noqa: E402

from mqscale.models.stackformer.counting import param_count, train_flops_per_token
from mqscale.models.stackformer.model import Stackformer  # noqa: E402
from mqscale.train.config import load_train_config  # noqa: E402
from mqscale.train.optim import param_groups  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="configs/stackformer/debug.yaml")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="timed steps per setting (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = p.parse_args()
    cfg = load_train_config(ns.config).model
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


if __name__ == "__main__":
    main()
