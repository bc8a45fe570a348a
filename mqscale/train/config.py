"""The typed config of a Stackformer run (``python -m mqscale.train``), and the export kind that carries it.

Sections: ``model`` (the Stackformer's arguments, ``models/stackformer/args.py``), ``data``
(``data/config.py``), ``optim``, ``train``, ``checkpoint`` and ``logging`` (shared with tokenizer
runs, ``core``), ``ray`` and ``deepspeed``. Every export of a Stackformer (``mqscale.export``,
``mqscale.convert``) stores the resolved config in its ``config.json``: ``STACKFORMER`` loads it.
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
from mqscale.models.stackformer.args import ModelConfig
from mqscale.models.stackformer.model import Stackformer


@dataclass
class OptimConfig:
    """AdamW with warmup then cosine decay (the paper: betas 0.9/0.95, wd 0.01, floor 0.0005*lr)."""
    lr: float = setting(5e-4, gt=0.0, doc="peak learning rate")
    min_lr_ratio: float = setting(0.0005, ge=0.0, le=1.0, doc="cosine floor as a fraction of lr")
    weight_decay: float = setting(0.01, ge=0.0, doc="decoupled weight decay (not on biases/norms/embeddings)")
    betas: tuple[float, float] = setting((0.9, 0.95), doc="AdamW betas")
    eps: float = setting(1e-8, gt=0.0)
    warmup_steps: int = setting(0, ge=0, doc="linear warmup steps")
    grad_clip: float = setting(1.0, ge=0.0, doc="global grad-norm clip; 0 disables")

    def check(self, err) -> None:
        for b in self.betas:
            if not 0.0 <= b < 1.0:
                err("optim.betas", f"{list(self.betas)} must each be in [0, 1)")


@dataclass
class TrainConfig:
    max_steps: int = setting(100, ge=1, doc="optimizer steps")
    grad_accum: int = setting(1, ge=1, doc="micro-batches per optimizer step")
    precision: Literal["fp32", "bf16", "fp16"] = setting("bf16", doc="fp16 is GPU-only")
    seed: int = setting(0, ge=0)
    global_batch: int = setting(0, ge=0, doc="sequences per optimizer step; 0 = batch_size x world x grad_accum "
                                "at the run's start (a resumed run keeps its checkpoint's)")
    min_micro_batch: int = setting(0, ge=0, doc="on another number of workers, the micro-batch may shrink down "
                                   "to this to keep the global batch; 0 = only data.batch_size")
    max_nonfinite: int = setting(3, ge=1, doc="non-finite steps in a row that stop the run")
    eval_every: int = setting(0, ge=0, doc="steps between validations; 0 = never")
    p_uncond: float = setting(0.0, ge=0.0, lt=1.0, doc="condition dropout for classifier-free guidance")


@dataclass
class TrainLoggingConfig(LoggingConfig):
    tokenizer: str = setting("", doc="exported tokenizer that decodes the sample grids; empty = no grids")
    judge: str = setting("", doc="exported quality judge (python -m mqscale.judge): each sample grid also logs "
                         "quality/cond_acc and quality/fd_judge; empty = none")
    judge_samples: int = setting(100, ge=2, doc="with a judge: images each sample grid draws (classes in turn)")
    judge_min_accuracy: float = setting(0.97, gt=0.0, le=1.0, doc="a judge below this held-out accuracy is refused")
    peak_tflops: float = setting(0.0, ge=0.0, doc="device peak for MFU; 0 = look the device up")
    sample_compile: Literal["auto", "on", "off"] = setting(
        "auto", doc="compiled decoding of the sample grids; auto: when the grids still to come pay for the compile")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = setting(1, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu", "nvme"] = "none"
    offload_param: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str = setting("", doc="required with nvme offload")
    config_json: str = setting("", doc="an expert's own DeepSpeed JSON; our fields are checked against it")

    def check(self, err) -> None:
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            err("deepspeed.offload_optimizer", f"{self.offload_optimizer} needs deepspeed.zero_stage 1, 2 or 3 "
                "(ZeRO-Offload partitions the optimizer state)")
        if self.offload_param != "none" and self.zero_stage != 3:
            err("deepspeed.offload_param", f"{self.offload_param} needs deepspeed.zero_stage=3, "
                f"not {self.zero_stage}")
        if "nvme" in (self.offload_param, self.offload_optimizer) and not self.nvme_path:
            err("deepspeed.nvme_path", "is required when offloading to nvme")


@dataclass
class Config:
    name: str = setting("debug", doc="run name")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: TrainLoggingConfig = field(default_factory=TrainLoggingConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    # keys renamed so that both trainers say the same thing the same way: old files still load
    RENAMED: ClassVar[dict[str, str]] = {"logging.sample_every": "logging.image_every"}
    # local paths made absolute before Ray workers (in other directories) read them
    PATHS: ClassVar[tuple[str, ...]] = ("data.train_url", "data.val_url", "checkpoint.dir", "checkpoint.resume_from",
                                        "logging.tokenizer", "logging.judge", "logging.tensorboard_dir",
                                        "deepspeed.config_json")

    def check(self, err) -> None:
        if self.train.p_uncond > 0 and self.model.cond == "none":
            err("train.p_uncond", f"{self.train.p_uncond} needs a conditional model (model.cond is none); "
                "set train.p_uncond=0")


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    return load_config(path, overrides, Config)


STACKFORMER = ArtifactKind("mqscale-stackformer/1", Config, lambda c: Stackformer(c.model), "a Stackformer")
