"""VQGAN-style convolutional encoder and decoder (the taming-transformers architecture).

ResNet blocks with GroupNorm(32) and swish, single-head self-attention at chosen resolutions,
strided-conv downsampling and nearest+conv upsampling. As in the MQ-VAE paper's code, the decoder
has no input conv or middle blocks: it starts from the de-masker's output. Module names follow
taming's (``down.i.block.j``, ``mid.attn_1``, ``up.i.upsample``...), which keeps the import of
official checkpoints a renaming-free copy for these parts.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# Profiler label for the MQ-VAE's mask/de-mask bookkeeping (selection, gathers, scatters, key
# weights), which bench/mqvae.py measures as a share of the step: it must stay small next to the convs.
BOOKKEEPING = "mqvae.mask_bookkeeping"

def norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0,
                 kernel_size: int = 3):
        super().__init__()
        out_channels = out_channels or in_channels
        pad = kernel_size // 2
        self.norm1 = norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad)
        self.norm2 = norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions of a feature map.

    ``key_weight`` [B, HW] multiplies the softmax weights of each key without renormalising
    (the de-masker's direction constraint); it is applied as ``softmax(qk) @ (w * v)``, which is
    the same sum and lets the fused attention kernels do the work.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, key_weight: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).flatten(2).transpose(1, 2)[:, None] for m in (self.q, self.k, self.v))  # [B,1,HW,C]
        if key_weight is not None:
            with torch.profiler.record_function(BOOKKEEPING):
                v = v * key_weight[:, None, :, None].to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj_out(y[:, 0].transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ResNet blocks, each followed by attention when the level has it."""

    def __init__(self, chans: list[tuple[int, int]], attn: bool, dropout: float):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(i, o, dropout) for i, o in chans)
        self.attn = nn.ModuleList(AttnBlock(o) for _, o in chans) if attn else nn.ModuleList()

    def run(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Encoder(nn.Module):
    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 in_channels: int, resolution: int, z_channels: int, dropout: float = 0.0,
                 full_res_blocks: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, block_in = resolution, ch
        for i, mult in enumerate(ch_mult):
            out = ch * mult
            blocks = num_res_blocks if i or full_res_blocks else 0
            level = _Level([(block_in if j == 0 else out, out) for j in range(blocks)],
                           res in attn_resolutions, dropout)
            block_in = out
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """From the de-masked feature grid (``ch * ch_mult[-1]`` channels) to an image."""

    def __init__(self, *, ch: int, ch_mult: list[int], num_res_blocks: int, attn_resolutions: list[int],
                 out_channels: int, resolution: int, dropout: float = 0.0, full_res_blocks: bool = True):
        super().__init__()
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        levels = []
        for i in reversed(range(len(ch_mult))):
            out = ch * ch_mult[i]
            blocks = num_res_blocks + 1 if i or full_res_blocks else 0
            level = _Level([(block_in if j == 0 else out, out) for j in range(blocks)],
                           res in attn_resolutions, dropout)
            block_in = out
            if i != 0:
                level.upsample = Upsample(block_in)
                res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for level in reversed(self.up):
            h = level.run(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        return self.conv_out.weight
