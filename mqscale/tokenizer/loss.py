"""VQGAN's tokenizer objective: pixel + perceptual reconstruction, commitment, and a PatchGAN.

Generator loss = mean(recon_weight * pixel + perceptual_weight * LPIPS)
               + gan_weight * (-mean D(recon))      (from ``disc_start`` on)
               + beta * commitment,
gan_weight = min(adaptive_weight * disc_weight, disc_weight_max), as the official MQ-VAE loss
(``disc_weight_max: 1.0`` in its configs): the adaptive weight balances the GAN gradient against
the reconstruction gradient at the decoder's last layer (||grad nll|| / (||grad gan|| + 1e-4),
clamped to [0, 1e4]), and the cap keeps a near-flat GAN gradient (early in the GAN phase, when
the ratio reaches thousands) from swamping reconstruction. The discriminator trains on the hinge
loss. Per-image terms are averaged over ``weight`` (the batch mask), so padding rows never count.

Log values stay 0-dim tensors on the device: turning them into floats forces a host-device sync,
so the trainer does it once per log step, not here at every step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mqscale.models.lpips import LPIPS
from mqscale.models.mqvae.discriminator import PatchDiscriminator
from mqscale.tokenizer.config import LossConfig


def _wmean(per_image: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (per_image * weight).sum() / weight.sum().clamp_min(1.0)


class VQGANLoss(nn.Module):
    def __init__(self, cfg: LossConfig, in_channels: int = 3, lpips: LPIPS | None = None):
        super().__init__()
        self.cfg = cfg
        self.discriminator = PatchDiscriminator(in_channels, cfg.disc_channels, cfg.disc_layers)
        self.lpips = lpips if cfg.perceptual_weight > 0 else None

    def gan_active(self, step: int) -> bool:
        return self.cfg.disc_weight > 0 and step >= self.cfg.disc_start

    def generator(self, x: torch.Tensor, recon: torch.Tensor, commit: torch.Tensor, weight: torch.Tensor,
                  step: int, last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg
        diff = recon.float() - x.float()
        pixel = (diff.abs() if c.recon == "l1" else diff.pow(2)).mean(dim=(1, 2, 3))
        rec = c.recon_weight * pixel
        logs = {"loss/pixel": _wmean(pixel, weight)}
        if self.lpips is not None:
            p = self.lpips(x.float(), recon.float())
            rec = rec + c.perceptual_weight * p
            logs["loss/perceptual"] = _wmean(p, weight)
        nll = _wmean(rec, weight)
        loss = nll + commit
        logs.update({"loss/nll": nll, "loss/commit": commit})
        if self.gan_active(step):
            fake = self.discriminator(recon).mean(dim=(1, 2, 3))
            g = -_wmean(fake, weight)
            d_w = torch.ones((), device=x.device)
            if c.adaptive_weight and last_layer is not None and torch.is_grad_enabled():
                gn = torch.autograd.grad(nll, last_layer, retain_graph=True)[0].norm()
                gg = torch.autograd.grad(g, last_layer, retain_graph=True)[0].norm()
                d_w = (gn / (gg + 1e-4)).clamp(0.0, 1e4).detach()
            gan_w = (d_w * c.disc_weight).clamp_max(c.disc_weight_max)
            loss = loss + gan_w * g
            logs.update({"loss/gan_g": g, "loss/adaptive_weight": d_w, "loss/gan_weight": gan_w})
        logs["loss/total_g"] = loss
        return loss, {k: v.detach() for k, v in logs.items()}

    def discriminator_loss(self, x: torch.Tensor, recon: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        real = self.discriminator(x.detach()).mean(dim=(1, 2, 3))
        fake = self.discriminator(recon.detach()).mean(dim=(1, 2, 3))
        loss = 0.5 * (_wmean(F.relu(1.0 - real), weight) + _wmean(F.relu(1.0 + fake), weight))
        return loss, {"loss/disc": loss.detach(), "disc/logits_real": _wmean(real, weight).detach(),
                      "disc/logits_fake": _wmean(fake, weight).detach()}
