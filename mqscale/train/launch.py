"""A Stackformer run: checked before any worker starts, trained on Ray Train workers or in the
processes the deepspeed launcher started (the same loop either way), then reported.

A run that stops itself (a streak of non-finite steps: ``TrainingStopped``) saves a checkpoint
first. Under Ray its workers then return normally (raised, Ray would take the stop for a worker
failure and restart the group within ``ray.max_failures``), and the reason reaches the driver
with the final checkpoint's report.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from mqscale.core import dist, storage
from mqscale.core.checkpoint import CheckpointStore
from mqscale.core.config import from_dict
from mqscale.core.console import quiet_prints, setup_logging
from mqscale.core.ray import RaySession, ray_running, stop_ray, train_on_ray
from mqscale.core.session import StorageSession
from mqscale.core.tensorboard import tensorboard_location
from mqscale.train.config import Config
from mqscale.train.engine import import_deepspeed
from mqscale.train.faults import during_save
from mqscale.train.trainer import TrainingStopped, train
from mqscale.train.validate import validate_run

log = logging.getLogger("mqscale.train")


@dataclass
class TrainRun:
    run_url: str
    stopped: str | None = None   # why the run stopped itself, if it did


def worker(config: dict, run_url: str, launch_id: str) -> None:
    """Runs on every Ray Train worker."""
    setup_logging()
    cfg = from_dict(config, "train_loop_config", Config)
    session = RaySession(run_url, launch_id, between_files=during_save)
    try:
        train(cfg, session)
    except TrainingStopped as e:
        if session.rank == 0:
            log.error("stopped: %s", e)


def stopped_reason(result) -> str | None:
    """Why the run stopped itself, from the metrics of its last checkpoint report (None: it did not)."""
    metrics = getattr(result, "metrics", None) or {}
    return metrics.get("stopped_reason") or None


def train_with_ray(cfg: Config) -> TrainRun:
    """Ray Train workers (a local Ray, or the cluster); RunFailed when the workers failed."""
    url = cfg.checkpoint.run_url(cfg.name)
    validate_run(cfg, cfg.ray.worlds, url)
    ours = not ray_running()  # train_on_ray starts a local Ray then
    why = stopped_reason(train_on_ray(worker, cfg))
    if why and ours:  # the workers' last log lines come out before the reason
        stop_ray()
    return TrainRun(url, why)


def train_with_launcher(cfg: Config) -> TrainRun:
    """In a process the deepspeed launcher (or torchrun) started: every rank calls it."""
    with quiet_prints():
        import_deepspeed().init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    url = cfg.checkpoint.run_url(cfg.name)
    validate_run(cfg, dist.world(), url)
    session = StorageSession(url, cfg.checkpoint.storage_options, cfg.checkpoint.keep_last, between_files=during_save)
    try:
        train(cfg, session)
    except TrainingStopped as e:
        return TrainRun(url, str(e))
    dist.barrier()
    return TrainRun(url)


def report_lines(cfg: Config, run_url: str) -> list[str]:
    """Where the run's checkpoints, samples and TensorBoard events are, and how to export it."""
    found = CheckpointStore(run_url, cfg.checkpoint.storage_options).candidates()
    lines = [f"run: {run_url}",
             f"checkpoints: {', '.join(c.url.rsplit('/', 1)[-1] for c in found[:3]) or 'none'}"]
    if found:
        lines.append(f"export: python -m mqscale.export {found[0].url} exported/{cfg.name}")
    final = storage.join(run_url, f"samples/step_{cfg.train.max_steps:09d}.png")
    if cfg.logging.tokenizer and storage.exists(final, cfg.checkpoint.storage_options):
        lines.append(f"samples: {final} (one row per class)")
    lines.append(f"tensorboard: tensorboard --logdir {tensorboard_location(run_url, cfg.logging.tensorboard_dir)}")
    return lines
