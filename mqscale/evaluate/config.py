"""Typed config of an evaluation (``python -m mqscale.evaluate``): where the metric networks'
weights are, how many images to measure, and where results go. Same loader as every config:
strict types and ranges, one-line errors naming the key and the file, dotted overrides.
Sampling settings are command-line flags shared with ``python -m mqscale.sample``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mqscale.core.config import load_config, setting


@dataclass
class EvalSection:
    inception_weights: str = setting("", doc="pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity), "
                                "local or fsspec; needed for FID, IS and rFID")
    inception_size: int = setting(299, ge=75, doc="Inception input side; 299 is the standard every paper uses")
    vgg_weights: str = setting("", doc="VGG16 features weights for LPIPS (torchvision layout)")
    lpips_weights: str = setting("", doc="LPIPS linear heads (lpips package vgg.pth layout)")
    judge: str = setting("", doc="exported quality judge (python -m mqscale.judge): conditional accuracy and "
                         "FD_judge of a generator, reconstruction accuracy of a tokenizer; needs no download")
    judge_min_accuracy: float = setting(0.97, gt=0.0, le=1.0, doc="a judge below this held-out accuracy is "
                                        "refused (lower it on purpose only)")
    num_samples: int = setting(50000, ge=2, doc="generated images for FID/IS (the field reports 50k)")
    num_reference: int = setting(50000, ge=2, doc="reference images for FID statistics (at most the whole set)")
    num_images: int = setting(10000, ge=1, doc="images for tokenizer metrics")
    batch_size: int = setting(64, ge=1, doc="images per Inception / tokenizer batch")
    is_splits: int = setting(10, ge=1, doc="Inception Score splits")
    storage_options: dict[str, Any] = setting({}, doc="fsspec options for data, weights and outputs")


@dataclass
class EvalLoggingConfig:
    tensorboard_dir: str = setting("runs/eval", doc="TensorBoard root; each evaluation writes "
                              "<dir>/<name>-<job>-<time> (or --run-name)")


@dataclass
class EvalRunConfig:
    name: str = setting("eval", doc="evaluation name: runs are <name>-<job>-<YYYYmmdd-HHMMSS> unless --run-name")
    eval: EvalSection = field(default_factory=EvalSection)
    logging: EvalLoggingConfig = field(default_factory=EvalLoggingConfig)


def load_eval_config(path=None, overrides=None) -> EvalRunConfig:
    return load_config(path, overrides, EvalRunConfig)
