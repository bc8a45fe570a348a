"""Typed config of an MQ-VAE tokenizer run (``python -m mqscale.train_tokenizer``).

Shares the data and ray sections with the Stackformer run config, and the same loader: strict
types, ranges, one-line errors naming the key and the file. Its checkpoint and logging sections
are its own, holding only what tokenizer training reads: the cadences of logs, image grids and
checkpoints live in ``train`` (one place per setting), so a Stackformer-only key set here (e.g.
``checkpoint.every_steps``) is an unknown key, not a silently ignored one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mqscale.config import DataConfig, RayConfig, _f, load_config


@dataclass
class MQVAEConfig:
    resolution: int = _f(64, ge=8, doc="image side in pixels")
    in_channels: int = _f(3, ge=1)
    ch: int = _f(64, ge=32, doc="base channels (GroupNorm needs multiples of 32)")
    ch_mult: list[int] = _f([1, 2, 2], doc="channel multipliers per level; f = 2^(levels-1)")
    num_res_blocks: int = _f(1, ge=1)
    attn_resolutions: list[int] = _f([], doc="feature-map sides that get self-attention")
    z_channels: int = _f(0, ge=0, doc="encoder output channels; 0 = ch * ch_mult[-1]")
    dropout: float = _f(0.0, ge=0.0, lt=1.0)
    mask_ratio: float = _f(0.25, gt=0.0, le=1.0, doc="share of grid cells kept (L = ratio * grid^2)")
    mask_type: Literal["adaptive", "random"] = _f("adaptive", doc="random is the paper's ablation")
    codebook_size: int = _f(1024, ge=2)
    codebook_dim: int = _f(64, ge=1)
    ema_decay: float = _f(0.99, gt=0.0, lt=1.0)
    commitment_beta: float = _f(0.25, ge=0.0)
    restart_unused: bool = _f(True, doc="restart codes whose EMA count fell below 1")
    demask_layers: int = _f(2, ge=0, doc="ResNet + direction-constrained attention layers")
    mask_init: float = _f(0.02, gt=0.0, le=1.0, doc="initial attention weight of dropped cells")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:
        return self.resolution // self.factor

    @property
    def keep(self) -> int:
        return int(self.mask_ratio * self.grid * self.grid)

    @property
    def feature_channels(self) -> int:
        return self.ch * self.ch_mult[-1]

    @property
    def latent_channels(self) -> int:
        return self.z_channels or self.feature_channels

    def check(self, err) -> None:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            err("model.ch_mult", f"{self.ch_mult} must be a non-empty list of positive integers")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            err("model.ch", f"channels {bad} are not multiples of 32 (GroupNorm groups)")
        if self.latent_channels % 32:
            err("model.z_channels", f"{self.latent_channels} is not a multiple of 32")
        if self.resolution % self.factor:
            err("model.resolution", f"{self.resolution} is not divisible by f = {self.factor}")
        if self.keep < 1:
            err("model.mask_ratio", f"{self.mask_ratio} keeps no cell of the {self.grid}x{self.grid} grid")


@dataclass
class LossConfig:
    recon: Literal["l2", "l1"] = _f("l2", doc="pixel reconstruction loss")
    recon_weight: float = _f(1.0, ge=0.0)
    perceptual_weight: float = _f(1.0, ge=0.0, doc="LPIPS (VGG16); off when no weights are given")
    vgg_weights: str = _f("", doc="VGG16 features weights (torchvision layout; .pth or .safetensors)")
    lpips_weights: str = _f("", doc="LPIPS linear heads (lpips package vgg.pth layout)")
    disc_weight: float = _f(0.75, ge=0.0, doc="PatchGAN weight (paper: 0.75)")
    disc_start: int = _f(0, ge=0, doc="step at which the discriminator starts")
    disc_layers: int = _f(3, ge=1)
    disc_channels: int = _f(64, ge=8)
    adaptive_weight: bool = _f(True, doc="VQGAN's gradient-ratio weight for the GAN term")
    disc_weight_max: float = _f(1.0, gt=0.0, doc="cap on the GAN term's weight, min(adaptive_weight * "
                                "disc_weight, disc_weight_max) (official MQ-VAE configs: 1.0)")


@dataclass
class TokenizerOptimConfig:
    base_lr: float = _f(4.5e-6, gt=0.0, doc="per-sample lr; lr = base_lr * total batch (VQGAN)")
    scale_lr: bool = _f(True, doc="multiply base_lr by the total batch size")
    betas: tuple[float, float] = _f((0.5, 0.9))
    warmup_steps: int = _f(0, ge=0, doc="linear warmup")
    grad_clip: float = _f(0.0, ge=0.0, doc="0 disables")


@dataclass
class TokenizerTrainConfig:
    max_steps: int = _f(1000, ge=1)
    precision: Literal["fp32", "bf16"] = _f("fp32", doc="bf16 autocast")
    seed: int = _f(0, ge=0)
    log_every: int = _f(10, ge=1, doc="steps between scalar logs")
    image_every: int = _f(200, ge=0, doc="steps between image grids; 0 = only at the end")
    checkpoint_every: int = _f(0, ge=0, doc="0 = only at the end")


@dataclass
class TokenizerCheckpointConfig:
    dir: str = _f("runs", doc="run storage root (local dir or s3://...): runs live in <dir>/<name>")
    keep_last: int = _f(3, ge=2, doc="checkpoints kept (at least 2, so a damaged newest has a fallback)")
    resume: Literal["auto", "never"] = _f("auto", doc="auto resumes from the run's newest checkpoint; never "
                                          "starts at step 0 (restarts after a failure still resume)")
    storage_options: dict[str, Any] = _f({}, doc="fsspec options for the storage root (endpoint, keys)")


@dataclass
class TokenizerLoggingConfig:
    tensorboard_dir: str = _f("", doc="TensorBoard event dir; empty = <checkpoint.dir>/<name>/tb "
                              "(written locally, synced to storage when remote)")


@dataclass
class TokenizerRunConfig:
    name: str = _f("mqvae", doc="run name")
    model: MQVAEConfig = field(default_factory=MQVAEConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="images"))
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    train: TokenizerTrainConfig = field(default_factory=TokenizerTrainConfig)
    checkpoint: TokenizerCheckpointConfig = field(default_factory=TokenizerCheckpointConfig)
    logging: TokenizerLoggingConfig = field(default_factory=TokenizerLoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self, err) -> None:
        if self.data.kind == "tokens":
            err("data.kind", "a tokenizer trains on images, not tokens")
        if self.data.resolution != self.model.resolution:
            err("data.resolution", f"{self.data.resolution} differs from model.resolution={self.model.resolution}")


def load_tokenizer_config(path=None, overrides=None) -> TokenizerRunConfig:
    return load_config(path, overrides, TokenizerRunConfig)
