"""The quality judge: a small CNN that tells the dataset's classes apart, trained on its own images.

Why: FID's Inception cannot be downloaded here, and its ImageNet features say little about small
synthetic images anyway. A classifier of the dataset's own classes gives numbers a regression can
fail: the share of generated images put in the class they were asked for, and the Fréchet distance
between generated and held-out real images in its penultimate features (FD_judge), the usual
practice where Inception features mean little. The held-out images' feature statistics travel with
the weights (the ``reference_*`` buffers), so FD_judge needs nothing else at hand.

Plain conv-BN-ReLU stages, strided where the map halves, then global average pooling: about 0.3M
parameters at width 32, trained in about a minute on a CPU for 32-64 px images.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from mqscale.core.config import setting


@dataclass
class JudgeArgs:
    resolution: int = setting(32, ge=8, doc="image side it was trained at (the only one it accepts)")
    n_classes: int = setting(10, ge=2)
    width: int = setting(32, ge=8, doc="channels after the first halving; x2 after each of the next two")
    in_channels: int = setting(3, ge=1)

    @property
    def feature_dim(self) -> int:
        return 4 * self.width


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Judge(nn.Module):
    def __init__(self, args: JudgeArgs):
        super().__init__()
        self.args = args
        w = args.width
        self.body = nn.Sequential(
            _stage(args.in_channels, w // 2, 1),
            _stage(w // 2, w, 2), _stage(w, w, 1),
            _stage(w, 2 * w, 2), _stage(2 * w, 2 * w, 1),
            _stage(2 * w, 4 * w, 2), _stage(4 * w, 4 * w, 1),
        )
        self.head = nn.Linear(4 * w, args.n_classes)
        d = args.feature_dim
        # the held-out images' feature statistics (FD_judge's reference), set once after training
        self.register_buffer("reference_mean", torch.zeros(d, dtype=torch.float64))
        self.register_buffer("reference_cov", torch.zeros(d, d, dtype=torch.float64))
        self.register_buffer("reference_count", torch.zeros((), dtype=torch.long))

    def check_images(self, x: torch.Tensor) -> None:
        r, c = self.args.resolution, self.args.in_channels
        if x.ndim != 4 or x.shape[1] != c or tuple(x.shape[2:]) != (r, r):
            raise ValueError(f"this judge takes [N, {c}, {r}, {r}] images in [-1, 1] (it was trained at {r} px), "
                             f"got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features [N, feature_dim] of images [N, C, R, R] in [-1, 1]."""
        self.check_images(x)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits [N, n_classes]."""
        return self.head(self.features(x))
