"""Images/s of ``python -m mqscale.sample``'s path: KV-cached Algorithm 1 (+ decode), with and without CFG.

Prints one JSON object with three parts:

- ``end_to_end``: the debug Stackformer sized to the demo tokenizer (8x8 grid, L = 16), sampling
  and decoding through ``ImageGenerator`` (random weights: speed does not depend on them), at
  several batch sizes, with and without classifier-free guidance;
- ``length_scaling``: the debug config's sampler alone at L = 64, 128, 256 (32x32 grid): the cost
  per image should grow linearly in L (each step feeds one token; the attention over the cache is
  a small share at these lengths), i.e. ``ms_per_token`` about flat;
- on a GPU (``--config configs/stackformer/307m.yaml``), the same at batch 1, 16 and 64.

    python bench/sample.py [--config C] [--batches 1,16,64] [--lengths 64,128,256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds  # noqa: E402

from mqscale.config import load_config  # noqa: E402
from mqscale.convert.export import save_exported  # noqa: E402
from mqscale.generate import ImageGenerator, SamplingSettings  # noqa: E402
from mqscale.models import Stackformer, param_count  # noqa: E402
from mqscale.models.mqvae import MQVAE  # noqa: E402
from mqscale.sampling import SamplingParams, sample  # noqa: E402
from mqscale.tokenizer_config import load_tokenizer_config  # noqa: E402

TOPK = SamplingParams(temperature=1.0, top_k=100)


def end_to_end(batches: list[int], repeats: int, device: str) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        tcfg = load_tokenizer_config("configs/mqvae/demo.yaml")
        save_exported(MQVAE(tcfg.model).eval(), tcfg, f"{d}/tok")
        cfg = load_config("configs/demo.yaml")
        save_exported(Stackformer(cfg.model).eval(), cfg, f"{d}/model")
        gen = ImageGenerator(f"{d}/model", f"{d}/tok", device)
        for b in batches:
            cond = torch.arange(b) % cfg.model.n_classes
            for guidance in (None, 2.0):
                s = SamplingSettings(code=TOPK, pos=TOPK, guidance=guidance, batch_size=b)
                med, _ = median_seconds(lambda: list(gen.images(cond, b, s)), repeats)
                out.append({"batch": b, "cfg": guidance is not None, "seq_len": cfg.model.seq_len,
                            "images_per_s": round(b / med, 1), "ms_per_image": round(1000 * med / b, 2)})
    return out


def length_scaling(config: str, lengths: list[int], batch: int, repeats: int, device: str) -> list[dict]:
    out = []
    for L in lengths:
        cfg = load_config(config, [f"model.seq_len={L}"]).model
        torch.manual_seed(0)
        model = Stackformer(cfg).to(device).eval()
        cond = torch.zeros(batch, dtype=torch.long, device=device)
        for guidance in (None, 2.0):
            def run():
                sample(model, cond, code=TOPK, pos=TOPK, guidance=guidance,
                       generator=torch.Generator(device).manual_seed(0))
                if device == "cuda":
                    torch.cuda.synchronize()
            med, _ = median_seconds(run, repeats)
            out.append({"seq_len": L, "batch": batch, "cfg": guidance is not None, "params": param_count(cfg),
                        "images_per_s": round(batch / med, 2), "ms_per_image": round(1000 * med / batch, 2),
                        "ms_per_token": round(1000 * med / batch / L, 4)})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stackformer/debug.yaml", help="model for the length scaling")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--lengths", default="64,128,256")
    p.add_argument("--scaling-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ns = p.parse_args()
    batches = [int(b) for b in ns.batches.split(",")]
    lengths = [int(x) for x in ns.lengths.split(",")]
    scaling = length_scaling(ns.config, lengths, ns.scaling_batch, ns.repeats, ns.device)
    per_token = {r["seq_len"]: r["ms_per_token"] for r in scaling if not r["cfg"]}
    result = {"bench": "sample", "env": environment(), "end_to_end_demo_sizes": end_to_end(batches, ns.repeats, ns.device),
              "length_scaling": scaling,
              "ms_per_token_ratio_longest_vs_shortest": round(per_token[max(lengths)] / per_token[min(lengths)], 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
