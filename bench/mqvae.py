"""MQ-VAE throughput on this machine and the cost of its mask/de-mask bookkeeping.

Prints one JSON object: training-step images/s (generator + discriminator, as train_tokenizer
runs it, perceptual loss off) and encode images/s, for the debug config at 64 px (16x16 grid) and
for a 256 px / 32x32 config (f8_r25's architecture) at batch 4; and the share of step time spent
in the mask and de-mask bookkeeping (selection, gathers, scatters, key weights), measured with
torch.profiler over the ops recorded under the ``mqvae.mask_bookkeeping`` label plus the backward
of gathers, scatters and expands (all of them, so an upper bound). Target: < 5%.

    python bench/mqvae.py [--steps 5]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment  # noqa: E402

from mqscale.models.mqvae.model import MQVAE  # noqa: E402
from mqscale.models.mqvae.vqgan import BOOKKEEPING  # noqa: E402
from mqscale.tokenizer.config import load_tokenizer_config  # noqa: E402
from mqscale.tokenizer.loss import VQGANLoss  # noqa: E402

# the backward of the bookkeeping's gathers and scatters runs outside the forward's label
BACKWARD = {f"autograd::engine::evaluate_function: {op}" for op in
            ("GatherBackward0", "ScatterBackward0", "ScatterBackward1", "ExpandBackward0")}


def step_fn(model, loss, opt_g, opt_d, x):
    def step():
        out = model(x)
        g, _ = loss.generator(x, out.recon, out.commit_loss, torch.ones(len(x)), 10 ** 9,
                              model.decoder.last_layer)
        opt_g.zero_grad(set_to_none=True)
        g.backward()
        opt_g.step()
        d, _ = loss.discriminator_loss(x, out.recon, torch.ones(len(x)))
        opt_d.zero_grad(set_to_none=True)
        d.backward()
        opt_d.step()
    return step


def measure(name: str, overrides: list[str], batch: int, steps: int) -> dict:
    cfg = load_tokenizer_config("configs/mqvae/debug.yaml" if name == "debug" else "configs/mqvae/f8_r25.yaml",
                                overrides + ["loss.perceptual_weight=0"])
    torch.manual_seed(0)
    model = MQVAE(cfg.model)
    loss = VQGANLoss(cfg.loss, cfg.model.in_channels)
    opt_g = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-4, betas=(0.5, 0.9))
    r = cfg.model.resolution
    x = torch.rand(batch, 3, r, r) * 2 - 1
    step = step_fn(model, loss, opt_g, opt_d, x)
    step()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    train_s = (time.perf_counter() - t) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    book = next((e.cpu_time_total for e in events if e.key == BOOKKEEPING), 0.0)
    book += sum(e.cpu_time_total for e in events if e.key in BACKWARD)  # their gradients too
    model.eval()
    with torch.no_grad():
        model.encode(x)
        t = time.perf_counter()
        for _ in range(steps):
            model.encode(x)
        enc_s = (time.perf_counter() - t) / steps
    return {"config": name, "resolution": r, "grid": cfg.model.grid, "kept": cfg.model.keep, "batch": batch,
            "params": sum(p.numel() for p in model.parameters()),
            "train_images_per_s": round(batch / train_s, 2), "train_step_s": round(train_s, 3),
            "encode_images_per_s": round(batch / enc_s, 2),
            "bookkeeping_share_of_step": round(book / total, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    ns = p.parse_args()
    results = [measure("debug", [], 8, ns.steps),
               measure("f8_r25", ["model.resolution=256", "data.resolution=256"], 4, 2)]
    print(json.dumps({"bench": "mqvae", "env": environment(), "results": results,
                      "target": "bookkeeping_share_of_step < 0.05"}, indent=2))


if __name__ == "__main__":
    main()
