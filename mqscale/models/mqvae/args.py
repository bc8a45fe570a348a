"""The MQ-VAE's arguments: the ``model`` section of a tokenizer run config.

``check`` refuses what the architecture cannot build (channels that GroupNorm(32) cannot split, a
resolution the downsampling does not divide, a mask keeping no cell), each as one line naming the key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mqscale.core.config import setting


@dataclass
class MQVAEConfig:
    resolution: int = setting(64, ge=8, doc="image side in pixels")
    in_channels: int = setting(3, ge=1)
    ch: int = setting(64, ge=32, doc="base channels (GroupNorm needs multiples of 32)")
    ch_mult: list[int] = setting([1, 2, 2], doc="channel multipliers per level; f = 2^(levels-1)")
    num_res_blocks: int = setting(1, ge=1)
    full_res_blocks: bool = setting(True, doc="ResNet blocks at the image's own resolution (the first level); "
                                    "false keeps only its convs, putting the capacity at the grid (light tokenizers)")
    attn_resolutions: list[int] = setting([], doc="feature-map sides that get self-attention")
    z_channels: int = setting(0, ge=0, doc="encoder output channels; 0 = ch * ch_mult[-1]")
    dropout: float = setting(0.0, ge=0.0, lt=1.0)
    mask_ratio: float = setting(0.25, gt=0.0, le=1.0, doc="share of grid cells kept (L = ratio * grid^2)")
    mask_type: Literal["adaptive", "random"] = setting("adaptive", doc="random is the paper's ablation")
    codebook_size: int = setting(1024, ge=2)
    codebook_dim: int = setting(64, ge=1)
    ema_decay: float = setting(0.99, gt=0.0, lt=1.0)
    commitment_beta: float = setting(0.25, ge=0.0)
    restart_unused: bool = setting(True, doc="restart codes whose EMA count fell below 1")
    demask_layers: int = setting(2, ge=0, doc="ResNet + direction-constrained attention layers")
    mask_init: float = setting(0.02, gt=0.0, le=1.0, doc="initial attention weight of dropped cells")

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
        if not self.full_res_blocks and self.ch_mult[:2] != [1, 1]:
            err("model.full_res_blocks", f"false needs ch_mult to start [1, 1] (no block is left to change the "
                f"channel count at the first level), got {self.ch_mult}")
        if self.keep < 1:
            err("model.mask_ratio", f"{self.mask_ratio} keeps no cell of the {self.grid}x{self.grid} grid")
