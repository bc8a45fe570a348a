"""The Inception-v3 of FID and IS (the TensorFlow 2015-12-05 graph), in pure torch.

FID and IS are only comparable across papers when computed with this one network: the
TensorFlow Inception whose PyTorch port pytorch-fid and torch-fidelity publish as
``pt_inception-2015-12-05-6726825d.pth``. That port differs from torchvision's Inception-v3 in
four places, all reproduced here: 1008 output classes; average pools that do not count the zero
padding; and a max pool (not an average pool) in the pool branch of the last block. Parameter
names follow the published file, so it loads as it is (``torch.load(weights_only=True)``).

The blocks are written as tables of convolutions rather than one class per block: a branch is a
chain of named convs, optionally after a pool, and may end in a fork of two convs whose outputs
are concatenated (the 1x3 / 3x1 pairs of the last blocks).

Outputs: the 2048-d pool features (FID) and the 1008 logits without the bias (IS, as
torch-fidelity computes it). Input: uint8 images [N, 3, H, W], what a saved PNG holds,
resized bilinearly to ``input_size`` (299) and scaled as (x - 128) / 128, as torch-fidelity
does; its resize imitates TensorFlow 1's bilinear kernel, ours is torch's, which moves FID in
the second decimal at most on natural images.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

# A conv: (name, out channels, kernel, stride, padding). A branch: (pool, [convs], fork or None).
Conv = tuple


class BasicConv(nn.Module):
    """Conv without bias, BatchNorm (eps 1e-3, as TensorFlow), ReLU."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _pool(kind: str | None, x: torch.Tensor) -> torch.Tensor:
    if kind == "avg":      # TensorFlow's average pool ignores the padded zeros
        return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if kind == "max/2":
        return F.max_pool2d(x, 3, stride=2)
    return x


class Mixed(nn.Module):
    """One Inception block: parallel branches, concatenated along channels."""

    def __init__(self, cin: int, branches: list[tuple[str | None, list[Conv], list[Conv] | None]]):
        super().__init__()
        self.plan = []
        self.out_channels = 0
        for pool, chain, fork in branches:
            c = cin
            for name, cout, *geom in chain:
                self.add_module(name, BasicConv(c, cout, *geom))
                c = cout
            if fork:
                for name, cout, *geom in fork:
                    self.add_module(name, BasicConv(c, cout, *geom))
                c = sum(f[1] for f in fork)
            self.plan.append((pool, [n for n, *_ in chain], [n for n, *_ in fork or []]))
            self.out_channels += c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for pool, chain, fork in self.plan:
            y = _pool(pool, x)
            for name in chain:
                y = getattr(self, name)(y)
            if fork:
                y = torch.cat([getattr(self, name)(y) for name in fork], dim=1)
            outs.append(y)
        return torch.cat(outs, dim=1)


def block_a(cin: int, pool_features: int) -> Mixed:
    return Mixed(cin, [
        (None, [("branch1x1", 64, 1)], None),
        (None, [("branch5x5_1", 48, 1), ("branch5x5_2", 64, 5, 1, 2)], None),
        (None, [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 1, 1)], None),
        ("avg", [("branch_pool", pool_features, 1)], None)])


def block_b(cin: int) -> Mixed:
    return Mixed(cin, [
        (None, [("branch3x3", 384, 3, 2)], None),
        (None, [("branch3x3dbl_1", 64, 1), ("branch3x3dbl_2", 96, 3, 1, 1), ("branch3x3dbl_3", 96, 3, 2)], None),
        ("max/2", [], None)])


def block_c(cin: int, c7: int) -> Mixed:
    row, col = ((1, 7), 1, (0, 3)), ((7, 1), 1, (3, 0))
    return Mixed(cin, [
        (None, [("branch1x1", 192, 1)], None),
        (None, [("branch7x7_1", c7, 1), ("branch7x7_2", c7, *row), ("branch7x7_3", 192, *col)], None),
        (None, [("branch7x7dbl_1", c7, 1), ("branch7x7dbl_2", c7, *col), ("branch7x7dbl_3", c7, *row),
                ("branch7x7dbl_4", c7, *col), ("branch7x7dbl_5", 192, *row)], None),
        ("avg", [("branch_pool", 192, 1)], None)])


def block_d(cin: int) -> Mixed:
    return Mixed(cin, [
        (None, [("branch3x3_1", 192, 1), ("branch3x3_2", 320, 3, 2)], None),
        (None, [("branch7x7x3_1", 192, 1), ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
                ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 3, 2)], None),
        ("max/2", [], None)])


def block_e(cin: int, pool: str) -> Mixed:
    pair = lambda a, b: [(a, 384, (1, 3), 1, (0, 1)), (b, 384, (3, 1), 1, (1, 0))]  # noqa: E731
    return Mixed(cin, [
        (None, [("branch1x1", 320, 1)], None),
        (None, [("branch3x3_1", 384, 1)], pair("branch3x3_2a", "branch3x3_2b")),
        (None, [("branch3x3dbl_1", 448, 1), ("branch3x3dbl_2", 384, 3, 1, 1)],
         pair("branch3x3dbl_3a", "branch3x3dbl_3b")),
        (pool, [("branch_pool", 192, 1)], None)])


class InceptionV3(nn.Module):
    """FID's Inception-v3. ``forward`` gives (pool features [N, 2048], unbiased logits [N, 1008])."""

    def __init__(self, input_size: int = 299):
        super().__init__()
        self.input_size = input_size
        self.Conv2d_1a_3x3 = BasicConv(3, 32, 3, 2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, 3, 1, 1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        blocks = {}
        c = 192
        for name, make in (("Mixed_5b", lambda c: block_a(c, 32)), ("Mixed_5c", lambda c: block_a(c, 64)),
                           ("Mixed_5d", lambda c: block_a(c, 64)), ("Mixed_6a", block_b),
                           ("Mixed_6b", lambda c: block_c(c, 128)), ("Mixed_6c", lambda c: block_c(c, 160)),
                           ("Mixed_6d", lambda c: block_c(c, 160)), ("Mixed_6e", lambda c: block_c(c, 192)),
                           ("Mixed_7a", block_d), ("Mixed_7b", lambda c: block_e(c, "avg")),
                           ("Mixed_7c", lambda c: block_e(c, "max"))):
            blocks[name] = make(c)
            c = blocks[name].out_channels
            self.add_module(name, blocks[name])
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Inception takes uint8 images [N, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(self.input_size, self.input_size), mode="bilinear",
                          align_corners=False)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        features = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return features, features @ self.fc.weight.t()
