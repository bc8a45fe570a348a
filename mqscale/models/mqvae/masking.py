"""The MQ-VAE's adaptive mask (keep the top-scored cells) and adaptive de-mask (rebuild the grid).

Mask: a light scoring net rates every grid cell; the top ``keep`` cells survive. Their features
are LayerNormed and multiplied by their score, which is how the score net learns: through the
reconstruction loss, with no loss of its own. Kept cells come out in raster order (ascending
positions), the order Stackformer is trained in.

De-mask: the quantized vectors go back to their cells, a learned mask token fills every dropped
cell, and n layers of ResNet block + direction-constrained attention let information flow from
kept to dropped cells first: each layer multiplies the attention weights of a key by 1 (kept) or
``mask_init`` (dropped), and the weights of dropped keys grow as w <- sqrt(w) layer by layer.
Everything is batched gathers and scatters: no loop over images or cells.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mqscale.models.mqvae.vqgan import BOOKKEEPING, AttnBlock, ResnetBlock


@dataclass
class MaskOutput:
    features: torch.Tensor    # [B, L, codebook_dim], raster order
    positions: torch.Tensor   # [B, L] ascending cell ids
    scores: torch.Tensor      # [B, N] importance scores (random ones for the random mask)


class AdaptiveMask(nn.Module):
    def __init__(self, dim: int, grid: int, keep: int, codebook_dim: int, random: bool = False):
        super().__init__()
        self.grid, self.keep, self.random = grid, keep, random
        # The random-mask ablation draws its cells without a score net: none is built, so no
        # dead weights reach the optimizer or the export.
        self.score_net = None if random else nn.Sequential(
            nn.LayerNorm([dim, grid, grid], elementwise_affine=False),
            nn.Conv2d(dim, dim, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(dim, 1, 1),
            nn.BatchNorm2d(1),
            nn.Sigmoid(),
        )
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.pre_projection = nn.Linear(dim, codebook_dim, bias=False)

    def forward(self, h: torch.Tensor) -> MaskOutput:
        B, C, H, W = h.shape
        if self.random:  # ablation: uniform random cells, features not weighted
            scores = torch.rand(B, H * W, device=h.device)
        else:
            scores = self.score_net(h).view(B, H * W)
        with torch.profiler.record_function(BOOKKEEPING):
            positions = scores.detach().topk(self.keep, dim=1).indices.sort(dim=1).values
            kept = h.flatten(2).transpose(1, 2).gather(1, positions[..., None].expand(-1, -1, C))
            kept_scores = None if self.random else scores.gather(1, positions)[..., None]
        kept = self.norm(kept)
        if kept_scores is not None:
            kept = kept * kept_scores
        return MaskOutput(self.pre_projection(kept), positions, scores)


class DemaskLayer(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.resblock = ResnetBlock(dim)
        self.attn = AttnBlock(dim)


class Demask(nn.Module):
    def __init__(self, codebook_dim: int, out_dim: int, grid: int, n_layer: int, mask_init: float = 0.02):
        super().__init__()
        self.grid, self.mask_init = grid, mask_init
        self.mask_token = nn.Parameter(torch.empty(codebook_dim).uniform_(-1.0 / codebook_dim, 1.0 / codebook_dim))
        self.post_projection = nn.Conv2d(codebook_dim, out_dim, 1)
        self.conv_in = nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.layers = nn.ModuleList(DemaskLayer(out_dim) for _ in range(n_layer))
        self.last_resblock = ResnetBlock(out_dim)

    def scatter(self, quant: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized vectors back on the grid, mask token elsewhere: ([B, d, H, W], keep [B, N])."""
        B, L, d = quant.shape
        N = self.grid * self.grid
        with torch.profiler.record_function(BOOKKEEPING):
            full = self.mask_token.to(quant.dtype).expand(B, N, d)
            full = full.scatter(1, positions[..., None].expand(-1, -1, d), quant)
            keep = torch.zeros(B, N, device=quant.device, dtype=quant.dtype).scatter(1, positions, 1.0)
            full = full.transpose(1, 2).reshape(B, d, self.grid, self.grid)
        return full, keep

    def forward(self, quant: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, keep = self.scatter(quant, positions)
        x = self.conv_in(self.post_projection(x))
        with torch.profiler.record_function(BOOKKEEPING):
            weights = [keep + self.mask_init * (1.0 - keep)]
            for _ in range(len(self.layers) - 1):
                weights.append(weights[-1].sqrt())
        for layer, weight in zip(self.layers, weights):
            x = layer.attn(layer.resblock(x), key_weight=weight)
        return self.last_resblock(x)
