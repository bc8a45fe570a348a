"""A judge at work: loaded with its checks, and the numbers it gives.

- conditional accuracy: the share of generated images it puts in the class they were asked for;
- FD_judge: the Fréchet distance, in its penultimate features, between a set of images and the
  held-out real images it carries the statistics of;
- reconstruction accuracy: its accuracy on a tokenizer's reconstructions, next to the originals'.

Images are rounded to uint8 first, as a saved PNG holds them, so a number measured here is the
number of the pictures a person looks at.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mqscale.core.errors import InputError
from mqscale.core.frechet import FeatureStats, frechet_distance
from mqscale.core.images import from_uint8, to_uint8
from mqscale.judge.config import JUDGE, MIN_ACCURACY, JudgeRecord
from mqscale.models.judge import Judge


@dataclass
class LoadedJudge:
    model: Judge
    record: JudgeRecord
    path: str

    @property
    def resolution(self) -> int:
        return self.record.model.resolution

    def describe(self) -> str:
        r = self.record
        return (f"judge {self.path}: held-out accuracy {r.heldout_accuracy:.3f} over {r.heldout_images} images, "
                f"{len(r.classes)} classes at {r.model.resolution} px")

    @torch.no_grad()
    def judge(self, images: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, np.ndarray]:
        """(predicted labels [N] on the CPU, penultimate features [N, D] float64) of float [-1, 1]
        images [N, C, H, W], rounded through uint8 first."""
        device = next(self.model.parameters()).device
        preds, feats = [], []
        for i in range(0, len(images), batch_size):
            x = from_uint8(to_uint8(images[i:i + batch_size]).permute(0, 2, 3, 1)).to(device)
            f = self.model.features(x)
            preds.append(self.model.head(f).argmax(1).cpu())
            feats.append(f.double().cpu().numpy())
        if not preds:
            raise ValueError("no images to judge")
        return torch.cat(preds), np.concatenate(feats)

    def reference(self) -> FeatureStats:
        m = self.model
        return FeatureStats(m.reference_mean.cpu().numpy(), m.reference_cov.cpu().numpy(), int(m.reference_count))

    def fd(self, features: np.ndarray) -> float:
        """FD_judge of these features against the held-out real images."""
        return frechet_distance(FeatureStats.of(features), self.reference())


def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> float:
    return (pred.cpu() == labels.cpu()).double().mean().item()


def load_judge(path: str, device: str | torch.device = "cpu", *, resolution: int | None = None,
               dataset_sha256: str | set[str] | None = None, min_accuracy: float = MIN_ACCURACY) -> LoadedJudge:
    """A judge export, refused with one line when it is not one, judges another resolution, was
    made for another dataset (``dataset_sha256``: the manifest the images come from), or is too
    weak to trust (held-out accuracy below ``min_accuracy``)."""
    model, record = JUDGE.load(path, device)
    r = record.model.resolution
    if resolution is not None and resolution != r:
        raise InputError(f"{path}: this judge was trained on {r} px images, the images to judge are {resolution} px; "
                         f"train one at {resolution} px (python -m mqscale.judge --images URL --resolution {resolution})")
    wanted = {dataset_sha256} if isinstance(dataset_sha256, str) else set(dataset_sha256 or ())
    if wanted and not wanted & record.datasets:
        raise InputError(f"{path}: this judge was trained on another dataset ({record.train_data}, manifest sha256 "
                         f"{record.train_manifest_sha256[:12]}...); the images to judge come from a manifest with sha256 "
                         f"{sorted(wanted)[0][:12]}...")
    if record.heldout_accuracy < min_accuracy:
        raise InputError(f"{path}: untrustworthy judge: held-out accuracy {record.heldout_accuracy:.3f} is below "
                         f"{min_accuracy:g}; retrain it (more images or epochs), or lower the bar on purpose")
    if int(model.reference_count) < 2:
        raise InputError(f"{path}: the judge carries no held-out feature statistics (FD_judge needs them)")
    return LoadedJudge(model, record, path)
