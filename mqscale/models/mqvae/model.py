"""MQ-VAE: encoder -> adaptive mask -> EMA vector quantizer -> adaptive de-mask -> decoder.

Images are float tensors in [-1, 1], [B, C, H, W]. ``encode`` gives codes and raster-ordered
positions (what pre-tokenization stores and Stackformer models), ``decode`` turns them back into
images, and ``forward`` is the training call (reconstruction plus the commitment loss).
``encode``/``decode``/``reconstruct`` are inference whatever the module's mode: they run in eval
mode (BatchNorm running statistics, no dropout) and leave every buffer as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from mqscale.models.mqvae.args import MQVAEConfig
from mqscale.models.mqvae.masking import AdaptiveMask, Demask
from mqscale.models.mqvae.quantizer import EMAQuantizer
from mqscale.models.mqvae.vqgan import Decoder, Encoder


@dataclass
class Encoded:
    codes: torch.Tensor       # [B, L]
    positions: torch.Tensor   # [B, L], ascending
    scores: torch.Tensor      # [B, grid, grid] importance map


@dataclass
class MQVAEOutput:
    recon: torch.Tensor
    commit_loss: torch.Tensor
    encoded: Encoded
    restarts: torch.Tensor    # 0-dim: codes restarted this step (a tensor, so reading it is the caller's sync)


class MQVAE(nn.Module):
    def __init__(self, cfg: MQVAEConfig):
        super().__init__()
        self.cfg = cfg
        common = dict(ch=cfg.ch, ch_mult=list(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                      full_res_blocks=cfg.full_res_blocks,
                      attn_resolutions=list(cfg.attn_resolutions), resolution=cfg.resolution,
                      dropout=cfg.dropout)
        self.encoder = Encoder(in_channels=cfg.in_channels, z_channels=cfg.latent_channels, **common)
        self.masker = AdaptiveMask(cfg.latent_channels, cfg.grid, cfg.keep, cfg.codebook_dim,
                                   random=cfg.mask_type == "random")
        self.quantize = EMAQuantizer(cfg.codebook_size, cfg.codebook_dim, cfg.ema_decay,
                                     cfg.commitment_beta, cfg.restart_unused)
        self.demasker = Demask(cfg.codebook_dim, cfg.feature_channels, cfg.grid, cfg.demask_layers, cfg.mask_init)
        self.decoder = Decoder(out_channels=cfg.in_channels, **common)

    def check_images(self, x: torch.Tensor, finite: bool = True) -> None:
        """Shape checks always; ``finite`` also scans the values, which reads a device value back
        to the host (a sync): the training forward skips it, its images come from uint8."""
        c, r = self.cfg.in_channels, self.cfg.resolution
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"images must be [B, {c}, {r}, {r}], got {tuple(x.shape)} "
                             f"(channel count {x.shape[1] if x.ndim == 4 else '?'})")
        if x.shape[2:] != (r, r):
            raise ValueError(f"images are {x.shape[2]}x{x.shape[3]}; this tokenizer's config is {r}x{r}")
        if finite and not torch.isfinite(x).all():
            raise ValueError("images contain NaN or infinite values")

    def _encode(self, x: torch.Tensor, update: bool | None = None, weight: torch.Tensor | None = None,
                finite: bool = True):
        self.check_images(x, finite)
        m = self.masker(self.encoder(x))
        q = self.quantize(m.features, update=update, weight=None if weight is None else weight[:, None])
        g = self.cfg.grid
        return q, Encoded(q.codes, m.positions, m.scores.detach().view(-1, g, g))

    def forward(self, x: torch.Tensor, update: bool | None = None,
                weight: torch.Tensor | None = None) -> MQVAEOutput:
        """Training call; ``update=False`` keeps the EMA codebook still (default: in training).
        ``weight`` [B] weighs each image in the codebook update and the commitment loss
        (padding rows: 0). Images are not scanned for NaN here (see ``check_images``)."""
        q, enc = self._encode(x, update, weight, finite=False)
        recon = self.decoder(self.demasker(q.quantized, enc.positions))
        return MQVAEOutput(recon, q.commit_loss, enc, q.restarts)

    @contextmanager
    def _inference(self):
        """Eval mode for one call, then each submodule's own mode back: an encode in the middle of
        training must neither move the score net's BatchNorm statistics nor depend on the batch."""
        modes = [(m, m.training) for m in self.modules()]
        self.eval()
        try:
            yield
        finally:
            for m, training in modes:
                m.training = training

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> Encoded:
        with self._inference():
            return self._encode(x, update=False)[1]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Images from codes [B, L] at cells ``positions`` [B, L] (any order, distinct per row).

        L need not be ``cfg.keep``: any 1 <= L <= grid^2 decodes, since the de-masker's keep mask
        is built from the positions themselves. Reconstruction evaluation at another kept count
        and a sampler run with its own ``seq_len`` rely on that; quality is best at the L the
        tokenizer was trained with. A repeated cell is refused: scattering two vectors into one
        cell keeps an unspecified one of them."""
        with self._inference():
            return self._decode(codes, positions)

    def _decode(self, codes: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        G, K = self.cfg.grid ** 2, self.cfg.codebook_size
        if codes.shape != positions.shape or codes.ndim != 2:
            raise ValueError(f"codes {tuple(codes.shape)} and positions {tuple(positions.shape)} must be [B, L]")
        if codes.dtype.is_floating_point or positions.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes ({codes.dtype}) and positions ({positions.dtype}) must be integer tensors")
        L = codes.shape[1]
        if not 1 <= L <= G:
            raise ValueError(f"decode needs 1 to {G} positions per image (the {self.cfg.grid}x{self.cfg.grid} "
                             f"grid), got L = {L}")
        if ((positions < 0) | (positions >= G)).any() or ((codes < 0) | (codes >= K)).any():
            raise ValueError(f"positions must lie in [0, {G}) and codes in [0, {K})")
        ordered = positions.sort(dim=1).values
        repeated = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if repeated.any():
            raise ValueError(f"positions repeat a cell within a row (rows {repeated.nonzero().flatten().tolist()[:5]}): "
                             f"each row's positions must be distinct cells")
        return self.decoder(self.demasker(self.quantize.lookup(codes), positions))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        enc = self.encode(x)
        return self.decode(enc.codes, enc.positions)
