"""LPIPS perceptual distance on VGG16 features (Zhang et al. 2018), as VQGAN trains with.

Weights are never downloaded: ``load_lpips(vgg_path, lin_path)`` reads a torchvision-layout
VGG16 state dict (``features.N.weight``) and the lpips package's linear heads (``linK.model.1.weight``)
from local or fsspec paths, as safetensors or as tensors-only torch files (``weights_only=True``).
"""
from __future__ import annotations

import io

import torch
import torch.nn as nn
from safetensors.torch import load as load_safetensors

from mqscale.core import storage
from mqscale.core.errors import InputError

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
TAPS = (3, 8, 15, 22, 29)            # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
CHANNELS = (64, 128, 256, 512, 512)


class _Lin(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(c, 1, 1, bias=False))


class LPIPS(nn.Module):
    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        for i, ch in enumerate(CHANNELS):
            setattr(self, f"lin{i}", _Lin(ch))
            nn.init.constant_(getattr(self, f"lin{i}").model[1].weight, 1.0 / ch)  # non-negative, as trained heads are
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):  # always frozen
        return super().train(False)

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h)
            if i == TAPS[-1]:
                break
        return out

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-image distance [B] between images in [-1, 1]."""
        total = 0.0
        for i, (fa, fb) in enumerate(zip(self._taps(a), self._taps(b))):
            na = fa / (fa.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            nb = fb / (fb.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((na - nb) ** 2).mean(dim=(1, 2, 3))
        return total


def read_state_dict(path: str, storage_options: dict | None = None) -> dict[str, torch.Tensor]:
    try:
        return state_dict_from_bytes(storage.read_bytes(path, storage_options), path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such weights file") from None


def state_dict_from_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (by ``name``'s suffix) or a tensor-only torch file; never a pickle
    of objects (``weights_only=True``)."""
    if name.endswith(".safetensors"):
        return load_safetensors(data)
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def load_lpips(vgg_path: str, lin_path: str, storage_options: dict | None = None) -> LPIPS:
    """LPIPS with real weights; InputError naming a file that is missing or whose keys do not fit."""
    m = LPIPS()
    vgg = {k: v for k, v in read_state_dict(vgg_path, storage_options).items() if k.startswith("features.")}
    lin = {k: v for k, v in read_state_dict(lin_path, storage_options).items() if k.startswith("lin")}
    own = m.state_dict()
    need_vgg = {k for k in own if k.startswith("features.")}
    need_lin = {k for k in own if k.startswith("lin")}
    if not need_vgg <= set(vgg):
        raise InputError(f"{vgg_path}: not a VGG16 features state dict (missing {sorted(need_vgg - set(vgg))[:2]})")
    if not need_lin <= set(lin):
        raise InputError(f"{lin_path}: not LPIPS linear heads (missing {sorted(need_lin - set(lin))[:2]})")
    m.load_state_dict({**own, **{k: vgg[k] for k in need_vgg}, **{k: lin[k] for k in need_lin}})
    return m
