"""The typed config of an MQ-VAE tokenizer run (``python -m mqscale.train_tokenizer``), and its export kind.

Sections: ``model`` (the MQ-VAE's arguments, ``models/mqvae/args.py``), ``loss``, ``data``,
``optim``, ``train``, and the ``checkpoint``, ``logging`` and ``ray`` sections a Stackformer run
has too (``core``), with the same keys for the same things. Every checkpoint of a tokenizer run is
a complete export: ``TOKENIZER`` loads it (or a ``mqscale.convert official-mqvae`` output) wherever
a tokenizer is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from mqscale.core.artifact import ArtifactKind
from mqscale.core.checkpoint import CheckpointConfig
from mqscale.core.config import load_config, setting
from mqscale.core.ray import RayConfig
from mqscale.core.tensorboard import LoggingConfig
from mqscale.data.config import DataConfig
from mqscale.models.mqvae.args import MQVAEConfig
from mqscale.models.mqvae.model import MQVAE


@dataclass
class LossConfig:
    recon: Literal["l2", "l1"] = setting("l2", doc="pixel reconstruction loss")
    recon_weight: float = setting(1.0, ge=0.0)
    perceptual_weight: float = setting(1.0, ge=0.0, doc="LPIPS (VGG16); off when no weights are given")
    vgg_weights: str = setting("", doc="VGG16 features weights (torchvision layout; .pth or .safetensors)")
    lpips_weights: str = setting("", doc="LPIPS linear heads (lpips package vgg.pth layout)")
    disc_weight: float = setting(0.75, ge=0.0, doc="PatchGAN weight (paper: 0.75)")
    disc_start: int = setting(0, ge=0, doc="step at which the discriminator starts")
    disc_layers: int = setting(3, ge=1)
    disc_channels: int = setting(64, ge=8)
    adaptive_weight: bool = setting(True, doc="VQGAN's gradient-ratio weight for the GAN term")
    disc_weight_max: float = setting(1.0, gt=0.0, doc="cap on the GAN term's weight, min(adaptive_weight * "
                                "disc_weight, disc_weight_max) (official MQ-VAE configs: 1.0)")


@dataclass
class TokenizerOptimConfig:
    base_lr: float = setting(4.5e-6, gt=0.0, doc="per-sample lr; lr = base_lr * total batch (VQGAN)")
    scale_lr: bool = setting(True, doc="multiply base_lr by the total batch size")
    betas: tuple[float, float] = setting((0.5, 0.9))
    warmup_steps: int = setting(0, ge=0, doc="linear warmup")
    cosine_floor: float = setting(1.0, gt=0.0, le=1.0, doc="after warmup, cosine decay to this fraction of the lr "
                                  "at train.max_steps; 1 = constant (VQGAN)")
    grad_clip: float = setting(0.0, ge=0.0, doc="0 disables")


@dataclass
class TokenizerTrainConfig:
    max_steps: int = setting(1000, ge=1)
    precision: Literal["fp32", "bf16"] = setting("fp32", doc="bf16 autocast")
    seed: int = setting(0, ge=0)


@dataclass
class TokenizerRunConfig:
    name: str = setting("mqvae", doc="run name")
    model: MQVAEConfig = field(default_factory=MQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="images", resolution=64))  # = model's
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=lambda: LoggingConfig(image_every=200))
    ray: RayConfig = field(default_factory=RayConfig)

    # the cadences once had names of their own here; they now read as in a Stackformer run
    RENAMED: ClassVar[dict[str, str]] = {"train.checkpoint_every": "checkpoint.every_steps",
                                         "train.log_every": "logging.log_every",
                                         "train.image_every": "logging.image_every"}
    PATHS: ClassVar[tuple[str, ...]] = ("data.train_url", "data.val_url", "checkpoint.dir", "checkpoint.resume_from",
                                        "logging.tensorboard_dir", "loss.vgg_weights", "loss.lpips_weights")

    def check(self, err) -> None:
        if self.data.kind == "tokens":
            err("data.kind", "a tokenizer trains on images, not tokens")
        if self.data.resolution != self.model.resolution:
            err("data.resolution", f"{self.data.resolution} differs from model.resolution={self.model.resolution}")


def load_tokenizer_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TokenizerRunConfig:
    return load_config(path, overrides, TokenizerRunConfig)


TOKENIZER = ArtifactKind("mqscale-mqvae/1", TokenizerRunConfig, lambda c: MQVAE(c.model), "an MQ-VAE tokenizer")
