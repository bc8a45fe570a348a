"""AdamW parameter groups and the learning-rate schedule (warmup, then cosine to a floor).

Why here: the decay/no-decay split and the schedule are part of the recipe (the paper: AdamW
betas 0.9/0.95, weight decay 0.01, cosine to 0.0005 of the peak), shared by every engine.
"""
from __future__ import annotations

import math

import torch.nn as nn

from mqscale.train.config import OptimConfig


def full_shape(p: nn.Parameter) -> tuple[int, ...]:
    """A parameter's shape, also under ZeRO-3, where ``deepspeed.zero.Init`` has replaced its data by
    an empty tensor and keeps the real shape in ``ds_shape``."""
    return tuple(getattr(p, "ds_shape", p.shape))


def n_params(model: nn.Module) -> int:
    """Parameters of ``model``, counted whole also when ZeRO-3 has partitioned them (``ds_numel``)."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrix weights only; biases, norms, embeddings and the absolute table are exempt."""
    no_decay_modules = (nn.LayerNorm, nn.Embedding)
    decay, no_decay = [], []
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            exempt = isinstance(mod, no_decay_modules) or name == "bias" or len(full_shape(p)) < 2
            (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from lr down to lr * min_lr_ratio."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
