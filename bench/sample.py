"""Images/s of ``python -m mqscale.sample``'s path for one Stackformer config, with and without
classifier-free guidance, and the sampler's cost per token across L. Prints one JSON object.

The model is ``--config`` with random weights (the speed of Algorithm 1 and of decoding does not
depend on them), built in memory and driven through ``ImageGenerator`` as the sample CLI drives
it: KV-cached Algorithm 1, top-k 100 for codes and for positions, the raster constraint, bf16
autocast on a GPU (fp32 on a CPU); guidance at scale 2 runs the doubled batch.

- ``throughput``: at each batch size (``--batches``, default 1, 16, 64), without and with CFG,
  the median over ``--repeats`` of generating one batch. ``images_per_s`` times token sampling
  plus the MQ-VAE decode of the batch (to float images on the CPU: the device is synchronised);
  ``sampling_images_per_s`` the token sampling alone; ``decode_ms_per_image`` the difference.
  The tokenizer is ``--tokenizer-config`` with random weights, reshaped to the model's grid,
  codebook and L (default: the paper's f8_r25 on a GPU; on a CPU the debug MQ-VAE, whose
  decoder does not drown the sampler); ``--no-decode`` times token sampling only.
- ``length_scaling``: token sampling alone, for the same architecture at each L of
  ``--lengths`` (default 64, 128, 256), batch ``--scaling-batch``, without and with CFG.
  ``ms_per_token`` is ms per image / L; linear cost in L keeps it about flat, so
  ``ms_per_token_ratio`` (longest over shortest L) stays near 1, where a sampler that re-ran the
  prefix each step (quadratic) would approach ``quadratic_would_give`` = L_max / L_min.

    python bench/sample.py --config configs/stackformer/307m.yaml     # on a GPU
    python bench/sample.py                                             # the debug config
    python bench/sample.py --quick                                     # a smoke run in seconds on a CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, median_seconds  # noqa: E402

from mqscale.generate.generator import ImageGenerator, SamplingSettings  # noqa: E402
from mqscale.models.stackformer.counting import param_count
from mqscale.models.stackformer.model import Stackformer  # noqa: E402
from mqscale.models.stackformer.sampling import SamplingParams  # noqa: E402
from mqscale.train.config import load_train_config  # noqa: E402

TOPK = SamplingParams(temperature=1.0, top_k=100)
SCALE = 2.0
QUICK = {"batches": "1,2", "lengths": "16,32,64", "scaling_batch": 2, "repeats": 1}   # --quick: a smoke run


def run_config(path: str, overrides: list[str]):
    """The config with the condition dropout guidance needs (random weights: speed only)."""
    cfg = load_train_config(path, overrides)
    if cfg.model.cond != "none" and cfg.train.p_uncond <= 0:
        cfg = load_train_config(path, overrides + ["train.p_uncond=0.1"])
    return cfg


def build_model(cfg, device: str) -> Stackformer:
    torch.manual_seed(0)
    with torch.device(device):
        return Stackformer(cfg.model).eval()


def shaped_tokenizer(path: str, m, device: str):
    """(MQ-VAE with random weights, its config) for the model's grid, codebook and L; or
    (None, reason) where that config cannot be shaped so."""
    from mqscale.models.mqvae.model import MQVAE
    from mqscale.tokenizer.config import load_tokenizer_config
    factor = load_tokenizer_config(path).model.factor
    res = m.grid * factor
    tcfg = load_tokenizer_config(path, [f"model.resolution={res}", f"data.resolution={res}",
                                        f"model.codebook_size={m.codebook_size}",
                                        f"model.mask_ratio={m.seq_len / m.grid ** 2!r}"])
    if tcfg.model.keep != m.seq_len:
        return None, f"{path} keeps {tcfg.model.keep} cells at any ratio near L = {m.seq_len}"
    torch.manual_seed(0)
    with torch.device(device):
        return MQVAE(tcfg.model).eval(), tcfg


def conditions(m, batch: int) -> torch.Tensor | None:
    if m.cond == "class":
        return torch.arange(batch) % m.n_classes
    if m.cond == "text":
        return torch.ones(batch, m.text_len, dtype=torch.long)
    return None


def guidances(m) -> list[float | None]:
    return [None] if m.cond == "none" else [None, SCALE]


def timed(fn, device: str, repeats: int) -> float:
    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    return median_seconds(run, repeats)[0]


def throughput(gen: ImageGenerator, batches: list[int], repeats: int, device: str) -> list[dict]:
    m, out = gen.run_cfg.model, []
    for b in batches:
        cond = conditions(m, b)
        for g in guidances(m):
            s = SamplingSettings(code=TOPK, pos=TOPK, guidance=g, batch_size=b)
            t_tok = timed(lambda: list(gen.tokens(cond, b, s)), device, repeats)
            row = {"batch": b, "cfg": g is not None, "seq_len": m.seq_len,
                   "sampling_images_per_s": round(b / t_tok, 2), "sampling_ms_per_image": round(1000 * t_tok / b, 3)}
            if gen.tokenizer is not None:
                t_img = timed(lambda: list(gen.images(cond, b, s)), device, repeats)
                row.update(images_per_s=round(b / t_img, 2), ms_per_image=round(1000 * t_img / b, 3),
                           decode_ms_per_image=round(1000 * max(t_img - t_tok, 0.0) / b, 3))
            out.append(row)
    return out


def length_scaling(config: str, lengths: list[int], batch: int, repeats: int, device: str) -> dict:
    rows = []
    for L in lengths:
        cfg = run_config(config, [f"model.seq_len={L}"])
        gen = ImageGenerator.of(build_model(cfg, device), cfg, device=device)
        cond = conditions(cfg.model, batch)
        for g in guidances(cfg.model):
            s = SamplingSettings(code=TOPK, pos=TOPK, guidance=g, batch_size=batch)
            med = timed(lambda: list(gen.tokens(cond, batch, s)), device, repeats)
            rows.append({"seq_len": L, "batch": batch, "cfg": g is not None,
                         "ms_per_image": round(1000 * med / batch, 3),
                         "ms_per_token": round(1000 * med / batch / L, 5)})
        del gen
        free(device)
    lo, hi = min(lengths), max(lengths)
    per = {(r["seq_len"], r["cfg"]): r["ms_per_token"] for r in rows}
    ratio = {("cfg" if c else "no_cfg"): round(per[(hi, c)] / per[(lo, c)], 3)
             for c in {r["cfg"] for r in rows}}
    return {"batch": batch, "rows": rows, "ms_per_token_ratio": ratio, "quadratic_would_give": round(hi / lo, 3),
            "lengths": f"{lo} -> {hi}"}


def free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/stackformer/debug.yaml", help="Stackformer config (random weights)")
    p.add_argument("--tokenizer-config", default="",
                   help="MQ-VAE config for the decode (default: configs/mqvae/f8_r25.yaml on a GPU, "
                        "configs/mqvae/debug.yaml on a CPU), reshaped to the model's tokens")
    p.add_argument("--no-decode", action="store_true", help="time token sampling only")
    p.add_argument("--batches", default="1,16,64")
    p.add_argument("--lengths", default="64,128,256")
    p.add_argument("--scaling-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (figures mean nothing): batches 1,2, lengths 16,32,64, scaling batch 2, 1 repeat")
    ns = p.parse_args()
    if ns.quick:
        for k, v in QUICK.items():
            setattr(ns, k, v)
    batches = [int(b) for b in str(ns.batches).split(",")]
    lengths = [int(x) for x in str(ns.lengths).split(",")]

    cfg = run_config(ns.config, [])
    tok_path = ns.tokenizer_config or f"configs/mqvae/{'f8_r25' if ns.device == 'cuda' else 'debug'}.yaml"
    tokenizer, tcfg, tok_note = None, None, "not used (--no-decode)"
    if not ns.no_decode:
        tokenizer, tcfg = shaped_tokenizer(tok_path, cfg.model, ns.device)
        if tokenizer is None:
            tok_note, tcfg = tcfg, None
        else:
            tok_note = {"config": tok_path, "resolution": tcfg.model.resolution, "grid": tcfg.model.grid,
                        "keep": tcfg.model.keep, "params": sum(q.numel() for q in tokenizer.parameters())}
    gen = ImageGenerator.of(build_model(cfg, ns.device), cfg, tokenizer, tcfg, ns.device)
    t0 = time.perf_counter()
    rates = throughput(gen, batches, ns.repeats, ns.device)
    del gen, tokenizer
    free(ns.device)
    result = {
        "bench": "sample", "date": time.strftime("%Y-%m-%d %H:%M"), "env": environment(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "config": ns.config, "params": param_count(cfg.model), "seq_len": cfg.model.seq_len,
        "cond": cfg.model.cond, "device": ns.device, "precision": "bf16 autocast" if ns.device == "cuda" else "fp32",
        "quick": ns.quick, "repeats": ns.repeats, "guidance_scale": SCALE,
        "sampling": "top-k 100 (codes and positions), raster",
        "timed": ("images_per_s: one batch of token sampling (KV-cached Algorithm 1) + MQ-VAE decode to CPU images; "
                  "sampling_images_per_s: token sampling alone; length_scaling: token sampling alone; "
                  "median of repeats after one warm-up, device synchronised; model built in memory (no load)"),
        "tokenizer": tok_note,
        "throughput": rates,
        "length_scaling": length_scaling(ns.config, lengths, ns.scaling_batch, ns.repeats, ns.device),
    }
    result["timing_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
