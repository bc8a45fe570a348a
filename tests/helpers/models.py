"""Tiny Stackformer configs and random raster-ordered sequences."""
from __future__ import annotations

import torch

from mqscale.models.stackformer.model import Stackformer
from mqscale.models.stackformer.sampling import SamplingParams
from mqscale.train.config import load_train_config

DEBUG = "configs/stackformer/debug.yaml"
GREEDY = SamplingParams(temperature=0)


def model_cfg(*overrides: str):
    extra = ["train.p_uncond=0"] if "model.cond=none" in overrides else []  # no condition to drop
    return load_train_config(DEBUG, list(overrides) + extra).model


def raster_batch(cfg, batch: int, L: int | None = None, seed: int = 0):
    """Random codes, ascending positions and a condition for ``cfg``."""
    g = torch.Generator().manual_seed(seed)
    L = L or cfg.seq_len
    positions = torch.sort(torch.rand(batch, cfg.n_positions, generator=g).argsort(dim=-1)[:, :L],
                           dim=-1).values
    codes = torch.randint(0, cfg.codebook_size, (batch, L), generator=g)
    if cfg.cond == "class":
        cond = torch.randint(0, cfg.n_classes, (batch,), generator=g)
    elif cfg.cond == "text":
        cond = torch.randint(0, cfg.text_vocab_size, (batch, cfg.text_len), generator=g)
    else:
        cond = None
    return codes, positions, cond


def tiny(order="code_first", cond="class", *extra) -> Stackformer:
    """A very small Stackformer (8x8 grid, L=16, 48 codes, width 32) in eval mode."""
    cfg = model_cfg(f"model.order={order}", f"model.cond={cond}", "model.text_len=4",
                    "model.text_vocab_size=30", "model.grid=8", "model.seq_len=16",
                    "model.codebook_size=48", "model.n_embd=32", "model.n_head=2", *extra)
    return Stackformer(cfg).eval()


def conds(m, batch=3):
    return raster_batch(m.cfg, batch, seed=1)[2]


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The reference the sampler's ``draw`` must match: temperature, then top-k, then top-p
    (nucleus) on the full [B, V] logits; removed entries are -inf."""
    logits = logits / params.temperature
    if params.top_k:
        k = min(params.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        probs, order = torch.sort(torch.softmax(logits, dim=-1), dim=-1, descending=True)
        before = torch.cumsum(probs, dim=-1) - probs   # mass strictly ahead of each entry
        drop_sorted = before >= params.top_p             # the top entry always survives
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits
