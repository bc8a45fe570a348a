"""The MQ-VAE: its arguments, the model (encoder, adaptive mask, quantizer, de-mask, decoder) and the
PatchGAN discriminator its training uses."""
from mqscale.models.mqvae.args import MQVAEConfig
from mqscale.models.mqvae.model import MQVAE, Encoded

__all__ = ["MQVAEConfig", "MQVAE", "Encoded"]
