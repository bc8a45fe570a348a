"""What a judge is trained with, and what its export records about itself.

An export (``model.safetensors`` + ``config.json``, as every model here) carries the architecture,
the class names, the sha256 of the manifests of the image shards it was trained and held out on,
and its held-out accuracy, so a later stage can refuse a judge of another dataset, of another
resolution, or one too weak to trust, each with one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mqscale.core.artifact import ArtifactKind
from mqscale.core.config import setting
from mqscale.models.judge import Judge, JudgeArgs

# Below this held-out accuracy a judge's verdicts mean little: it is refused unless the caller
# lowers the bar on purpose (``min_accuracy``), never used silently.
MIN_ACCURACY = 0.97


@dataclass
class JudgeTrainConfig:
    width: int = setting(32, ge=8, doc="channels of the first strided stage")
    epochs: int = setting(10, ge=1)
    batch_size: int = setting(64, ge=2)
    lr: float = setting(3e-3, gt=0.0, doc="peak of a one-cycle schedule (AdamW)")
    weight_decay: float = setting(1e-4, ge=0.0)
    seed: int = setting(0, ge=0)
    max_images: int = setting(0, ge=0, doc="training images read; 0 = all")
    heldout_images: int = setting(0, ge=0, doc="held-out images read; 0 = all")
    heldout_every: int = setting(10, ge=2, doc="without a held-out set: every n-th image is held out")
    augment: bool = setting(True, doc="flips, mild blur and noise, so it judges shape rather than sharpness")


@dataclass
class JudgeRecord:
    """The ``config`` of a judge's ``config.json``."""
    model: JudgeArgs = field(default_factory=JudgeArgs)
    classes: list[str] = setting([], doc="class names, by label")
    train_data: str = setting("", doc="the image shards it was trained on")
    train_manifest_sha256: str = setting("")
    heldout_data: str = setting("", doc="the held-out image shards (or the training set's every n-th image)")
    heldout_manifest_sha256: str = setting("")
    heldout_accuracy: float = setting(0.0, ge=0.0, le=1.0)
    train_images: int = setting(0, ge=0)
    heldout_images: int = setting(0, ge=0)
    train: JudgeTrainConfig = field(default_factory=JudgeTrainConfig)

    @property
    def datasets(self) -> set[str]:
        """The manifests (sha256) whose images this judge was made for."""
        return {s for s in (self.train_manifest_sha256, self.heldout_manifest_sha256) if s}


JUDGE = ArtifactKind("mqscale-judge/1", JudgeRecord, lambda c: Judge(c.model), "a quality judge")
