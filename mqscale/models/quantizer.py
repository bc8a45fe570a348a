"""Vector quantizer with an EMA codebook, restarts of unused codes and straight-through gradients.

The codebook is not trained by gradient: each training step moves every code towards the mean
of the vectors assigned to it (exponential moving average, decay 0.99), and a code whose EMA
count fell below one is restarted at a random input vector of the step. Distances are one
matmul. Under data parallelism the per-step statistics must be summed over ranks; the trainer
injects that through ``sync`` (models stay free of torch.distributed).

Padding rows (a rank whose share of the epoch ran out, an undecodable batch) come in with
weight 0: they move nothing, yet every rank still makes exactly the same collectives in the
same order, because whether to update and whether to restart are decided on summed statistics,
never on a rank's own data. Restart vectors are broadcast from the first rank together with a
flag saying whether it held any real vector; if it held none, the dead codes wait a step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F


class StatSync(Protocol):
    def all_reduce_sum(self, t: torch.Tensor) -> None: ...
    def broadcast_from_first(self, t: torch.Tensor) -> None: ...


@dataclass
class QuantOutput:
    quantized: torch.Tensor      # straight-through vectors, same shape as the input
    codes: torch.Tensor          # [...] code ids
    commit_loss: torch.Tensor    # beta * ||x - sg(q)||^2 (mean)
    restarts: int = 0            # codes restarted this step


class EMAQuantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int, decay: float = 0.99, beta: float = 0.25,
                 restart_unused: bool = True, eps: float = 1e-5):
        super().__init__()
        self.K, self.dim, self.decay, self.beta, self.eps = codebook_size, dim, decay, beta, eps
        self.restart_unused = restart_unused
        init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.register_buffer("embed", init)                       # the codebook [K, d]
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", init.clone())
        self.sync: StatSync | None = None

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Code ids of the nearest codes to x [..., d], by ||x||^2 - 2 x.e + ||e||^2 in one addmm."""
        flat = x.reshape(-1, self.dim).float()
        e = self.embed.float()
        d = torch.addmm((flat * flat).sum(1, keepdim=True) + (e * e).sum(1)[None], flat, e.t(), alpha=-2.0)
        return d.argmin(dim=1).view(x.shape[:-1])

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        return F.embedding(codes, self.embed)

    def forward(self, x: torch.Tensor, update: bool | None = None,
                weight: torch.Tensor | None = None) -> QuantOutput:
        """x [..., d] -> quantized [..., d] (straight-through), codes [...]. The EMA moves when
        ``update`` (default: in training mode). ``weight`` (broadcastable to x.shape[:-1], e.g.
        [B, 1] for per-image weights) scales each vector's share of the EMA statistics and of
        the commitment loss: padding weighs 0. Under ``sync`` every rank must make the call
        with the same ``update``, whatever its weights."""
        codes = self.nearest(x.detach())
        q = self.lookup(codes).to(x.dtype)  # this step's codebook; the EMA moves it afterwards
        w = None if weight is None else weight.to(x.device, torch.float32).expand(x.shape[:-1])
        restarts = 0
        if self.training if update is None else update:
            flat_w = torch.ones(codes.numel(), device=x.device) if w is None else w.reshape(-1)
            restarts = self._ema_update(x.detach().reshape(-1, self.dim).float(), codes.reshape(-1), flat_w)
        if w is None:
            commit = self.beta * F.mse_loss(x, q.detach())
        else:
            per_vector = (x.float() - q.detach().float()).pow(2).mean(-1)
            commit = self.beta * (per_vector * w).sum() / w.sum().clamp_min(1.0)
        return QuantOutput(x + (q - x).detach(), codes, commit, restarts)

    @torch.no_grad()
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor) -> int:
        counts = torch.zeros(self.K, device=vectors.device).index_add_(0, codes, weight)
        sums = torch.zeros(self.K, self.dim, device=vectors.device).index_add_(0, codes, vectors * weight[:, None])
        if self.sync is not None:
            self.sync.all_reduce_sum(counts)
            self.sync.all_reduce_sum(sums)
        if not counts.sum() > 0:   # no real vector on any rank: nothing to learn, nothing decays
            return 0
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        restarts = 0
        if self.restart_unused:
            dead = self.cluster_size < 1.0
            if dead.any():   # the same on every rank: cluster_size is built from summed counts
                pool = vectors[weight > 0]
                fresh = torch.zeros(self.K * self.dim + 1, device=vectors.device)
                if pool.shape[0]:
                    fresh[:-1] = self._random_vectors(pool).flatten()
                    fresh[-1] = 1.0
                if self.sync is not None:
                    self.sync.broadcast_from_first(fresh)
                if fresh[-1] > 0:
                    restarts = int(dead.sum())
                    self.embed_sum[dead] = fresh[:-1].view(self.K, self.dim)[dead]
                    self.cluster_size[dead] = 1.0
        n = self.cluster_size.sum()
        size = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n   # Laplace smoothing
        self.embed.copy_(self.embed_sum / size[:, None])
        return restarts

    def _random_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        """K input vectors in random order, tiled with a little noise when the step has fewer."""
        n = vectors.shape[0]
        if n < self.K:
            reps = (self.K + n - 1) // n
            vectors = vectors.repeat(reps, 1)
            vectors = vectors + torch.rand_like(vectors) * (0.01 / self.dim ** 0.5)
        return vectors[torch.randperm(vectors.shape[0], device=vectors.device)[: self.K]]

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> tuple[float, float]:
        """(fraction of codes used, perplexity) of a batch of code ids."""
        p = torch.bincount(codes.flatten(), minlength=self.K).float()
        p = p / p.sum().clamp_min(1)
        used = (p > 0).float().mean().item()
        return used, torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum()).item()
