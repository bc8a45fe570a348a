"""Vector quantizer with an EMA codebook, restarts of unused codes and straight-through gradients.

The codebook is not trained by gradient: each training step moves every code towards the mean
of the vectors assigned to it (exponential moving average, decay 0.99), and a code whose EMA
count fell below one is restarted at a random input vector of the step. Distances are one
matmul. Under data parallelism the per-step statistics must be summed over ranks; the trainer
injects that through ``sync`` (models import no distributed package).

Padding rows (a rank whose share of the epoch ran out, an undecodable batch) come in with
weight 0: they move nothing, yet every rank still makes exactly the same collectives in the
same order, because whether to update and whether to restart are decided on summed statistics,
never on a rank's own data. Restart vectors are broadcast from the first rank together with a
flag saying whether it held any real vector; if it held none, the dead codes wait a step.

Nothing here reads a device value back to the host (a sync per step on a GPU): the decisions
are masks applied with ``torch.where``, and the restart count stays a tensor until the trainer
logs it.
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
    restarts: torch.Tensor       # codes restarted this step (0-dim long: reading it syncs the device)


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
        restarts = torch.zeros((), dtype=torch.long, device=x.device)
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
    def _ema_update(self, vectors: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """One EMA step; returns the number of restarted codes as a 0-dim tensor. No host-device
        sync: whether anything is learnt (some rank held a real vector) and which codes restart
        are masks applied with ``torch.where``, never Python branches on device values."""
        counts = torch.zeros(self.K, device=vectors.device).index_add_(0, codes, weight)
        sums = torch.zeros(self.K, self.dim, device=vectors.device).index_add_(0, codes, vectors * weight[:, None])
        if self.sync is not None:
            self.sync.all_reduce_sum(counts)
            self.sync.all_reduce_sum(sums)
        active = counts.sum() > 0   # some real vector on some rank; else nothing learns, nothing decays
        cluster_size = torch.where(active, self.cluster_size.mul(self.decay).add_(counts, alpha=1 - self.decay),
                                   self.cluster_size)
        embed_sum = torch.where(active, self.embed_sum.mul(self.decay).add_(sums, alpha=1 - self.decay),
                                self.embed_sum)
        restarts = torch.zeros((), dtype=torch.long, device=vectors.device)
        if self.restart_unused:
            # The same on every rank: cluster_size is built from summed counts. Fresh vectors are
            # drawn and broadcast at every update, dead codes or not, so the collectives never
            # depend on the data.
            fresh = torch.empty(self.K * self.dim + 1, device=vectors.device)
            fresh[:-1], held = self._random_vectors(vectors, weight > 0)
            fresh[-1] = held.float()
            if self.sync is not None:
                self.sync.broadcast_from_first(fresh)
            restart = (cluster_size < 1.0) & (fresh[-1] > 0) & active
            embed_sum = torch.where(restart[:, None], fresh[:-1].view(self.K, self.dim), embed_sum)
            cluster_size = torch.where(restart, torch.ones_like(cluster_size), cluster_size)
            restarts = restart.sum()
        n = cluster_size.sum()
        size = (cluster_size + self.eps) / (n + self.K * self.eps) * n   # Laplace smoothing
        self.embed.copy_(torch.where(active, embed_sum / size[:, None], self.embed))
        self.cluster_size.copy_(cluster_size)
        self.embed_sum.copy_(embed_sum)
        return restarts

    def _random_vectors(self, vectors: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K of the valid input vectors in random order, flattened, tiled with a little noise when
        the step has fewer than K; and whether there was any. Fixed shapes (a random permutation
        with the invalid rows sorted last, indexed modulo the valid count), so nothing waits on
        the device to learn how many rows are valid."""
        if vectors.shape[0] == 0:
            return vectors.new_zeros(self.K * self.dim), torch.zeros((), dtype=torch.bool, device=vectors.device)
        n = valid.sum()
        order = torch.rand(vectors.shape[0], device=vectors.device).masked_fill(~valid, 2.0).argsort()
        picked = vectors[order[torch.arange(self.K, device=vectors.device) % n.clamp_min(1)]]
        noise = torch.rand_like(picked) * (0.01 / self.dim ** 0.5)
        picked = torch.where(n < self.K, picked + noise, picked)
        return picked.flatten(), n > 0

    @torch.no_grad()
    def usage(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(fraction of codes used, perplexity) of a batch of code ids, as 0-dim tensors (counted
        with index_add_: CUDA's bincount reads the largest id back to the host)."""
        flat = codes.flatten()
        p = torch.zeros(self.K, device=codes.device).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float32))
        p = p / p.sum().clamp_min(1)
        used = (p > 0).float().mean()
        return used, torch.exp(-(p * torch.log(p.clamp_min(1e-10))).sum())
